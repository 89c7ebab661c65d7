"""No host reads inside a training step (model/train.py + model/step_checks.py), checks every N steps.

Real Trainer runs (a DeepSpeed engine on CPU, a world of one rank in this process) on a tiny
pretraining job. A dispatch mode counts every operator that reads a tensor back to Python
(``aten._local_scalar_dense``: .item(), float(), bool() of a tensor) and ``Tensor.tolist`` calls,
tagged with the step they happen in and with who asked: our code (lmfoundry) or a library. The
libraries' own reads are listed, not forbidden: torch's Adam reads its step counter (a CPU
tensor by design, no device sync) and DeepSpeed's ZeRO-1/2 optimizer checks the gradient norm
for inf/NaN before clipping. Run: .venv/bin/pytest -q tests/model/test_step_sync.py (~30 s).
"""
from __future__ import annotations

import json
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmfoundry.infra.config import ModelConfig, PretrainConfig
from lmfoundry.infra.store import Store
from lmfoundry.model.step_checks import DivergenceError
from tests.model.token_fixtures import commit_tokens, markov_tokens
from tests.model.conftest import one_rank_world

REPO = str(Path(__file__).resolve().parents[2])
VOCAB, SEQ = 48, 16
MODEL = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with one_rank_world():
        root = tmp_path_factory.mktemp("sync")
        store = Store(str(root / "store"))
        ref = commit_tokens(store, markov_tokens(128, SEQ, VOCAB, seed=0), markov_tokens(16, SEQ, VOCAB, seed=1), VOCAB)
        yield store, ref, root


def trainer(world, name: str, **fields):
    from lmfoundry.model.train import Trainer, TrainJob

    store, ref, root = world
    dist = PretrainConfig.Distributed(zero_stage=fields.pop("zero_stage", 0), peak_tflops=1.0)
    cfg = PretrainConfig(**{"steps": 8, "global_batch_size": 8, "warmup_steps": 2, "distributed": dist, **fields})
    job = TrainJob(model=MODEL, pretrain=cfg, store_url=store.url, tokens=ref, work_dir=str(root / name))
    return Trainer(job)


