"""bench/_common.py: the result line, WARC text, document shards and the alternating-rounds loop.

    .venv/bin/pytest -q tests/bench/test_common.py
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import os
import subprocess
import sys
import time
import types

import pytest

from lmfoundry.bench._common import (
    MIN_ROUNDS,
    alternating_rounds,
    clear_lru_caches,
    commit_doc_shards,
    median_chunk_rate,
    median_rate,
    pin_cores,
    print_result,
    rounds_arg,
    timed,
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


# ---------------------------------------------------------------- measurement rules (issue 18)


def _burn_cpu(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_timed_counts_the_cpu_of_a_waited_for_child():
    def fork_and_burn():
        pid = os.fork()
        if pid == 0:  # the child burns 0.3 s of CPU, then leaves without cleanup
            _burn_cpu(0.3)
            os._exit(0)
        os.waitpid(pid, 0)
        return "done"

    result, timing = timed(fork_and_burn)
    assert result == "done"
    assert timing.cpu_s >= 0.29  # the parent itself only waited
    assert timing.wall_s >= 0.29


def test_rounds_below_three_are_refused():
    assert rounds_arg("3") == MIN_ROUNDS == 3 and rounds_arg("7") == 7
    with pytest.raises(argparse.ArgumentTypeError, match="at least 3"):
        rounds_arg("2")


def test_median_rates():
    assert median_rate(100, [4.0, 1.0, 2.0]) == 50.0  # the median round (2 s), not the best (1 s)
    # (timed steps, seconds) per chunk; the all-warm-up chunk is left out
    assert median_chunk_rate([(0, 0.5), (2, 1.0), (4, 1.0), (4, 4.0)], work_per_step=10) == 20.0
    with pytest.raises(ValueError, match="no chunk"):
        median_chunk_rate([(0, 1.0)], 10)


def test_pin_cores_pins_the_process_and_its_children():
    script = (
        "import os, subprocess, sys\n"
        "from lmfoundry.bench._common import pin_cores, pin_one_core\n"
        "allowed = sorted(os.sched_getaffinity(0))\n"
        "assert pin_cores(99) == allowed\n"
        "core = pin_one_core()\n"
        "child = subprocess.run([sys.executable, '-c', 'import os; print(sorted(os.sched_getaffinity(0)))'], capture_output=True, text=True)\n"
        "print(core, allowed[0], child.stdout.strip())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip().split(maxsplit=2)
    assert out[0] == out[1] and out[2] == f"[{out[0]}]"
    with pytest.raises(ValueError, match="at least 1"):
        pin_cores(0)


def test_clear_lru_caches_empties_module_and_class_caches(monkeypatch):
    module = types.ModuleType("lmf_bench_planted.caches")
    calls = []

    @functools.lru_cache(maxsize=None)
    def square(x):
        calls.append(x)
        return x * x

    class Holder:
        @functools.lru_cache(maxsize=None)
        def twice(self, x):
            calls.append(-x)
            return 2 * x

    Holder.__module__ = module.__name__
    module.square, module.Holder = square, Holder
    monkeypatch.setitem(sys.modules, module.__name__, module)
    holder = Holder()
    square(3), square(3), holder.twice(4), holder.twice(4)
    assert calls == [3, -4]  # the second calls came from the caches
    assert clear_lru_caches(["lmf_bench_planted"]) == 2
    square(3), holder.twice(4)
    assert calls == [3, -4, 3, -4]  # computed again: the caches were empty
