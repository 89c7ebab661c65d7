"""Checkpoints written in the background (model/async_checkpoint.py) by the real run loop.

In-process Trainer runs (DeepSpeed on CPU, one rank): training goes on while a checkpoint is
still being written, the files are those of the step they name (a snapshot, not later weights),
COMPLETE.json comes last, and a write that fails leaves the previous checkpoint as the resume
point, from which the run finishes exactly as an unbroken one. Run:
.venv/bin/pytest -q tests/model/test_async_checkpoint.py (~40 s).
"""
from __future__ import annotations

import json
import threading

import pytest
import torch

from lmfoundry.infra.config import ModelConfig, PretrainConfig
from lmfoundry.infra.store import Store
from lmfoundry.model.async_checkpoint import host_snapshot
from tests.model.token_fixtures import commit_tokens, markov_tokens
from tests.model.conftest import one_rank_world

VOCAB, SEQ = 48, 16
MODEL = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with one_rank_world():
        root = tmp_path_factory.mktemp("ckpt")
        store = Store(str(root / "store"))
        ref = commit_tokens(store, markov_tokens(128, SEQ, VOCAB, seed=0), markov_tokens(16, SEQ, VOCAB, seed=1), VOCAB)
        yield store, ref, root


def trainer(world, name: str, resume_tag: str | None = None, **fields):
    from lmfoundry.model.train import Trainer, TrainJob

    store, ref, root = world
    dist = PretrainConfig.Distributed(zero_stage=1, peak_tflops=1.0)
    cfg = PretrainConfig(**{"steps": 6, "global_batch_size": 8, "warmup_steps": 2, "log_every": 1, "eval_every": 100, "checkpoint_every": 3, "distributed": dist, **fields})
    job = TrainJob(model=MODEL, pretrain=cfg, store_url=store.url, tokens=ref, work_dir=str(root / name), resume_tag=resume_tag)
    return Trainer(job)


def complete(t) -> list[str]:
    return sorted(p.parent.name for p in (t.checkpoints).glob("*/COMPLETE.json"))


def losses(t) -> dict[int, float]:
    records = [json.loads(line) for line in (t.work / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def states(t, tag: str) -> dict[str, torch.Tensor]:
    """Every tensor DeepSpeed wrote for a checkpoint (model and optimizer files), by file and key."""
    out = {}
    for path in sorted((t.checkpoints / tag).glob("*.pt")):
        if path.name.startswith("rng_"):
            continue
        flat = torch.load(path, map_location="cpu", weights_only=False)

        def walk(obj, prefix):
            if isinstance(obj, torch.Tensor):
                out[prefix] = obj
            elif isinstance(obj, dict):
                for k, v in obj.items():
                    walk(v, f"{prefix}/{k}")
            elif isinstance(obj, (list, tuple)):
                for i, v in enumerate(obj):
                    walk(v, f"{prefix}/{i}")

        walk(flat, path.name)
    return out


def test_training_goes_on_while_the_checkpoint_is_written_and_it_holds_its_own_step(world):
    """The writer is held until step 5 runs: the step-3 checkpoint was taken (save returned) but
    had no COMPLETE.json while steps 4 and 5 trained; once released, its files equal a blocking
    run's step-3 files exactly (the snapshot did not pick up the later steps)."""
    sync = trainer(world, "sync", async_checkpoints=False)
    sync.run()
    t = trainer(world, "async")
    gate, seen = threading.Event(), {}
    finish = t.writer.finish_checkpoint

    def held(*args, **kwargs):  # step 3's end (markers, COMPLETE.json) queues behind the gate
        if not gate.is_set():
            t.writer.submit(gate.wait, 120)  # released at step 5 (a timeout rather than a hang if not)
        finish(*args, **kwargs)

    t.writer.finish_checkpoint = held

    def during_step_5(module, args):
        if t.step == 4 and not seen:
            seen.update(last=t.last_checkpoint, complete=complete(t), files=sorted(p.name for p in (t.checkpoints / "step-0000003").glob("*")))
            gate.set()

    t.engine.module.norm.register_forward_pre_hook(during_step_5)
    t.run()
    assert seen["last"] == "step-0000003" and seen["complete"] == []  # step 3 saved, not yet committed, training on
    assert "COMPLETE.json" not in seen["files"]
    assert complete(t) == complete(sync) == ["step-0000003", "step-0000006"]
    assert not list(t.checkpoints.glob("*/WRITTEN.*")) and not list(t.checkpoints.glob("*/*.tmp"))
    assert losses(t) == losses(sync)
    ours, theirs = states(t, "step-0000003"), states(sync, "step-0000003")
    assert ours.keys() == theirs.keys() and len(ours) > 5
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    marker = json.loads((t.checkpoints / "step-0000003" / "COMPLETE.json").read_text())
    assert marker["step"] == 3 and marker["sample"] == 3 * 8 and marker["loss"] == pytest.approx(losses(sync)[3])
    assert t.save_stall_s > 0


def test_a_failed_write_keeps_the_previous_checkpoint_and_the_run_resumes_exactly(world, monkeypatch):
    reference = trainer(world, "unbroken", steps=9)
    reference.run()
    monkeypatch.setenv("LMF_FAULT", "pretrain:checkpoint_write:6:fail")  # the writer dies inside step 6's checkpoint
    broken = trainer(world, "broken", steps=9)
    with pytest.raises(RuntimeError, match=r"writing a checkpoint failed in the background.*injected fault at pretrain:checkpoint_write:6"):
        broken.run()
    assert complete(broken) == ["step-0000003"]  # step 6 has files but no COMPLETE.json; step 9 was never taken
    assert (broken.checkpoints / "step-0000006").exists() and not (broken.checkpoints / "step-0000009").exists()
    monkeypatch.delenv("LMF_FAULT")
    resumed = trainer(world, "broken", resume_tag="step-0000003", steps=9)
    assert resumed.step == 3
    resumed.run()
    assert complete(resumed) == ["step-0000003", "step-0000006", "step-0000009"]
    assert losses(resumed) == pytest.approx(losses(reference), abs=1e-6) and sorted(losses(resumed)) == list(range(1, 10))


def test_host_snapshot_is_a_deep_copy():
    live = {"w": torch.ones(3), "groups": [{"lr": 0.1, "params": [0, 1]}], "shape": (torch.zeros(2), 4), "size": torch.Size([2, 3])}
    snap = host_snapshot(live)
    assert type(snap["size"]) is torch.Size and snap["size"].numel() == 6  # ZeRO-3 checkpoints store param shapes as torch.Size
    live["w"].add_(1)
    live["groups"][0]["lr"] = 0.5
    live["shape"][0].fill_(7)
    assert torch.equal(snap["w"], torch.ones(3)) and snap["groups"][0]["lr"] == 0.1 and torch.equal(snap["shape"][0], torch.zeros(2))
    assert snap["shape"][1] == 4


def test_a_time_interval_adds_checkpoints_on_check_steps(world):
    """checkpoint_every_s elapsed at every step: a checkpoint at each check step (every 2), none between."""
    t = trainer(world, "timed", checkpoint_every=100, checkpoint_every_s=1e-9, divergence_check_every=2, log_every=100)
    t.run()
    assert complete(t) == ["step-0000002", "step-0000004", "step-0000006"]
    quiet = trainer(world, "untimed", checkpoint_every=100, divergence_check_every=2, log_every=100)
    quiet.run()
    assert complete(quiet) == ["step-0000006"]  # the interval off (0): only the final one
