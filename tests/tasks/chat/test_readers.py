"""Reading chat rows: compressed JSONL, JSON arrays, Parquet; locations a person can act on."""
from __future__ import annotations

import gzip
import json

import pytest

from lmfoundry.infra.config_posttrain import ChatSourceConfig
from lmfoundry.tasks.chat.readers import BadRow, ChatDataError, fingerprint, list_files, read_rows


def rows_of(path) -> list[tuple[str, object]]:
    files = list_files([ChatSourceConfig(paths=[str(path)])], "sft_data")
    return [(loc.rsplit("/", 1)[-1], obj) for f in files for loc, obj in read_rows(f)]


def test_gzip_jsonl_counts_lines_from_one_and_skips_blank_ones(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write('{"x": 1}\n\n{"x": 2}\n\xff\n')
    got = rows_of(tmp_path / "a.jsonl.gz")
    assert got[:2] == [("a.jsonl.gz:1", {"x": 1}), ("a.jsonl.gz:3", {"x": 2})]
    assert got[2][0] == "a.jsonl.gz:4" and isinstance(got[2][1], BadRow) and got[2][1].reason == "invalid_json"


def test_a_json_array_file_and_a_broken_one(tmp_path):
    (tmp_path / "ok.json").write_text(json.dumps([{"a": 1}, {"a": 2}]))
    assert rows_of(tmp_path / "ok.json") == [("ok.json:item 0", {"a": 1}), ("ok.json:item 1", {"a": 2})]
    (tmp_path / "bad.json").write_text('[\n{"a": 1},\n{"a": }\n]')
    [(location, bad)] = rows_of(tmp_path / "bad.json")
    assert location == "bad.json:3" and bad.reason == "invalid_json"


def test_an_unreadable_file_is_an_error_naming_it_and_the_fingerprint_follows_files(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ChatDataError, match=r"x\.parquet cannot be read"):
        rows_of(tmp_path / "x.parquet")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text("{}\n")
    (tmp_path / "d" / "notes.txt").write_text("ignored in a directory")
    files = list_files([ChatSourceConfig(paths=[str(tmp_path / "d")])], "sft_data")
    assert [f.url.rsplit("/", 1)[-1] for f in files] == ["a.jsonl"]
    before = fingerprint(files)
    (tmp_path / "d" / "a.jsonl").write_text("{}\n{}\n")
    assert fingerprint(list_files([ChatSourceConfig(paths=[str(tmp_path / "d")])], "sft_data")) != before
