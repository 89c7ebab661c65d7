"""bench/sft.py and bench/dpo.py at a tiny size: both sides train the same rows / pairs, and the
result line shows they did the same work: the first-step losses agree with TRL's (and, for
DPO, equal log 2, as policy == reference), the loss curves stay within 2 %, TRL's own
tokenization with our exported chat template gives our tokens and loss masks, and every round
reproduces its losses. Plus the small pieces' arithmetic on planted numbers.

    .venv/bin/pytest -q tests/bench/test_posttrain_bench.py
"""
from __future__ import annotations

import json
import math

import pytest

from lmfoundry.bench import _posttrain as pt
from lmfoundry.bench import dpo, sft

# a tiny model and few steps: the benchmark's machinery, not a measurement
TINY = [
    "--steps", "3", "--warmup", "1", "--rounds", "3", "--d-model", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
    "--vocab", "400", "--threads", "2", "--profile", "never",
]


@pytest.fixture(scope="module")
def worker():
    """One TRL worker process for both benchmarks (its imports take seconds)."""
    with pt.TrlWorker(threads=2) as w:
        yield w


def result_line(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_sft_bench_matches_trl_and_would_see_a_mask_that_crosses_conversations(tmp_path, worker, capsys):
    args = sft.parse([*TINY, "--batch", "2", "--seq-len", "128", "--vocab", "1024"])
    setup = sft.prepare(args, tmp_path)
    assert sft.run(args, tmp_path, worker, setup) == 0
    result = result_line(capsys)
    q = result["quality"]
    assert result["bench"] == "sft" and result["metric"] == "tokens_per_s" and result["baseline_name"] == "trl-sfttrainer"
    assert result["ours"] > 0 and result["baseline"] > 0 and result["ratio"] > 0
    assert result["n"] == 2 * 128 * 2  # batch x seq_len x timed steps
    assert len(q["loss_ours"]) == len(q["loss_trl"]) == 3
    assert q["first_loss_abs_diff"] < 1e-4 and q["first_loss_ok"]
    assert q["max_rel_curve_gap"] < 0.02 and q["curve_ok"]
    tokens = q["trl_tokenization"]
    assert tokens["conversations_in_rows"] > 3 * 2  # rows hold several conversations: packing is exercised
    assert tokens["same_tokens_and_labels"] == tokens["conversations_in_rows"]
    assert q["rounds_reproduce_losses"] == {"ours": True, "trl": True}
    assert len(q["seconds_ours"]["cpu_s"]) == len(q["seconds_trl"]["cpu_s"]) == 3
    assert result["settings"]["trl-sfttrainer"]["lr"] == result["settings"]["ours"]["lr"] == 2e-3
    # the same rows with plain 0..T-1 positions: TRL's attention then crosses conversations, and
    # the losses show it (this is what the agreement above rules out)
    crossing = {**setup.rows, "position_ids": [list(range(len(row))) for row in setup.rows["input_ids"]]}
    leaked = worker.call(sft.TRL + "trl_round", setup.hf_dir, crossing, args, setup.section_cfg, tmp_path / "crossing").losses
    assert max(abs(a - b) for a, b in zip(leaked, q["loss_ours"])) > 1e-3


def test_dpo_bench_starts_at_log2_on_both_sides(tmp_path, worker, capsys):
    args = dpo.parse([*TINY, "--batch", "2", "--seq-len", "160", "--pairs", "40", "--store", str(tmp_path / "no-store")])
    assert dpo.run(args, tmp_path, worker) == 0
    result = result_line(capsys)
    q = result["quality"]
    assert result["bench"] == "dpo" and result["baseline_name"] == "trl-dpotrainer" and result["ratio"] > 0
    assert abs(q["first_loss_ours"] - math.log(2)) < 1e-4 and abs(q["first_loss_trl"] - math.log(2)) < 1e-4
    assert q["first_loss_abs_diff"] < 1e-4 and q["max_rel_curve_gap"] < 0.02
    assert q["trl_tokenization"] == {"pairs": 6, "same_tokens_and_scored_positions": 6}
    assert q["rounds_reproduce_losses"] == {"ours": True, "trl": True}
    reward = q["reward_model"]
    assert reward["demo_store"]["available"] is False and "make demo" in reward["demo_store"]["why"]
    assert not (tmp_path / "no-store").exists()  # looking did not create a store
    assert set(reward["length_baseline_accuracy_bench_pairs"]) == {"train", "val"}
    assert result["n"] > 0 and result["settings"]["ours"]["beta"] == 0.1


def test_worker_reports_the_failure_of_a_call(worker):
    with pytest.raises(RuntimeError, match="--rounds must be at least 3"):
        worker.call("lmfoundry.bench.sft:parse", ["--rounds", "2"])
    assert worker.call("lmfoundry.bench.sft:parse", ["--steps", "5"]).steps == 5  # still serving


def test_arguments_that_leave_nothing_to_time_are_refused(capsys):
    for argv in (["--steps", "2", "--warmup", "2"], ["--warmup", "0"]):
        with pytest.raises(SystemExit):
            sft.parse(argv)
    assert "--warmup must be at least 1 and below --steps" in capsys.readouterr().err


def test_round_arithmetic_on_planted_clock_readings():
    # (wall, cpu) after 0..3 steps; warm-up 1: the timed steps run from reading 1 to reading 3
    fast = pt.Round(marks=[(0.0, 0.0), (5.0, 1.0), (6.0, 2.0), (7.0, 3.0)], losses=[3.0, 2.0, 1.0])
    slow = pt.Round(marks=[(0.0, 0.0), (5.0, 1.0), (9.0, 5.0), (13.0, 9.0)], losses=[3.0, 2.0, 1.0])
    middle = pt.Round(marks=[(0.0, 0.0), (5.0, 1.0), (7.0, 3.0), (9.0, 5.0)], losses=[3.0, 2.0, 1.0])
    assert fast.seconds(1, clock=1) == 2.0 and fast.seconds(1, clock=0) == 2.0 and slow.seconds(1, clock=1) == 8.0
    # 2 timed steps x 100 tokens: the median round (4 s) gives 50 tokens/s
    assert pt.median_rate([fast, slow, middle], warmup=1, work_per_step=100, clock=1) == 50.0
    assert pt.curve_gap([2.0, 1.0], [2.0, 1.01]) == (0.0, pytest.approx(0.01 / 1.01))
    with pytest.raises(ValueError, match="different lengths"):
        pt.curve_gap([1.0], [1.0, 2.0])


def test_reward_model_accuracy_is_read_from_the_demo_pipelines_committed_stage(tmp_path):
    from lmfoundry.infra.store import Store

    store = Store(str(tmp_path / "store"))
    assert "no committed reward_model stage" in pt.reward_model_stats(store.url)["why"]
    for version, accuracy in (("old", 0.5), ("new", 0.66)):
        out = store.open_for_write("reward_model", version)
        out.write_json("note.json", {})
        store.commit(out, {"stats": {"val_accuracy": accuracy, "length_baseline_accuracy": 0.44, "pairs": 2138}})
        store.set_ref("demo", "reward_model", version)
    stats = pt.reward_model_stats(store.url, "demo")
    assert stats["available"] is True and stats["version"] == "new"
    assert (stats["val_accuracy"], stats["length_baseline_accuracy"], stats["pairs"]) == (0.66, 0.44, 2138)
    assert pt.reward_model_stats(store.url, "other")["available"] is False
