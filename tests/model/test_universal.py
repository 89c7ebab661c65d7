"""Resume with another rank count or ZeRO stage (model/universal.py): 2 ranks ZeRO-1 train and save,
then 1 rank ZeRO-2 resumes through a DeepSpeed universal checkpoint and continues the same loss
curve; in this process, 1 rank ZeRO-1 loads the converted checkpoint and holds exactly the saved
fp32 weights and Adam state."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lmfoundry.infra.config import ModelConfig, PretrainConfig
from lmfoundry.infra.store import Store
from lmfoundry.model.train import TrainJob
from lmfoundry.model.universal import ReshardError, UNIVERSAL, check_reshardable, needs_reshard, rng_file
from lmfoundry.tasks.train.pretrain import free_port, launch_command, launch_env
from tests.model.token_fixtures import commit_tokens, markov_tokens, read_metrics

REPO = Path(__file__).resolve().parents[2]
VOCAB, SEQ, STEPS = 64, 16, 6
MODEL = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)  # tied embeddings: a shared parameter
TAG = "step-0000003"
RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # an in-process world's; not the children's


def recipe(procs: int, zero: int) -> PretrainConfig:
    dist = PretrainConfig.Distributed(launcher="torchrun", procs=procs, zero_stage=zero)
    return PretrainConfig(steps=STEPS, global_batch_size=8, lr=3e-3, warmup_steps=2, log_every=1, eval_every=3, checkpoint_every=3, distributed=dist)


def launch(store, ref, work: Path, procs: int, zero: int, resume_tag: str | None = None) -> str:
    cfg = recipe(procs, zero)
    job = TrainJob(model=MODEL, pretrain=cfg, store_url=store.url, tokens=ref, work_dir=str(work), resume_tag=resume_tag)
    (work / "job.json").write_text(job.model_dump_json())
    env = {k: v for k, v in launch_env(cfg.distributed).items() if k not in RENDEZVOUS}
    proc = subprocess.run(launch_command(cfg.distributed, work / "job.json", free_port()), env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two ranks ZeRO-1 for 6 steps (checkpoints at 3 and 6), and one rank ZeRO-2 resuming at 3."""
    store = Store(str(tmp_path_factory.mktemp("store")))
    ref = commit_tokens(store, markov_tokens(96, SEQ, VOCAB, seed=0), markov_tokens(24, SEQ, VOCAB, seed=1), VOCAB)
    two = tmp_path_factory.mktemp("two") / "work"
    two.mkdir()
    launch(store, ref, two, procs=2, zero=1)
    one = tmp_path_factory.mktemp("one") / "work"
    shutil.copytree(two / "checkpoints" / TAG, one / "checkpoints" / TAG)  # what the stage downloads to resume
    output = launch(store, ref, one, procs=1, zero=2, resume_tag=TAG)
    return two, one, output


def losses(work: Path, kind: str = "train", key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(work / "metrics.jsonl") if r["kind"] == kind}


def test_one_rank_zero2_continues_the_two_rank_zero1_curve(runs):
    two, one, output = runs
    assert "checkpoint step-0000003 has 2 ranks, ZeRO 1; this run 1 ranks, ZeRO 2: loading its universal form" in output, output[-3000:]
    assert (one / UNIVERSAL / TAG / "zero").is_dir()  # converted once, into the work dir
    before, after = losses(two), losses(one)
    assert sorted(after) == [4, 5, 6]  # it resumed at step 3 rather than starting over
    for step in (4, 5, 6):  # the same global batches (global data position), weights and Adam state
        assert abs(after[step] - before[step]) < 1e-4 * before[step], (step, before, after)
    assert abs(after[4] - before[1]) > 0.05  # not a fresh model's loss
    assert abs(losses(one, "val", "val_loss")[6] - losses(two, "val", "val_loss")[6]) < 1e-4
    assert json.loads((one / "checkpoints" / "step-0000006" / "COMPLETE.json").read_text())["world_size"] == 1


def test_loaded_weights_equal_the_saved_fp32_weights(runs, tmp_path):
    """In this process: one rank, ZeRO-1, from a different initialisation, loads the converted checkpoint."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from lmfoundry.model.engine import build_engine, init_single_process
    from lmfoundry.model.transformer import Transformer, resolve
    from lmfoundry.model.universal import load_resharded

    two, _, _ = runs
    work = tmp_path / "work"
    shutil.copytree(two / "checkpoints" / TAG, work / "checkpoints" / TAG)
    init_single_process()
    torch.manual_seed(123)
    engine = build_engine(Transformer(resolve(MODEL, vocab_size=VOCAB)), recipe(1, 1), 1)
    marker = json.loads((work / "checkpoints" / TAG / "COMPLETE.json").read_text())
    path, client = load_resharded(engine, work, work / "checkpoints", TAG, marker, 1, 1, 0, lambda: None, "pretrain")
    assert path is not None and client["step"] == 3 and client["loader"]["sample"] == 3 * 8
    saved = get_fp32_state_dict_from_zero_checkpoint(str(two / "checkpoints"), tag=TAG)
    moments = torch.load(work / UNIVERSAL / TAG / "zero" / "layers.0.self_attn.q_proj.weight" / "exp_avg.pt", weights_only=False)["param"]
    for name, param in engine.module.named_parameters():
        assert torch.equal(safe_get_full_fp32_param(param), saved[name]), name
        assert torch.equal(param.detach(), saved[name]), name  # the module's own copy was refreshed too
        if name == "layers.0.self_attn.q_proj.weight":
            assert torch.equal(safe_get_full_optimizer_state(param, "exp_avg"), moments) and moments.abs().sum() > 0
    assert engine.optimizer.optimizer.state_dict()["state"][0]["step"].item() == 3  # Adam's bias correction continues
    assert not engine._config.load_universal_checkpoint  # switched back: a rollback loads this run's own checkpoints


def test_what_can_and_cannot_be_resharded(tmp_path):
    marker = {"world_size": 2, "zero_stage": 1}
    assert needs_reshard(marker, 1, 1) and needs_reshard(marker, 2, 2) and not needs_reshard(marker, 2, 1)
    with pytest.raises(ReshardError, match="need ZeRO >= 1 on both sides: set sft.distributed.zero_stage"):
        check_reshardable(marker, TAG, 2, 0, "sft")
    assert rng_file(tmp_path, 3, 2).name == "rng_rank00001.pt" and rng_file(tmp_path, 0, 4).name == "rng_rank00000.pt"
