"""model/train.py under real launchers on CPU (gloo): ranks and ZeRO stages give the same training.

Each launch costs ~20-40 s here (process start, DeepSpeed import), so one reference run is shared.
The model is a small mixture-of-experts, so routing, the balance loss and expert-load metrics go
through DeepSpeed's gradient reduction too.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmfoundry.infra.config import ModelConfig, PretrainConfig
from lmfoundry.infra.store import Store
from lmfoundry.model.train import TrainJob
from lmfoundry.model.engine import batch_split, deepspeed_config, lr_at
from lmfoundry.tasks.train.pretrain import free_port, launch_command, launch_env
from tests.model.token_fixtures import commit_tokens, markov_tokens, read_metrics

REPO = Path(__file__).resolve().parents[2]
VOCAB, SEQ = 64, 16
MODEL = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, moe_experts=4, moe_top_k=2, moe_shared_experts=1)
STEPS = 6


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("store")))
    ref = commit_tokens(store, markov_tokens(96, SEQ, VOCAB, seed=0), markov_tokens(24, SEQ, VOCAB, seed=1), VOCAB)
    return store, ref


def train(tokens, work: Path, *, procs: int, zero: int, micro: int, launcher: str = "torchrun") -> Path:
    store, ref = tokens
    dist = PretrainConfig.Distributed(launcher=launcher, procs=procs, zero_stage=zero, micro_batch_size=micro)
    cfg = PretrainConfig(steps=STEPS, global_batch_size=8, lr=3e-3, warmup_steps=2, log_every=1, eval_every=3, checkpoint_every=3, distributed=dist)
    work.mkdir(parents=True)
    job = TrainJob(model=MODEL, pretrain=cfg, store_url=store.url, tokens=ref, work_dir=str(work))
    (work / "job.json").write_text(job.model_dump_json())
    proc = subprocess.run(
        launch_command(dist, work / "job.json", free_port()), env=launch_env(dist), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return work


@pytest.fixture(scope="module")
def reference(tokens, tmp_path_factory):
    """One rank, no ZeRO, two accumulated micro batches of 4 = global batch 8."""
    return train(tokens, tmp_path_factory.mktemp("ref") / "work", procs=1, zero=0, micro=4)


def curves(work: Path) -> tuple[list[float], list[float]]:
    records = read_metrics(work / "metrics.jsonl")
    return [r["loss"] for r in records if r["kind"] == "train"], [r["val_loss"] for r in records if r["kind"] == "val"]


def assert_same_training(a: Path, b: Path) -> None:
    (train_a, val_a), (train_b, val_b) = curves(a), curves(b)
    assert len(train_a) == len(train_b) == STEPS and len(val_a) == len(val_b) == 2
    assert max(abs(x - y) for x, y in zip(train_a + val_a, train_b + val_b)) < 1e-4, (train_a, train_b)
    assert train_a[-1] < train_a[0]  # it did learn
    weights_a, weights_b = load_file(str(a / "final/model.safetensors")), load_file(str(b / "final/model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    assert max((weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a) < 1e-4


def test_two_ranks_zero2_match_one_rank(tokens, reference, tmp_path):
    two = train(tokens, tmp_path / "work", procs=2, zero=2, micro=0)
    assert_same_training(reference, two)


def test_zero3_matches_zero0(tokens, reference, tmp_path):
    zero3 = train(tokens, tmp_path / "work", procs=1, zero=3, micro=4)
    assert_same_training(reference, zero3)


def test_metrics_and_checkpoints_of_a_run(reference):
    records = read_metrics(reference / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for r in steps:
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
        assert len(r["activations"]) == MODEL.n_layers and all(a["std"] > 0 for a in r["activations"])
        loads = torch.tensor(r["expert_load"])
        assert loads.shape == (MODEL.n_layers, MODEL.moe_experts) and torch.allclose(loads.sum(-1), torch.ones(MODEL.n_layers))
        assert r["aux"] >= 0.99
    vals = [r for r in records if r["kind"] == "val"]
    assert all(math.isclose(v["val_ppl"], math.exp(v["val_loss"]), rel_tol=1e-9) and v["unigram_ppl"] > 1 for v in vals)
    assert vals[0]["val_tokens"] == 24 * SEQ  # the whole val split, every target scored once
    for step in (3, 6):
        tag = reference / "checkpoints" / f"step-{step:07d}"
        assert (tag / "COMPLETE.json").exists() and (tag / "rng_rank00000.pt").exists()
    assert (reference / "DONE.json").exists()
    # the MFU's FLOP convention beside every number; the whole-run rate counts evaluation and
    # checkpoint time the interval rates leave out, so it cannot exceed the fastest interval
    done = json.loads((reference / "DONE.json").read_text())
    assert all(r["mfu_flops"].startswith("6N + 12*L*T*d") and r["tokens_per_s_wall"] > 0 for r in steps)
    assert 0 < done["tokens_per_s_wall"] < max(r["tokens_per_s"] for r in steps)
    assert math.isclose(done["mfu_wall"], done["flops_per_token"] * done["tokens_per_s_wall"] / 1e12)  # cpu: nominal 1 TFLOP/s
    fast = done["fast_path"]
    assert (fast["peak_tflops"], fast["precision"], fast["tf32"], fast["compiled_blocks"]) == (1.0, "fp32", False, 0)
    assert "nominal" in fast["peak_source"] and fast["attention"].startswith("auto") and "causal masking not halved" in fast["flop_convention"]


def optimizer_lrs(checkpoint: Path) -> list[float]:
    """The learning rate of every param group of the optimizer DeepSpeed saved (ZeRO-0: in the
    model states file), i.e. the rate it applies at its next step."""
    [states] = checkpoint.glob("mp_rank_*_model_states.pt")
    saved = torch.load(states, map_location="cpu", weights_only=False)
    return [group["lr"] for group in saved["optimizer"]["param_groups"]]


def test_logged_learning_rate_is_the_optimizers_own(reference):
    """A checkpoint after step k holds the optimizer as it will run step k + 1: its learning
    rate must be the one logged for step k + 1 (and differ from step k's, so an off-by-one in
    the log would show)."""
    logged = {r["step"]: r["lr"] for r in read_metrics(reference / "metrics.jsonl") if r["kind"] == "train"}
    checked = 0
    for tag in sorted((reference / "checkpoints").glob("step-*")):
        step = int(tag.name.split("-")[1])
        if step + 1 not in logged:
            continue  # the final checkpoint: no later step was logged
        lrs = optimizer_lrs(tag)
        assert len(lrs) == 2 and lrs[0] == lrs[1]  # decayed and plain groups follow one schedule
        assert logged[step + 1] == pytest.approx(lrs[0], rel=1e-12)
        assert logged[step] != pytest.approx(lrs[0], rel=1e-6)
        checked += 1
    assert checked >= 1  # the step-3 checkpoint of a 6-step run
    # the logged rates have the configured shape: warm up to lr (3e-3) in 2 steps, then decay
    rates = [logged[step] for step in range(1, STEPS + 1)]
    assert rates[0] < rates[1] == pytest.approx(3e-3) == rates[2] and rates[2] > rates[3] > rates[4] > rates[5]


def test_learning_rate_schedule():
    cfg = PretrainConfig(steps=100, lr=1e-3, min_lr=1e-5, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(100, cfg) == pytest.approx(1e-5) and lr_at(500, cfg) == pytest.approx(1e-5)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 120))


def test_batch_split_and_deepspeed_config():
    assert batch_split(16, 2, 0) == (8, 1)
    assert batch_split(16, 2, 2) == (2, 4)
    with pytest.raises(ValueError, match="not divisible by 3 ranks"):
        batch_split(16, 3, 0)
    with pytest.raises(ValueError, match="micro_batch_size 3"):
        batch_split(16, 2, 3)
    dist = PretrainConfig.Distributed(zero_stage=2, offload_optimizer=True, micro_batch_size=2)
    ds = deepspeed_config(PretrainConfig(global_batch_size=16, precision="bf16", distributed=dist), world_size=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 2, 4)
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 1.0
    assert not ds["optimizer"]["params"]["torch_adam"]  # offload needs DeepSpeed's CPU Adam
    assert deepspeed_config(PretrainConfig(), 1)["optimizer"]["params"]["torch_adam"]


def test_launch_commands():
    job = "/w/job.json"
    ds = launch_command(PretrainConfig.Distributed(procs=2), job, 29500)
    assert ds[1:] == ["-u", "-m", "deepspeed.launcher.runner", "--master_port", "29500", "--num_gpus", "2", "--module", "lmfoundry.model.train", "--job", job]
    multi = launch_command(PretrainConfig.Distributed(procs=8, hostfile="/etc/hosts.ds", accelerator="cuda", backend="nccl", work_dir="/shared/lmf"), job, 29500)
    assert multi[multi.index("--hostfile") + 1] == "/etc/hosts.ds"
    torchrun = launch_command(PretrainConfig.Distributed(launcher="torchrun", procs=2), job, 0)
    assert torchrun[1:] == ["-u", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmfoundry.model.train", "--job", job]
    env = launch_env(PretrainConfig.Distributed(procs=2, cpu_threads=3))
    assert env["OMP_NUM_THREADS"] == "3" and env["DS_ACCELERATOR"] == "cpu"
    assert launch_env(PretrainConfig.Distributed(procs=2, cpu_threads=0))["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    gpu = launch_env(PretrainConfig.Distributed(accelerator="cuda"))
    assert gpu["DS_ACCELERATOR"] == "cuda" and gpu.get("OMP_NUM_THREADS") == os.environ.get("OMP_NUM_THREADS")


def test_gpu_benchmark_script_runs_tiny_on_cpu():
    # a fresh process picks its own rendezvous port: an earlier test may have started a one-rank
    # world in this pytest process, whose MASTER_PORT (still listening) the child must not inherit
    rendezvous = {"MASTER_PORT", "MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in rendezvous} | {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "bench/gpu_pretrain.py", "--smoke"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "gpu_pretrain" and result["ours"] > 0 and result["baseline"] > 0
    assert result["quality"]["same_start_loss"] and result["quality"]["loss_falls"]
    assert result["quality"]["flops_per_token"] > 6 * result["quality"]["parameters"] * 0.5
