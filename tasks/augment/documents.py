"""Stage `augment_docs`: variants of every document of a small corpus (off by default).

Sits between exact_dedup and near_dedup. Output shard i holds input shard i's documents
unchanged, then their variants: for each method and copy, the document with its text rewritten
(tasks/augment/synonyms.py, tasks/augment/backtranslate.py; protected spans kept), id
``<source id>#aug-<method>-<copy>`` and meta ``augmented_from`` (the source's id) and
``augmentation`` (the method). A variant identical to its source is not written (counted).

The link is what later stages read: near_dedup reports how many variants it kept and how many it
removed as near-duplicates of their own source (the rewrite was too light to be a new document)
or of another document; the review gate shows ``augmented_from`` among a document's signals.

Synonym variants are seeded by the seed, the document id, the method and the copy, so they do not
depend on shard layout or workers. Back-translation runs its models in this process, one shard
after another (the models use every core themselves; forked workers would each load them).

Run: ``lmf run --set augment_docs.enabled=true --until near_dedup``.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from functools import lru_cache, partial

import pyarrow as pa
from pydantic import BaseModel

from lmfoundry.infra.config import ComputeConfig
from lmfoundry.infra.config_posttrain import AugmentDocsConfig, BackTranslationConfig
from lmfoundry.infra.docs import doc_shards, docs_table, shard_name
from lmfoundry.infra.parallel import map_pending
from lmfoundry.infra.store import StageDir, StageRef

CODE_VERSION = "1"
VARIANT_MARK = "#aug-"  # in a variant's id: near_dedup finds variants without parsing every meta


class AugmentDocsStats(BaseModel):
    docs_in: int
    variants: dict[str, int]  # written, per method
    unchanged: dict[str, int]  # nothing replaceable, per method
    docs_out: int


def variant_id(source_id: str, method: str, copy: int) -> str:
    return f"{source_id}{VARIANT_MARK}{method}-{copy}"


def rewriters(cfg: AugmentDocsConfig) -> dict[str, object]:
    """method -> function(list of (doc id, text), copy) -> list of new texts."""
    out = {}
    if "synonyms" in cfg.methods:
        from lmfoundry.tasks.augment.synonyms import SynonymReplacer, load_wordnet

        replacer = SynonymReplacer(load_wordnet(cfg.wordnet_dir), set(cfg.pos))
        out["synonyms"] = lambda docs, copy: [
            replacer.replace(text, cfg.synonym_rate, random.Random(f"{cfg.seed}:{doc_id}:synonyms:{copy}"))[0] for doc_id, text in docs
        ]
    if "backtranslation" in cfg.methods:
        translator = _translator(cfg.backtranslation)
        out["backtranslation"] = lambda docs, copy: translator.paraphrase([text for _, text in docs])
    return out


@lru_cache(maxsize=1)
def _translator(cfg: BackTranslationConfig):
    """Loaded once per process, not once per shard."""
    from lmfoundry.tasks.augment.backtranslate import BackTranslator

    return BackTranslator(cfg)


def augment_shard(cfg: AugmentDocsConfig, out: StageDir, shards: list[tuple[StageRef, str]], index: int) -> None:
    ref, path = shards[index]
    table = out.store.reader(ref).read_table(path)
    rows = table.to_pylist()
    docs = [(row["id"], row["text"] or "") for row in rows]
    variants, counts = [], Counter()
    for method, rewrite in rewriters(cfg).items():
        for copy in range(1 if method == "backtranslation" else cfg.copies):
            for row, new in zip(rows, rewrite(docs, copy)):
                if new == (row["text"] or ""):
                    counts[f"unchanged:{method}"] += 1
                    continue
                meta = json.loads(row["meta"] or "{}")
                meta.update(augmented_from=row["id"], augmentation=method)
                variants.append({**row, "id": variant_id(row["id"], method, copy), "text": new, "meta": meta})
                counts[f"variant:{method}"] += 1
    combined = pa.concat_tables([table.cast(docs_table([]).schema), docs_table(variants)]) if variants else table
    out.write_table(shard_name(index), combined, counts=dict(counts))


def run_augment_docs(cfg: AugmentDocsConfig, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> AugmentDocsStats:
    shards = doc_shards(out.store, inputs)
    if "backtranslation" in cfg.methods:
        compute = compute.model_copy(update={"task_runner": "threads", "workers": 1})  # models load once, in this process
    map_pending(partial(augment_shard, cfg, out, shards), len(shards), shard_name, out, compute, "augment")
    counts, docs_out = Counter(), 0
    for i in range(len(shards)):
        marker = out.marker(shard_name(i))
        counts.update(marker["counts"])
        docs_out += marker["rows"]
    per = lambda kind: {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith(kind + ":")}  # noqa: E731
    variants = per("variant")
    return AugmentDocsStats(docs_in=docs_out - sum(variants.values()), variants=variants, unchanged=per("unchanged"), docs_out=docs_out)
