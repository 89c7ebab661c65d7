"""Divergence caught before it eats the good checkpoints (issue 16 item 5).

CheckpointSync keeps a checkpoint marked PROTECTED.json through rotation; a pretrain run whose
learning rate is far too high stops at a loss / grad-norm spike naming the protected checkpoint,
or rolls back to it and finishes. Launches cost ~20-40 s each on 2 cores.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmfoundry.infra.store import Store
from lmfoundry.tasks.train.launch import CheckpointSync, committed_checkpoints, protected_checkpoints


def local_checkpoint(work: Path, step: int, protected: bool = False) -> str:
    tag = f"step-{step:07d}"
    path = work / "checkpoints" / tag
    path.mkdir(parents=True)
    (path / "weights.bin").write_bytes(bytes([step]) * 8)
    if protected:
        (path / "PROTECTED.json").write_text(json.dumps({"step": step + 1, "metric": "loss"}))
    (path / "COMPLETE.json").write_text(json.dumps({"step": step}))
    return tag


def test_rotation_keeps_a_protected_checkpoint(tmp_path):
    store = Store(str(tmp_path / "store"))
    out = store.open_for_write("pretrain", "v1")
    work = tmp_path / "work"
    sync = CheckpointSync(out, work, keep=1)
    a = local_checkpoint(work, 5)
    sync.sync()
    assert committed_checkpoints(out) == [a] and protected_checkpoints(out) == set()
    # the trainer marks the committed checkpoint after a spike, then goes on (a rollback) and saves more
    (work / "checkpoints" / a / "PROTECTED.json").write_text(json.dumps({"step": 7}))
    b = local_checkpoint(work, 10)
    sync.sync()
    c = local_checkpoint(work, 15)
    sync.sync()
    assert committed_checkpoints(out) == [a, c]  # b rotated away, a kept
    assert protected_checkpoints(out) == {a}
    assert out.read_bytes(f"checkpoints/{a}/weights.bin") == bytes([5]) * 8
    assert (work / "checkpoints" / a).exists() and not (work / "checkpoints" / b).exists()
    # a new attempt of the stage sees the protection in the store and still keeps a
    again = CheckpointSync(out, tmp_path / "work2", keep=1)
    d = local_checkpoint(tmp_path / "work2", 20)
    again.sync()
    assert again.protected == {a} and committed_checkpoints(out) == [a, d]
    # a checkpoint uploaded with its marker already in place is protected as well
    e = local_checkpoint(tmp_path / "work2", 25, protected=True)
    again.sync()
    local_checkpoint(tmp_path / "work2", 30)
    again.sync()
    assert committed_checkpoints(out) == [a, e, "step-0000030"]


# ---------------------------------------------------------------------- real runs of the pretrain stage

VOCAB, SEQ, STEPS, EVERY = 48, 16, 40, 5


def diverging(**stability):
    """The learning rate ramps (linear warm-up) to 2.0 by step 40 without clipping: training is
    fine at first, then the loss climbs and the gradient norm explodes (3.9 -> 17 and 1.3 -> 9
    over 40 steps when nothing intervenes)."""
    from lmfoundry.infra.config import ModelConfig, PipelineConfig, PretrainConfig

    pretrain = PretrainConfig(
        steps=STEPS, global_batch_size=8, lr=30.0, min_lr=0.0, warmup_steps=600, grad_clip=0.0, log_every=1, eval_every=100,
        checkpoint_every=EVERY, distributed=PretrainConfig.Distributed(zero_stage=1, keep_checkpoints=1),
        stability=dict(window=10, sigmas=4.0, min_ratio=3.0, warmup_steps=5, min_history=5, **stability),
    )
    return PipelineConfig(model=ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2), pretrain=pretrain)


@pytest.fixture
def token_inputs(store):
    from tests.model.token_fixtures import commit_tokenizer, commit_tokens, markov_tokens

    return [commit_tokens(store, markov_tokens(128, SEQ, VOCAB, seed=0), markov_tokens(16, SEQ, VOCAB, seed=1), VOCAB), commit_tokenizer(store, VOCAB)]


def stage_dir(store, cfg, refs):
    from tests.tasks.train.test_pretrain import SPEC

    return store.open_for_write("pretrain", SPEC.version(cfg, [r.digest for r in refs]))


def test_a_spike_stops_training_and_protects_the_last_checkpoint(store, token_inputs):
    import re

    from lmfoundry.infra.stage import run_stage
    from lmfoundry.tasks.train.pretrain import PretrainError
    from tests.tasks.train.test_pretrain import SPEC

    cfg = diverging()
    with pytest.raises(PretrainError, match=r"training is diverging: (loss|grad_norm) \S+ at step \d+ is above its threshold") as caught:
        run_stage(store, SPEC, cfg, token_inputs)
    message = str(caught.value)
    spike_step = int(re.search(r"at step (\d+)", message).group(1))
    protected = f"step-{(spike_step - 1) // EVERY * EVERY:07d}"  # the newest checkpoint before the spike
    assert spike_step > EVERY and f"checkpoint {protected} (the last before the spike) is protected" in message
    assert "lower pretrain.lr" in message
    out = stage_dir(store, cfg, token_inputs)
    assert committed_checkpoints(out) == [protected] and protected_checkpoints(out) == {protected}
    marker = json.loads(out.read_bytes(f"checkpoints/{protected}/PROTECTED.json"))
    assert marker["step"] == spike_step and marker["value"] > marker["threshold"]
    assert not store.is_committed("pretrain", out.version)


def test_rollback_resumes_from_the_protected_checkpoint_and_finishes(store, token_inputs):
    from lmfoundry.infra.stage import run_stage
    from tests.tasks.train.test_pretrain import SPEC

    cfg = diverging(action="rollback", lr_factor=0.1, max_rollbacks=3)
    outcome = run_stage(store, SPEC, cfg, token_inputs)
    assert outcome.status == "ran" and outcome.stats["steps"] == STEPS
    reader = store.reader(outcome.ref)
    records = [json.loads(line) for line in reader.read_bytes("metrics.jsonl").decode().splitlines()]
    rollbacks = [r for r in records if r["kind"] == "rollback"]
    assert 1 <= len(rollbacks) <= 3, rollbacks
    for n, rb in enumerate(rollbacks, 1):
        assert rb["step"] == int(rb["to"].split("-")[1]) < rb["spike_step"] and rb["lr_scale"] == pytest.approx(0.1**n)  # compounding
    rb, last = rollbacks[0], rollbacks[-1]
    protected = {r["to"] for r in rollbacks}
    files = reader.files()
    kept = {f.split("/")[1] for f in files if f.startswith("checkpoints/") and f.endswith("/COMPLETE.json")}
    assert kept == protected | {f"step-{STEPS:07d}"}  # keep_checkpoints=1, plus the protected ones
    assert all(f"checkpoints/{tag}/PROTECTED.json" in files for tag in protected)
    # the batches between the checkpoint and the spike were skipped, not trained again
    sample_at_checkpoint = json.loads(reader.read_bytes(f"checkpoints/{rb['to']}/COMPLETE.json"))["sample"]
    assert rb["skipped_to_sample"] == sample_at_checkpoint + (rb["spike_step"] - rb["step"]) * 8
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))  # rolled-back steps were logged again
    # after the last rollback the schedule runs at lr_scale of its rate: lr 30 x step / 600 x scale ...
    assert all(r["lr"] == pytest.approx(30.0 * r["step"] / 600 * last["lr_scale"]) for r in train if r["step"] > last["step"])
    # ... and so does the optimizer: the final checkpoint's schedule holds the scaled base rates
    [states] = [f for f in files if f.startswith(f"checkpoints/step-{STEPS:07d}/") and f.endswith("mp_rank_00_model_states.pt")]
    saved = torch.load(reader.local_path(states), map_location="cpu", weights_only=False)
    assert saved["lr_scheduler"]["base_lrs"] == pytest.approx([30.0 * last["lr_scale"]] * 2)
    assert saved["rollbacks"] == len(rollbacks) and saved["lr_scale"] == pytest.approx(last["lr_scale"])
    assert math.isfinite(train[-1]["loss"]) and train[-1]["loss"] < 4.0, train[-1]
