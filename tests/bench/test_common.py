"""bench/_common.py: the result line, WARC text, document shards and the alternating-rounds loop.

    .venv/bin/pytest -q tests/bench/test_common.py
"""
from __future__ import annotations

import io
import json

import pytest

from lmfoundry.bench._common import (
    alternating_rounds,
    commit_doc_shards,
    print_result,
    result_line,
    warc_documents,
    warc_paths,
    warc_texts,
)

ARTICLE = "Rivers carry sediment to the sea. " * 12


def write_warc(path, pages: list[tuple[str, str, bytes]]) -> None:
    """(url, content type, body) as gzipped WARC response records."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        for url, content_type, body in pages:
            http = StatusAndHeaders("200 OK", [("Content-Type", content_type)], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http))


def test_result_line_has_the_standard_keys_in_order_and_rounds_after_dividing():
    line = result_line("x", "docs_per_s", 10.04, "peer", 3.0, n=7, quality={"f1": 1.0}, settings={"ours": {"k": 1}, "peer": {"k": 1}}, extra=5)
    assert list(line) == ["bench", "metric", "ours", "baseline_name", "baseline", "ratio", "n", "quality", "settings", "extra"]
    assert (line["ours"], line["baseline"], line["ratio"]) == (10.0, 3.0, 3.347)  # 10.04 / 3, not 10.0 / 3
    assert result_line("x", "m", 2.0, "peer", None, n=1, quality={}, settings={"ours": {}})["ratio"] is None
    assert result_line("x", "m", 2.0, "peer", 4.0, n=1, quality={}, settings={"ours": {}}, ratio=0.1234, ratio_digits=2)["ratio"] == 0.12
    with pytest.raises(ValueError, match="settings"):
        result_line("x", "m", 1.0, "peer", 1.0, n=1, quality={}, settings={})


def test_print_result_prints_one_json_line(capsys):
    printed = print_result("x", "m", 1.0, "peer", 2.0, n=1, quality={}, settings={"ours": {}})
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == printed


def test_rounds_alternate_and_know_their_number():
    calls = []
    runs = alternating_rounds({"a": lambda r: calls.append(f"a{r}") or r * 10, "b": lambda r: calls.append(f"b{r}") or -r}, 3, before=lambda: calls.append("|"))
    assert calls == ["|", "a0", "|", "b0", "|", "a1", "|", "b1", "|", "a2", "|", "b2"]
    assert runs == {"a": [0, 10, 20], "b": [0, -1, -2]}


def test_warc_documents_keep_html_responses_in_order(tmp_path):
    page = f"<html><body><article><h1>Rivers</h1><p>{ARTICLE}</p></article></body></html>".encode()
    write_warc(tmp_path / "a.warc.gz", [("https://a.test/1", "text/html; charset=utf-8", page), ("https://a.test/x.png", "image/png", b"\x89PNG")])
    write_warc(tmp_path / "b.warc.gz", [("https://b.test/2", "text/html", b"<html><body></body></html>")])
    docs = list(warc_documents(warc_paths(tmp_path)))
    assert [(d["url"], d["source"]) for d in docs] == [("https://a.test/1", "a.warc.gz"), ("https://b.test/2", "b.warc.gz")]
    assert "Rivers carry sediment to the sea." in docs[0]["text"] and docs[1]["text"].strip() == ""
    assert warc_texts(warc_paths(tmp_path), skip_empty=True) == [docs[0]["text"]]
    assert warc_texts(warc_paths(tmp_path, ["b.warc.gz"]), limit=1) == [docs[1]["text"]]
    assert warc_paths(tmp_path / "b.warc.gz") == [tmp_path / "b.warc.gz"]  # one file given directly


def test_missing_warc_files_exit_with_code_2_and_say_what_to_pass(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        warc_paths(tmp_path, ["nope.warc.gz"])
    assert stop.value.code == 2 and "nope.warc.gz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        warc_paths(tmp_path)  # a folder without any
    assert "--data" in capsys.readouterr().err


def test_commit_doc_shards_writes_one_shard_per_group(store):
    ref = commit_doc_shards(store, [[{"id": "1", "text": "one"}, {"id": "2", "text": "two"}], [{"id": "3", "text": "three"}]])
    reader = store.reader(ref)
    shards = [reader.read_table(path, columns=["id", "text"]).to_pylist() for path in reader.files("data/", ".parquet")]
    assert shards == [[{"id": "1", "text": "one"}, {"id": "2", "text": "two"}], [{"id": "3", "text": "three"}]]
