"""The data pipeline end to end, crawl of a loopback site to token shards, through the Prefect flow.

Then the promise of the PII stage is checked where it matters: the tokenized training data,
decoded, holds zero matches of the enabled detectors although the raw corpus was full of them.
"""
from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest
from faker import Faker
from tokenizers import Tokenizer

from lmfoundry.flows.pipeline import STAGE_NAMES
from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.docs import iter_docs
from lmfoundry.infra.store import Store
from lmfoundry.tasks.pii.detectors import find_pii


def corpus(folder, n_docs: int = 60) -> list[str]:
    """English prose with PII planted in it, and a few near-duplicates."""
    fake = Faker("en_US")
    Faker.seed(7)
    rng = random.Random(7)
    texts = []
    for i in range(n_docs):
        prose = " ".join(fake.paragraph(nb_sentences=10) for _ in range(4))
        pii = (
            f" Write to {fake.email()} or call {fake.phone_number()} about the order."
            f" The server at {fake.ipv4_public()} charged card {fake.credit_card_number(card_type='visa')}"
            f" and paid into {fake.iban()}."
        )
        texts.append(prose + pii)
    for i in range(0, 10, 2):  # near-duplicates: one word changed in a long document
        words = texts[i].split()
        words[rng.randrange(len(words))] = "changed"
        texts.append(" ".join(words))
    folder.mkdir()
    with open(folder / "docs.jsonl", "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")
    return texts


@pytest.fixture
def config(tmp_path) -> PipelineConfig:
    corpus(tmp_path / "corpus")
    return PipelineConfig.model_validate(
        {
            "store": {"url": str(tmp_path / "store"), "pipeline": "e2e"},
            "ingest": {"sources": [{"name": "faker", "paths": [str(tmp_path / "corpus")]}]},
            "tokenizer": {"vocab_size": 600},
            "tokenize": {"seq_len": 64, "val_fraction": 0.2},
        }
    )


def decoded_documents(store: Store, refs: dict) -> list[str]:
    """Every document in the token shards, decoded (split at EOS, padding dropped)."""
    tokenizer_reader = store.reader(refs["train_tokenizer"])
    tokenizer = Tokenizer.from_file(tokenizer_reader.local_path("tokenizer.json"))
    reader = store.reader(refs["tokenize"])
    index = reader.read_json("index.json")
    ids: list[int] = []
    for split in ("train", "val"):
        for entry in index["splits"][split]:
            table = pa.ipc.open_file(pa.BufferReader(reader.read_bytes(entry["path"]))).read_all()
            ids.extend(t for t in table.column("tokens").combine_chunks().flatten().to_pylist() if t != index["pad_id"])
    docs, current = [], []
    for token in ids:
        if token == index["eos_id"]:
            docs.append(tokenizer.decode(current, skip_special_tokens=True))
            current = []
        else:
            current.append(token)
    return docs


def test_data_refresh_end_to_end_leaves_no_pii_in_training_tokens(config, prefect_harness):
    from lmfoundry.flows.end_to_end import end_to_end

    refs = end_to_end(config=config, until="tokenize")
    assert set(STAGE_NAMES[: STAGE_NAMES.index("tokenize") + 1]) <= set(refs)
    store = Store.from_config(config.store)

    raw = [d["text"] for d in iter_docs(store, [refs["ingest"]])]
    assert sum(len(find_pii(t, config.pii)) for t in raw) >= 4 * len(raw)  # 5 planted per document

    near = store.manifest("near_dedup", refs["near_dedup"].version)["stats"]
    assert near["docs_out"] < near["docs_in"]  # the planted near-duplicates went

    decoded = decoded_documents(store, refs)
    assert len(decoded) == store.manifest("pii_scrub", refs["pii_scrub"].version)["stats"]["docs_out"]
    leaks = [(span, text[max(0, span.start - 20): span.end + 20]) for text in decoded for span in find_pii(text, config.pii)]
    assert leaks == []
    assert any("<EMAIL>" in text for text in decoded)
