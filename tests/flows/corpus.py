"""A tiny deterministic text corpus and a pipeline config that ingests it (for flow and UI tests)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lmfoundry.infra.config import PipelineConfig, build_config

import random

VAL_FRACTION = 0.5  # of the documents, in tokenize's validation split

NOUNS = "river garden window teacher village morning letter harbor kitchen mountain library engine market bridge winter festival painter forest".split()
VERBS = "carried painted opened followed visited repaired described watched borrowed answered measured collected".split()
ADJECTIVES = "quiet small ancient bright narrow careful distant busy gentle heavy".split()


def sentence(rng: random.Random) -> str:
    """A plain English sentence with stop words, so the heuristic filters keep the document."""
    a, b = rng.sample(NOUNS, 2)
    return (
        f"The {rng.choice(ADJECTIVES)} {a} {rng.choice(VERBS)} the {b} of the {rng.choice(NOUNS)} "
        f"and that was {rng.choice(ADJECTIVES)} to {rng.choice(NOUNS)}s with {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}s."
    )


def make_corpus(folder: Path, n_files: int = 12, duplicates: int = 3) -> Path:
    """`n_files` small prose documents (seeded); the last `duplicates` repeat earlier texts exactly."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        j = i if i < n_files - duplicates else i - (n_files - duplicates)
        rng = random.Random(j)
        (folder / f"doc-{i:03d}.txt").write_text(f"Document {j}.\n" + "\n".join(sentence(rng) for _ in range(8)) + "\n")
    return folder


def source_name(corpus: Path) -> str:
    """'corpus', or 'corpus-N' for the first N that puts some but not all of the first half of the
    files (the half no test makes a duplicate) into tokenize's validation split. A document's id
    hashes the source name and the file's absolute path, which changes with every temporary
    directory: with one fixed name, one run in 256 had an empty split and failed at pretraining."""
    from lmfoundry.tasks.acquire.ingest import doc_id
    from lmfoundry.tasks.tokens.tokenize import in_val

    paths = sorted(str(p) for p in corpus.glob("*.txt"))
    first_half = paths[: max(2, len(paths) // 2)]
    for n in range(100):
        name = "corpus" if n == 0 else f"corpus-{n}"
        if len({in_val(doc_id(name, path), VAL_FRACTION) for path in first_half}) == 2:
            return name
    raise AssertionError(f"no source name splits {corpus} into train and val")


def config_data(corpus: Path, store: Path, pipeline: str = "test", **compute: Any) -> dict[str, Any]:
    return {
        "store": {"url": str(store), "pipeline": pipeline},
        "compute": {"workers": 2, "progress": False, **compute},
        "ingest": {"sources": [{"name": source_name(corpus), "paths": [str(corpus / "*.txt")]}], "target_shard_bytes": 1024},
        # a dozen documents: a small vocabulary and a validation share that is not empty
        "tokenizer": {"vocab_size": 400},
        "tokenize": {"seq_len": 32, "val_fraction": VAL_FRACTION},
        # a few optimizer steps of a tiny model on one CPU rank
        "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1},
        "pretrain": {
            "steps": 2, "global_batch_size": 2, "warmup_steps": 0, "export_hf": False,
            "log_every": 1, "eval_every": 2, "eval_samples": 4, "checkpoint_every": 2,
        },
    }


def make_config(corpus: Path, store: Path, **compute: Any) -> PipelineConfig:
    return build_config(config_data(corpus, store, **compute))


def write_preset(path: Path, corpus: Path, store: Path, **compute: Any) -> Path:
    path.write_text(yaml.safe_dump(config_data(corpus, store, **compute), sort_keys=False))
    return path


def expected_actions(cfg: PipelineConfig, action: str) -> list[str]:
    """The run-summary actions of the data refresh when every enabled stage does `action`."""
    from lmfoundry.flows.data_refresh import data_stages

    return [action if spec.enabled(cfg) else "disabled" for spec in data_stages()]


def enabled_data_stages(cfg: PipelineConfig) -> list[str]:
    from lmfoundry.flows.data_refresh import data_stages

    return [spec.name for spec in data_stages() if spec.enabled(cfg)]
