"""Stage `ingest`: formats, malformed records counted by reason, clear errors for missing paths."""
from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.docs import iter_docs
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.tasks.acquire.ingest import InputError

SPEC = StageSpec("ingest", "lmfoundry.tasks.acquire.ingest:run_ingest", section="ingest")


def config(*sources: dict, **ingest) -> PipelineConfig:
    return PipelineConfig.model_validate({"ingest": {"sources": list(sources), **ingest}})


def run(store, cfg):
    outcome = run_stage(store, SPEC, cfg, [])
    return outcome, list(iter_docs(store, [outcome.ref]))


def test_text_jsonl_parquet_and_gzip(store, tmp_path):
    (tmp_path / "a.txt").write_text("plain text document")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "from gzip jsonl", "url": "http://x/1", "lang": "en"}) + "\n")
    pq.write_table(pa.table({"text": ["from parquet"], "doc": ["p-1"]}), tmp_path / "c.parquet")
    cfg = config(
        {"name": "txt", "paths": [str(tmp_path / "*.txt")]},
        {"name": "json", "paths": [str(tmp_path / "b.jsonl.gz")]},
        {"name": "pq", "paths": [str(tmp_path / "c.parquet")], "id_field": "doc"},
    )
    outcome, docs = run(store, cfg)
    by_text = {d["text"]: d for d in docs}
    assert set(by_text) == {"plain text document", "from gzip jsonl", "from parquet"}
    assert by_text["from gzip jsonl"]["url"] == "http://x/1"
    assert json.loads(by_text["from gzip jsonl"]["meta"])["lang"] == "en"
    assert by_text["from parquet"]["id"] == "p-1"
    assert by_text["plain text document"]["source"] == "txt"
    assert outcome.stats["docs_by_source"] == {"json": 1, "pq": 1, "txt": 1}


def test_malformed_records_are_skipped_and_counted(store, tmp_path):
    tmp_path = tmp_path / "inputs"
    tmp_path.mkdir()
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b"{not json",
        json.dumps(["a list"]).encode(),
        json.dumps({"body": "no text field"}).encode(),
        json.dumps({"text": "   "}).encode(),
        b'{"text": "bad \xff utf8"}',
        json.dumps({"text": "good two"}).encode(),
        b'{"text": "truncated li',  # last line cut mid-record
    ]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines))
    outcome, docs = run(store, config({"name": "s", "paths": [str(tmp_path)]}))
    assert sorted(d["text"] for d in docs) == ["good one", "good two"]
    assert outcome.stats["skipped"] == {
        "bad_json": 2,
        "empty": 2,
        "invalid_utf8": 2,
        "missing_text": 1,
        "not_object": 1,
    }
    assert outcome.stats["docs_in"] == 10


def test_huge_single_document_is_skipped_not_fatal(store, tmp_path):
    big = "word " * (10 * 2**20)  # a 50 MB document on one JSONL line
    with open(tmp_path / "big.jsonl", "w") as f:
        f.write(json.dumps({"text": big}) + "\n" + json.dumps({"text": "small"}) + "\n")
    outcome, docs = run(store, config({"name": "s", "paths": [str(tmp_path / "big.jsonl")]}))
    assert [d["text"] for d in docs] == ["small"]
    assert outcome.stats["skipped"] == {"too_long": 1}


def test_huge_document_is_kept_when_the_limit_allows(store, tmp_path):
    (tmp_path / "big.txt").write_text("x" * (50 * 2**20))
    outcome, docs = run(store, config({"name": "s", "paths": [str(tmp_path / "big.txt")]}, max_doc_chars=60 * 2**20))
    assert len(docs[0]["text"]) == 50 * 2**20


def test_missing_path_names_the_source_and_path(store, tmp_path):
    cfg = config({"name": "corpus", "paths": [str(tmp_path / "nope" / "*.jsonl")]})
    with pytest.raises(InputError, match=r"source 'corpus' path '.*nope/\*\.jsonl'.*matched no files"):
        run(store, cfg)


def test_shards_follow_target_size_and_ids_are_stable(store, tmp_path):
    tmp_path = tmp_path / "inputs"
    tmp_path.mkdir()
    for i in range(6):
        (tmp_path / f"f{i}.txt").write_text(f"document number {i} " * 100)
    cfg = config({"name": "s", "paths": [str(tmp_path)]}, target_shard_bytes=4000)
    outcome, docs = run(store, cfg)
    assert outcome.stats["shards"] == 3 and len(docs) == 6
    # the ids are stable: a second store gives the same ids and the same digest
    other = type(store)(str(tmp_path.parent / "other"))
    assert run_stage(other, SPEC, cfg, []).ref.digest == outcome.ref.digest


def test_changed_input_file_changes_the_version(store, tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one")
    cfg = config({"name": "s", "paths": [str(path)]})
    first = run_stage(store, SPEC, cfg, []).ref
    path.write_text("one, edited")
    assert run_stage(store, SPEC, cfg, []).ref.version != first.version


def test_binary_content_is_skipped_and_counted(store, tmp_path):
    tmp_path = tmp_path / "inputs"
    tmp_path.mkdir()
    (tmp_path / "nul.txt").write_bytes(bytes(4096))  # valid UTF-8, yet no text
    (tmp_path / "random.txt").write_bytes(bytes((i * 131 + 7) % 256 for i in range(4096)))
    (tmp_path / "ok.txt").write_text("a real text document")
    (tmp_path / "recs.jsonl").write_text(json.dumps({"text": "\u0000" * 50 + "x"}) + "\n" + json.dumps({"text": "fine"}) + "\n")
    outcome, docs = run(store, config({"name": "s", "paths": [str(tmp_path)]}))
    assert sorted(d["text"] for d in docs) == ["a real text document", "fine"]
    assert outcome.stats["skipped"] == {"binary": 3}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_text_field_no_record_has_is_an_input_error(store, tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    records = [{"content": "some text", "title": "t1"}, {"content": "more text", "title": "t2"}]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    cfg = config({"name": "corpus", "paths": [str(path)], "text_field": "body"})
    with pytest.raises(InputError, match=r"no record has the text field 'body' \(source 'corpus'.*\['content', 'title'\]"):
        run(store, cfg)
    outcome, docs = run(store, config({"name": "corpus", "paths": [str(path)], "text_field": "content"}))
    assert [d["text"] for d in docs] == ["some text", "more text"]


def test_empty_input_commits_with_a_warning(store, tmp_path, caplog):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    outcome, docs = run(store, config({"name": "s", "paths": [str(tmp_path / "empty.jsonl")]}))
    assert outcome.status == "ran" and docs == []
    assert outcome.stats["skipped"] == {"empty_file": 1}
    assert len(outcome.stats["warnings"]) == 1 and "gave no documents" in outcome.stats["warnings"][0]
    assert any(r.levelname == "WARNING" and "gave no documents" in r.getMessage() for r in caplog.records)
    assert run_stage(store, SPEC, PipelineConfig(), []).stats["warnings"] == []  # no sources: a WARC-only pipeline


def test_paths_are_read_in_the_order_given(store, tmp_path):
    (tmp_path / "a.txt").write_text("file a")
    (tmp_path / "b.txt").write_text("file b")
    _, docs = run(store, config({"name": "s", "paths": [str(tmp_path / "b.txt"), str(tmp_path / "*.txt")]}))
    assert [d["text"] for d in docs] == ["file b", "file a"]
