"""Training defaults that follow the accelerator (issue 19): bf16, nccl and compiled blocks on cuda;
unchanged CPU configs keep their identity (and so their committed stage versions)."""
from __future__ import annotations

import hashlib
import json

import pytest

from lmfoundry.infra.config import REPO_ROOT, ConfigError, build_config, load_config
from lmfoundry.infra.config_train import TrainRecipe, defaults_for

# sha256 of each section's identity() as committed before issue 19 (git 098c7f8), for the demo
# and small presets: a training section's fields grew (precision default, compile, attention
# backend, peak detection, model.pad_vocab_to), and none of that may re-run an unchanged CPU config
BEFORE = {
    "configs/demo.yaml": {"model": "fe76d512f6ebd90f", "pretrain": "8b68c21368fc7340", "sft": "d61073df7187e6d9",
                          "reward_model": "f443f1a9a01d2c79", "dpo": "08c56cb13be145a0", "ppo": "e220313bea2bbb41"},
    "configs/small.yaml": {"model": "c7da22737c27ae54", "pretrain": "be5a5858fbc379aa", "sft": "25291d9c6ef44cb4",
                           "reward_model": "2364ffd279a08265", "dpo": "9924b37467c1fb24", "ppo": "ac2257bed3535029"},
}


def identity_hash(section) -> str:
    return hashlib.sha256(json.dumps(section.identity(), sort_keys=True, default=str).encode()).hexdigest()[:16]


@pytest.mark.parametrize("preset", sorted(BEFORE))
def test_an_unchanged_cpu_config_keeps_its_identity(preset):
    cfg = load_config(REPO_ROOT / preset)
    assert {name: identity_hash(getattr(cfg, name)) for name in BEFORE[preset]} == BEFORE[preset]
    assert cfg.pretrain.precision == "fp32" and cfg.pretrain.distributed.backend == "gloo" and not cfg.pretrain.distributed.compile


def test_cuda_defaults_to_the_fast_path():
    assert defaults_for("cuda") == {"precision": "bf16", "backend": "nccl", "compile": True}
    assert defaults_for("cpu") == {"precision": "fp32", "backend": "gloo", "compile": False}
    cfg = build_config({}, ["pretrain.distributed.accelerator=cuda", "sft.distributed.accelerator=cuda"])
    for section in (cfg.pretrain, cfg.sft):
        assert (section.precision, section.distributed.backend, section.distributed.compile) == ("bf16", "nccl", True)
    # bf16 is identity: the cuda run is a different version from the cpu one (its weights differ)
    assert cfg.pretrain.identity()["precision"] == "bf16" and cfg.pretrain.identity() != load_config(None).pretrain.identity()
    # the peak for MFU is detected (0) unless set; the attention kernel is SDPA's choice unless set
    assert (cfg.pretrain.distributed.peak_tflops, cfg.pretrain.distributed.attention_backend) == (0.0, "auto")


def test_explicit_values_win_over_the_accelerator_defaults():
    cfg = build_config({}, ["pretrain.distributed.accelerator=cuda", "pretrain.precision=fp32", "pretrain.distributed.compile=false",
                            "pretrain.distributed.peak_tflops=500"])
    assert (cfg.pretrain.precision, cfg.pretrain.distributed.compile, cfg.pretrain.distributed.peak_tflops) == ("fp32", False, 500.0)
    cpu = TrainRecipe(precision="bf16", distributed=TrainRecipe.Distributed(compile=True))
    assert (cpu.precision, cpu.distributed.backend, cpu.distributed.compile) == ("bf16", "gloo", True)
    # a Distributed instance (not a dict) still steers the precision default
    assert TrainRecipe(distributed=TrainRecipe.Distributed(accelerator="cuda")).precision == "bf16"


def test_cuda_with_gloo_is_an_error_naming_the_fields():
    with pytest.raises(ConfigError, match=r"pretrain\.distributed.*accelerator is cuda but distributed\.backend is gloo.*backend: nccl"):
        build_config({}, ["pretrain.distributed.accelerator=cuda", "pretrain.distributed.backend=gloo"])
    with pytest.raises(ConfigError, match=r"pretrain\.distributed\.attention_backend"):
        build_config({}, ["pretrain.distributed.attention_backend=xformers"])


def test_pad_vocab_to_counts_only_when_set():
    cfg = load_config(None)
    assert "pad_vocab_to" not in cfg.model.identity() and "token_vocab_size" not in cfg.model.identity()
    padded = build_config({}, ["model.pad_vocab_to=128"])
    assert padded.model.identity()["pad_vocab_to"] == 128 and identity_hash(padded.model) != identity_hash(cfg.model)
