"""bench/scale.py at tiny sizes: the result line has its fields, and the planted exact and near
duplicates are found at every size (on a small WARC written here: hermetic).

    .venv/bin/pytest -q tests/bench/test_scale_bench.py
"""
from __future__ import annotations

import json
import random

from lmfoundry.bench import scale as bench
from tests.bench.test_common import write_warc

WORDS = ("river harbor engine library market bridge winter forest teacher village morning letter "
         "garden window kitchen mountain painter festival quiet narrow ancient careful distant").split()


def page(rng: random.Random, n: int) -> bytes:
    paras = "".join(f"<p>{' '.join(rng.choice(WORDS) for _ in range(24))}.</p>" for _ in range(n))
    return f"<html><body><article>{paras}</article></body></html>".encode()


def test_generated_corpus_plants_what_it_says(tmp_path):
    rng = random.Random(1)
    paras = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(200)]
    planted = bench.generate_corpus(tmp_path, 400, paras, seed=3, near_share=0.1, exact_share=0.05, docs_per_file=150)
    docs = [json.loads(line) for f in sorted(tmp_path.glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert len(docs) == 400 and len(list(tmp_path.glob("*.jsonl"))) == 3
    texts = {d["id"]: d["text"] for d in docs}
    normal = {" ".join(t.split()) for i, t in texts.items() if i not in planted["exact"]}
    assert planted["exact"] and all(" ".join(texts[i].split()) in normal for i in planted["exact"])
    assert planted["near"] and all("edited" in texts[i] for i in planted["near"])


def test_scale_bench_reports_per_size_costs_and_finds_the_planted_duplicates(tmp_path, capsys):
    rng = random.Random(0)
    write_warc(tmp_path / "pages.warc.gz", [(f"http://site/{i}", "text/html", page(rng, 12)) for i in range(20)])
    code = bench.main(["--sizes", "300,600", "--rounds", "3", "--data", str(tmp_path), "--work", str(tmp_path / "work"),
                       "--shard-mb", "1", "--docs-per-file", "100", "--near-share", "0.05", "--exact-share", "0.03"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["bench"] == "scale" and result["n"] == [300, 600]
    assert result["ratio"] > 0 and result["ours"] > 0 and result["baseline"] > 0
    quality = result["quality"]
    assert quality["cpu_per_wall"] > 0 and set(quality["peak_rss_mb"]) == {"300", "600"}
    for size in ("300", "600"):
        recall = quality["recall"][size]
        assert recall["planted_near"] > 0 and recall["planted_exact"] > 0
        assert recall["near"] == 1.0 and recall["exact"] == 1.0
        assert set(quality["per_stage"][size]) == {"ingest", "exact_dedup", "near_dedup"}
        assert all(s["us_per_doc"] > 0 and s["peak_rss_mb"] > 0 for s in quality["per_stage"][size].values())
    assert result["settings"]["ours"]["task_runner"] == "processes" and result["settings"]["ours"]["rounds"] == 3


def test_scale_bench_compares_with_a_loopback_dask_cluster(tmp_path, capsys):
    rng = random.Random(2)
    write_warc(tmp_path / "pages.warc.gz", [(f"http://site/{i}", "text/html", page(rng, 12)) for i in range(12)])
    code = bench.main(["--sizes", "200", "--rounds", "3", "--data", str(tmp_path), "--work", str(tmp_path / "work"),
                       "--shard-mb", "1", "--docs-per-file", "50", "--near-share", "0.05", "--exact-share", "0.03", "--dask", "compare"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    quality = result["quality"]
    assert code == 0 and result["dask_wall_ratio"] == quality["dask_wall_vs_local"]["200"] > 0
    assert quality["dask_cpu_vs_local"]["200"] > 0
    assert quality["dask"]["200"]["recall"] == quality["recall"]["200"]  # the same work on both sides
    assert quality["recall"]["200"]["near"] == 1.0 and quality["recall"]["200"]["exact"] == 1.0