def origin() -> str:
    """"ours" when the innermost caller outside torch (and this file) is lmfoundry code, else "library"."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if "/torch/" in name or name == __file__:
            continue
        return "ours" if name.startswith(REPO) and "/.venv/" not in name else "library"
    return "library"


class HostReads(TorchDispatchMode):
    """Counts host reads, keyed by (phase, step, origin): ("step", n) inside step_on_device of
    step n, ("after", n) in the loop after step n (checks, logging, validation, checkpoints)."""

    def __init__(self, t):
        super().__init__()
        self.t, self.phase, self.reads = t, "after", Counter()

    def key(self):
        return (self.phase, self.t.step + (1 if self.phase == "step" else 0), origin())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads[self.key()] += 1
        return func(*args, **(kwargs or {}))


def count_reads(t, monkeypatch) -> Counter:
    mode = HostReads(t)
    step_on_device, tolist = t.step_on_device, torch.Tensor.tolist

    def in_step(*args, **kwargs):
        mode.phase = "step"
        try:
            return step_on_device(*args, **kwargs)
        finally:
            mode.phase = "after"

    def counted_tolist(self):
        mode.reads[mode.key()] += 1
        return tolist(self)

    monkeypatch.setattr(t, "step_on_device", in_step)
    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    with mode:
        t.run()
    return mode.reads


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_no_host_read_in_a_step_and_one_per_check(world, monkeypatch, zero_stage):
    """8 steps, checks every 3, a log line at 4 and 8, validation and a checkpoint at 8: our code
    never reads inside a step; after steps 3 and 6 (checks only) exactly one read; none after the others."""
    t = trainer(world, f"reads-{zero_stage}", zero_stage=zero_stage, divergence_check_every=3, log_every=4, eval_every=100, checkpoint_every=100)
    reads = count_reads(t, monkeypatch)
    assert t.step == 8
    assert {k: v for k, v in reads.items() if k[0] == "step" and k[2] == "ours"} == {}, reads  # no read of ours inside any step
    library = {reads[("step", n, "library")] for n in range(1, 9)}
    print(f"ZeRO-{zero_stage}: library reads per step {library}; ours after each step", {n: reads[("after", n, "ours")] for n in range(1, 9)})
    assert len(library) == 1  # the libraries' reads are the same every step (Adam's step counter, ZeRO's norm checks)
    assert {k: v for k, v in reads.items() if k[0] == "after" and k[2] == "library" and k[1] not in (4, 8)} == {}
    after = {n: reads[("after", n, "ours")] for n in range(1, 9)}
    assert after[3] == after[6] == 1  # one .tolist() of the queued steps
    assert after[1] == after[2] == after[5] == after[7] == 0
    assert after[4] >= 2 and after[8] >= 2  # log steps: the queue and the activation stats (one read each)
    records = [json.loads(line) for line in (t.work / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [4, 8] and train[1]["tokens"] == 8 * 8 * SEQ
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 and len(r["activations"]) == MODEL.n_layers for r in train)


def test_a_nan_is_caught_at_the_next_check_and_no_checkpoint_follows_it(world):
    """A NaN planted in step 5's hidden states: checks every 3 steps and a checkpoint every 4
    find it after step 6 (one step late), name step 5, and leave step-4 the newest checkpoint."""
    t = trainer(world, "nan", steps=12, divergence_check_every=3, log_every=100, eval_every=100, checkpoint_every=4)

    def poison(module, args):
        return (args[0] * float("nan"),) if t.step == 4 else None  # during the 5th step

    t.engine.module.norm.register_forward_pre_hook(poison)
    with pytest.raises(DivergenceError, match=r"loss became nan at step 5: training diverged"):
        t.run()
    assert t.step == 6  # caught at the check after step 6, not at step 5 itself
    complete = sorted(p.parent.name for p in (t.work / "checkpoints").glob("*/COMPLETE.json"))
    assert complete == ["step-0000004"]


def test_late_checks_give_the_same_run_as_checks_every_step(world):
    """Checks every 5 steps and every step: the same logged losses, and the same spike handling
    (stability watches each step's values, read in order, whatever the check cadence)."""
    runs = {}
    for every in (1, 5):
        t = trainer(world, f"cadence-{every}", steps=10, divergence_check_every=every, log_every=1, eval_every=100, checkpoint_every=100,
                    stability=PretrainConfig.Stability(window=4, min_history=2, warmup_steps=0, sigmas=1e9))
        t.run()
        records = [json.loads(line) for line in (t.work / "metrics.jsonl").read_text().splitlines()]
        runs[every] = [(r["step"], r["loss"], r["grad_norm"], r["tokens"]) for r in records if r["kind"] == "train"]
        assert t.monitor.state_dict()["loss"] == [r[1] for r in runs[every][-4:]]
    assert runs[1] == runs[5] and len(runs[1]) == 10


def test_fused_output_projection_trains_like_full_logits(world):
    """loss_chunk_tokens 24 (chunks across rows of 16 tokens, ZeRO-1): the model fuses lm_head with
    the loss; the logged losses and gradient norms follow the full-logits run (0)."""
    runs = {}
    for chunk in (0, 24):
        t = trainer(world, f"chunk-{chunk}", zero_stage=1, steps=4, loss_chunk_tokens=chunk, log_every=1, eval_every=100, checkpoint_every=100)
        t.run()
        records = [json.loads(line) for line in (t.work / "metrics.jsonl").read_text().splitlines()]
        runs[chunk] = [(r["loss"], r["grad_norm"]) for r in records if r["kind"] == "train"]
    assert len(runs[24]) == 4
    for (loss_a, norm_a), (loss_b, norm_b) in zip(runs[0], runs[24]):
        assert loss_a == pytest.approx(loss_b, rel=1e-5) and norm_a == pytest.approx(norm_b, rel=1e-4)
