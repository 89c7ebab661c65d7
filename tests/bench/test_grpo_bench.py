"""bench/grpo.py at a toy size: both sides run GRPO steps on the same prompts (TRL's own chat
templating gives our prompt ids), sample the same number of response tokens per step, start
on-policy (KL 0 at the first step), and the result line carries both sides' settings and every
round's seconds.

    .venv/bin/pytest -q tests/bench/test_grpo_bench.py
"""
from __future__ import annotations

import json

import pytest
from lmfoundry.bench import _posttrain as pt
from lmfoundry.bench import grpo

TINY = [
    "--steps", "2", "--warmup", "1", "--rounds", "3", "--d-model", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
    "--vocab", "400", "--seq-len", "128", "--prompts", "2", "--group", "2", "--max-new-tokens", "4", "--threads", "1",
]


def test_grpo_bench_runs_both_sides_on_the_same_work(tmp_path, capsys):
    args = grpo.parse(TINY)
    setup = grpo.prepare(args, tmp_path)
    assert len(setup.order) == 2 * 2 and all(0 <= i < len(setup.prompts) for i in setup.order)
    assert setup.target not in setup.stops and setup.pad not in setup.stops
    with pt.TrlWorker(threads=1) as worker:
        assert grpo.run(args, tmp_path, worker, setup) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    q = result["quality"]
    assert result["bench"] == "grpo" and result["metric"] == "rollout_tokens_per_s" and result["baseline_name"] == "trl-grpotrainer"
    assert result["ours"] > 0 and result["baseline"] > 0 and result["ratio"] > 0
    assert q["trl_prompt_ids_equal_ours"] is True
    # 2 prompts x group 2 x at most 4 new tokens per step, on both sides
    for side in ("ours", "trl"):
        assert len(q["tokens_per_step"][side]) == 2 and all(4 <= t <= 16 for t in q["tokens_per_step"][side])
        assert q["first_step_kl"][side] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
        assert len(q[f"seconds_{side}"]["cpu_s"]) == 3
    assert result["n"] == 3 * q["tokens_per_step"]["ours"][1]  # the timed step of each of 3 rounds
    assert set(q["ours_step_share"]) == {"generate", "score", "train"} and sum(q["ours_step_share"].values()) == pytest.approx(1.0, abs=0.01)
    ours, trl = result["settings"]["ours"], result["settings"]["trl-grpotrainer"]
    for key in ("group_size", "max_new_tokens", "lr", "beta", "rollouts_per_step", "precision"):
        assert ours[key] == trl[key]
    assert ours["group_size"] == 2 and ours["max_new_tokens"] == 4 and ours["rollouts_per_step"] == 4


def test_parse_refuses_a_group_of_one_and_too_few_rounds():
    with pytest.raises(SystemExit):
        grpo.parse(["--group", "1"])
    with pytest.raises(SystemExit):
        grpo.parse(["--rounds", "2"])
    with pytest.raises(SystemExit):
        grpo.parse(["--steps", "2", "--warmup", "2"])


def test_ppo_config_is_one_grpo_update_per_rollout_batch():
    cfg = grpo.ppo_config(grpo.parse(["--prompts", "3", "--group", "4", "--beta", "0.1"]))
    assert cfg.advantage == "grpo" and cfg.group_size == 4 and cfg.rollout_batch_size == cfg.global_batch_size == 12
    assert cfg.updates_per_iteration == 1 and cfg.kl_in_loss and cfg.kl_coef == 0.1 and cfg.kl_estimator == "k3"
    assert cfg.temperature == 1.0 and not cfg.reward_normalize and cfg.reward_clip == 0 and cfg.missing_eos_penalty == 0
