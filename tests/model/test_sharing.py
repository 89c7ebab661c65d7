"""Cross-layer parameter sharing (model/sharing.py, ``model.share_layers``): counts, forward,
saved format, unrolled Hugging Face export, and a DeepSpeed ZeRO-2 engine on one gloo rank.

    .venv/bin/pytest -q tests/model/test_sharing.py
"""
from __future__ import annotations

import os

import pytest
import torch

from lmfoundry.infra.config import ModelConfig
from lmfoundry.model.losses import lm_loss, split_batch
from lmfoundry.model.sharing import unique_state_dict, unrolled_state_dict
from lmfoundry.model.transformer import Transformer, load_model, resolve, save_model

VOCAB = 53
D, F, KV = 32, 128, 16  # d_model, ffn_hidden (8/3 * 32 rounded up to 64s), kv heads x head_dim


# one torch thread (tests/model/conftest.py): on two shared cores intra-op threads spin against other processes
pytestmark = pytest.mark.usefixtures("one_thread")


def model(share: int, n_layers: int = 4, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(resolve(ModelConfig(d_model=D, n_layers=n_layers, n_heads=4, n_kv_heads=2, share_layers=share, **overrides), VOCAB))


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_unique_parameters_and_flops_per_application_by_hand():
    per_block = D * D + 2 * D * KV + D * D + 3 * D * F + 2 * D  # q, k, v, o, SwiGLU, two norms
    matmul_block = per_block - 2 * D
    shared, plain = model(2, n_layers=5), model(1, n_layers=5)  # groups {0,1} {2,3} {4}: 3 blocks
    assert shared.layers[0] is shared.layers[1] and shared.layers[2] is shared.layers[3] and shared.layers[4] is not shared.layers[2]
    assert shared.num_parameters() == VOCAB * D + 3 * per_block + D  # tied embedding once, 3 unique blocks
    assert plain.num_parameters() == VOCAB * D + 5 * per_block + D
    # FLOPs: every one of the 5 applications multiplies its weights (and the tied output projection)
    expected = 6 * (5 * matmul_block + VOCAB * D) + 12 * 5 * D * 64
    assert shared.flops_per_token(64) == expected == plain.flops_per_token(64)
    assert "share_layers" not in ModelConfig().identity() and ModelConfig(n_layers=4, share_layers=2).identity()["share_layers"] == 2
    with pytest.raises(ValueError, match="model.share_layers 3 exceeds model.n_layers 2"):
        ModelConfig(n_layers=2, share_layers=3)


def test_shared_model_equals_the_unrolled_plain_model_and_round_trips(tmp_path):
    shared = model(2).eval()
    state = shared.state_dict()
    assert torch.equal(state["layers.1.self_attn.q_proj.weight"], state["layers.0.self_attn.q_proj.weight"])
    plain = model(1, seed=7).eval()
    plain.load_state_dict(unrolled_state_dict(unique_state_dict(state, shared.cfg), shared.cfg))
    x = tokens()
    with torch.no_grad():
        assert torch.allclose(shared(x)[0], plain(x)[0], atol=1e-6)
    save_model(state, shared.cfg, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert {k.split(".")[1] for k in saved if k.startswith("layers.")} == {"0", "2"}  # one copy per group
    again = load_model(tmp_path).eval()
    assert again.layers[0] is again.layers[1]
    with torch.no_grad():
        assert torch.equal(again(x)[0], shared(x)[0])


def test_shared_gradients_are_the_sum_over_applications():
    shared = model(2, n_layers=2)
    inputs, targets = split_batch(tokens(length=13))
    lm_loss(shared(inputs)[0], targets).total.backward()
    plain = model(1, n_layers=2, seed=3)
    plain.load_state_dict(unrolled_state_dict(unique_state_dict(shared.state_dict(), shared.cfg), shared.cfg))
    lm_loss(plain(inputs)[0], targets).total.backward()
    for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        both = plain.get_parameter(f"layers.0.{name}").grad + plain.get_parameter(f"layers.1.{name}").grad
        assert torch.allclose(shared.get_parameter(f"layers.0.{name}").grad, both, atol=1e-6), name


def test_hf_export_is_unrolled_and_gives_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from lmfoundry.model.export import export_llama

    shared = model(3, n_layers=4)  # groups {0,1,2} {3}
    with torch.no_grad():
        for p in shared.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))  # norm gains away from 1 so a mix-up would show
    save_model(shared.state_dict(), shared.cfg, tmp_path / "ours")
    export_llama(tmp_path / "ours", tmp_path / "hf", max_seq_len=64)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.num_hidden_layers == 4
    x = tokens(batch=3, length=20)
    with torch.no_grad():
        diff = (shared.eval()(x)[0] - hf(x).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_deepspeed_zero2_engine_trains_the_shared_model_like_a_plain_loop(tmp_path):
    """One gloo rank: ZeRO-2 partitions each shared tensor once and steps it with the summed
    gradient, so its losses follow a plain AdamW loop's; the final fp32 weights read back from the
    ZeRO checkpoint (as model/train.py does) save and load as a shared model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from lmfoundry.infra.config import PretrainConfig
    from lmfoundry.model.engine import build_engine, engine_step, init_single_process, make_scheduler, param_groups

    saved = dict(os.environ)
    os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        init_single_process()
        cfg = PretrainConfig(steps=4, global_batch_size=4, lr=5e-3, min_lr=1e-4, warmup_steps=1, distributed=PretrainConfig.Distributed(zero_stage=2))
        engine = build_engine(model(2), cfg, world_size=1)
        plain = model(2)
        optimizer = torch.optim.AdamW(param_groups(plain, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps)
        scheduler = make_scheduler(optimizer, cfg)
        ours, reference = [], []
        for step in range(4):
            batch = tokens(4, 17, seed=step % 2)  # two batches in turn: the loss on them must fall
            ours.append(engine_step(engine, [batch], None, cfg, 0.0)["loss"])
            inputs, targets = split_batch(batch)
            loss = lm_loss(plain(inputs)[0], targets).total
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            reference.append(loss.item())
        assert ours[2] < ours[0] and ours[3] < ours[1], ours
        assert max(abs(a - b) for a, b in zip(ours, reference)) < 1e-4, (ours, reference)
        engine.save_checkpoint(str(tmp_path / "ckpt"), tag="last")
        state = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ckpt"), tag="last")
        save_model(state, engine.module.cfg, tmp_path / "final")
        final = load_model(tmp_path / "final").eval()
        x = tokens()
        with torch.no_grad():
            assert torch.allclose(final(x)[0], plain.eval()(x)[0], atol=1e-4)
    finally:
        os.environ.clear()
        os.environ.update(saved)
