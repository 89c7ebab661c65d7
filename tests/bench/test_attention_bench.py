"""bench/attention.py at a tiny size: the result line, a row per length with both ratios, the
crossover fields, and a loss gap from two models trained on the WARC bytes.

    .venv/bin/pytest -q tests/bench/test_attention_bench.py
"""
from __future__ import annotations

import json

import pytest
import torch

from lmfoundry.bench import attention as bench


def test_attention_bench_reports_every_length_and_the_loss_gap(capsys):
    threads = torch.get_num_threads()
    try:  # two threads: a one-thread run pins the process to a core, which would outlive it here
        code = bench.main([
            "--lengths", "64,128", "--d-model", "32", "--heads", "2", "--bucket-size", "16", "--hashes", "2", "--long-hashes", "1",
            "--long-from", "128", "--rounds", "3", "--threads", "2", "--loss-steps", "8", "--loss-batch", "4", "--loss-bucket", "8",
            "--loss-d-model", "32", "--loss-val-rows", "8", "--loss-docs", "40",
        ])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["bench"] == "attention" and result["baseline_name"] == "dense-sdpa"
    rows = result["per_length"]
    assert [r["seq_len"] for r in rows] == [64, 128] and [r["lsh_hashes"] for r in rows] == [2, 1]
    for r in rows:
        assert r["lsh_s"] > 0 and r["dense_s"] > 0 and r["lsh_peak_mb"] > 0 and r["dense_peak_mb"] > 0
        assert r["time_ratio"] == pytest.approx(r["lsh_s"] / r["dense_s"], rel=0.02)
        assert len(r["rounds_s"]["lsh"]) == len(r["rounds_s"]["dense"]) == len(r["rounds_s"]["dense_masked"]) == 3
        assert r["memory_ratio_masked"] == pytest.approx(r["lsh_peak_mb"] / r["dense_masked_peak_mb"], rel=0.05)
    assert result["ours"] == rows[-1]["lsh_s"] and result["baseline"] == rows[-1]["dense_s"]
    assert set(result["crossover"]) == {"time", "memory", "memory_vs_masked"}
    loss = result["quality"]["loss"]
    for side in ("dense", "lsh"):
        assert loss[side]["last_train_loss"] < loss[side]["first_train_loss"]  # both learned something
        assert loss[side]["held_out_loss"] < 5.6  # below a uniform guess over 256 bytes (ln 256 = 5.55) + noise
    assert loss["gap_held_out"] == pytest.approx(loss["lsh"]["held_out_loss"] - loss["dense"]["held_out_loss"], abs=1e-3)


def test_peak_bytes_sees_a_planted_allocation():
    def allocate():
        block = torch.empty(4 * 2**20, dtype=torch.uint8)  # 4 MiB, freed on return
        block.fill_(1)

    assert 4 * 2**20 <= bench.peak_bytes(allocate) < 5 * 2**20


def test_bad_lengths_are_refused_naming_the_flag():
    with pytest.raises(SystemExit):
        bench.main(["--lengths", "1k"])
