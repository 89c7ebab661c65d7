"""The stage watchdog on a real run: rank 0 hangs on purpose (infra/faults.py) right after its
step-2 checkpoint; the stage stops every rank within distributed.stall_timeout_s, says which stage,
step, timeout and checkpoint, keeps that checkpoint, and the next run resumes from it."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from lmfoundry.infra.config import ModelConfig, PipelineConfig, PretrainConfig
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.infra.store import Store
from lmfoundry.tasks.train.pretrain import PretrainError, committed_checkpoints
from tests.model.token_fixtures import commit_tokenizer, commit_tokens, markov_tokens

SPEC = StageSpec("pretrain", "lmfoundry.tasks.train.pretrain:run_pretrain", section=("model", "pretrain"), inputs=("tokenize", "train_tokenizer"), gpu=True)
VOCAB, SEQ, STALL = 48, 16, 15.0  # a tiny model's steps, evaluations and checkpoints take well under this


def config(work_dir: Path) -> PipelineConfig:
    dist = PretrainConfig.Distributed(zero_stage=1, stall_timeout_s=STALL, work_dir=str(work_dir))
    pretrain = PretrainConfig(steps=4, global_batch_size=8, warmup_steps=1, log_every=1, eval_every=2, checkpoint_every=2, export_hf=False, distributed=dist)
    return PipelineConfig(model=ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2), pretrain=pretrain)


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (the launcher and its ranks name the job file)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(pid))
    return found


def test_a_hung_rank_is_stopped_and_the_next_run_resumes(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    refs = [commit_tokens(store, markov_tokens(64, SEQ, VOCAB, seed=0), markov_tokens(16, SEQ, VOCAB, seed=1), VOCAB), commit_tokenizer(store, VOCAB)]
    cfg = config(tmp_path / "work")
    monkeypatch.setenv("LMF_FAULT", "pretrain:after_checkpoint:2:sleep")  # rank 0 blocks for an hour after saving step 2
    started = time.monotonic()
    with pytest.raises(PretrainError) as caught:
        run_stage(store, SPEC, cfg, refs)
    took = time.monotonic() - started
    message = str(caught.value)
    assert "pretrain training stalled" in message and f"pretrain.distributed.stall_timeout_s={STALL:g}" in message, message
    # rank 0 blocks after committing step 2 (with async checkpoints its trainer thread gets on to step 4, then waits)
    assert re.search(r"the last progress seen was step [24] \((checkpoint|eval|train)\)", message), message
    assert "committed checkpoint step-0000002 is kept: run the stage again to resume" in message, message
    assert took < 240, took  # not the hour the rank sleeps
    version = SPEC.version(cfg, [r.digest for r in refs])
    deadline = time.monotonic() + 20  # SIGTERM went to the whole process group; dying takes a moment on a busy machine
    while processes_mentioning(str(tmp_path / "work")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_mentioning(str(tmp_path / "work")) == []  # the launcher and every rank are gone
    assert committed_checkpoints(store.open_for_write("pretrain", version)) == ["step-0000002"]
    assert not store.is_committed("pretrain", version)

    monkeypatch.delenv("LMF_FAULT")
    resumed = run_stage(store, SPEC, cfg, refs)
    assert resumed.status == "ran" and resumed.stats["resumed_from_step"] == 2 and resumed.stats["steps"] == 4
