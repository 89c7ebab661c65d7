"""Sorted-dispatch MoE (model/moe.py) against the expert-loop routing it replaced, kept here as
the reference: planted weights, same outputs, balance loss, load and gradients; the router
z-loss against a hand computation; the model config field and its identity rule."""
from __future__ import annotations

import math

import pytest
import torch

from lmfoundry.infra.config import ModelConfig
from lmfoundry.model.moe import MoE
from lmfoundry.model.transformer import SwiGLU, Transformer, resolve


def reference_forward(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loop over experts model/moe.py used before sorted dispatch: (out, aux, load)."""
    flat = x.reshape(-1, x.shape[-1])
    probs = moe.router(flat).float().softmax(dim=-1)
    weights, chosen = probs.topk(moe.top_k, dim=-1)
    out = torch.zeros_like(flat)
    for e, expert in enumerate(moe.experts):
        token, slot = (chosen == e).nonzero(as_tuple=True)
        out = out.index_add(0, token, expert(flat[token]) * weights[token, slot].unsqueeze(-1).to(flat.dtype))
    if moe.shared is not None:
        out = out + moe.shared(flat)
    fraction = torch.bincount(chosen.flatten(), minlength=moe.n_experts).float() / chosen.numel()
    return out.view_as(x), moe.n_experts * (fraction * probs.mean(dim=0)).sum(), fraction


def planted(n_experts=6, top_k=2, n_shared=1, d=16, h=24, seed=0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(d, h, n_experts, top_k, n_shared, expert=SwiGLU)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        moe.router.weight[n_experts - 1] = 0.0  # expert E-1 rarely chosen; with few tokens maybe never
    return moe


def grads(moe: MoE) -> dict[str, torch.Tensor]:
    return {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for name, p in moe.named_parameters()}


@pytest.mark.parametrize("dispatch", ["segments", "grouped_mm"])
@pytest.mark.parametrize("n_experts,top_k,n_shared,tokens", [(6, 2, 1, 37), (4, 1, 0, 5), (8, 3, 2, 64)])
def test_sorted_dispatch_equals_the_expert_loop(dispatch, n_experts, top_k, n_shared, tokens):
    moe = planted(n_experts, top_k, n_shared)
    moe.dispatch = dispatch
    x = torch.randn(1, tokens, 16, generator=torch.Generator().manual_seed(1))
    upstream = torch.randn(1, tokens, 16, generator=torch.Generator().manual_seed(2))

    ref_out, ref_aux, ref_load = reference_forward(moe, x)
    ((ref_out * upstream).sum() + 0.7 * ref_aux).backward()
    ref_grads = grads(moe)
    moe.zero_grad(set_to_none=True)

    out, aux = moe(x)
    ((out * upstream).sum() + 0.7 * aux).backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux, ref_aux)
    assert torch.equal(moe.load, ref_load) and math.isclose(moe.load.sum().item(), 1.0, rel_tol=1e-6)
    for name, g in grads(moe).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # every expert's weights got a gradient tensor (zeros for an idle one): DDP/ZeRO never wait on one
    assert all(moe.experts[e].down_proj.weight.grad is not None for e in range(n_experts))


def test_dispatch_paths_agree_in_bf16():
    moe = planted().to(torch.bfloat16)
    x = torch.randn(2, 20, 16).to(torch.bfloat16)
    moe.dispatch = "segments"
    a, _ = moe(x)
    moe.dispatch = "grouped_mm"
    b, _ = moe(x)
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_auto_dispatch_uses_segments_on_cpu():
    moe = planted()
    assert not moe.use_grouped_mm(torch.zeros(4, 16)) and not moe.use_grouped_mm(torch.zeros(4, 16, dtype=torch.bfloat16))


def test_expert_load_reports_planted_routing():
    """A router that sends tokens with a positive first feature to expert 2, the others to expert 0."""
    moe = MoE(4, 8, n_experts=3, top_k=1, n_shared=0, expert=SwiGLU)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 10.0
        moe.router.weight[0, 0] = -10.0
    x = torch.zeros(1, 8, 4)
    x[0, :3, 0] = 1.0  # 3 tokens to expert 2
    x[0, 3:, 0] = -1.0  # 5 tokens to expert 0
    out, _ = moe(x)
    assert moe.load.tolist() == [5 / 8, 0.0, 3 / 8]
    with torch.no_grad():
        torch.testing.assert_close(out[0, 0], moe.experts[2](x[0, 0]) * moe.router(x[0, 0]).softmax(-1)[2])


def test_z_loss_is_added_to_aux_with_its_ratio():
    moe = planted()
    x = torch.randn(1, 10, 16)
    _, aux_plain = moe(x)
    moe.z_loss_ratio = 0.5
    _, aux_z = moe(x)
    logits = moe.router(x.reshape(-1, 16)).double()
    z = torch.log(torch.exp(logits).sum(-1)).pow(2).mean()  # by hand
    assert math.isclose(moe.z_loss.item(), z.item(), rel_tol=1e-5)
    assert math.isclose(aux_z.item(), aux_plain.item() + 0.5 * z.item(), rel_tol=1e-5)


def test_z_loss_pulls_router_logits_down():
    moe = planted()
    moe.z_loss_ratio = 1.0
    with torch.no_grad():
        moe.router.weight.mul_(5)
    x = torch.randn(1, 32, 16)
    optimizer = torch.optim.SGD(moe.router.parameters(), lr=0.05)
    moe(x)
    first = moe.z_loss.item()
    for _ in range(20):
        optimizer.zero_grad()
        moe(x)[1].backward()
        optimizer.step()
    moe(x)
    assert moe.z_loss.item() < 0.5 * first


def test_model_z_loss_weight_config():
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, moe_experts=4, moe_aux_weight=0.01, moe_z_loss_weight=0.001)
    model = Transformer(resolve(cfg, vocab_size=32))
    assert math.isclose(model.layers[0].mlp.z_loss_ratio, 0.1)
    # off by default and then not part of the identity: versions committed before the field keep their hash
    assert "moe_z_loss_weight" not in ModelConfig().identity() and cfg.identity()["moe_z_loss_weight"] == 0.001
    with pytest.raises(ValueError, match="moe_z_loss_weight needs model.moe_aux_weight"):
        ModelConfig(moe_experts=4, moe_aux_weight=0, moe_z_loss_weight=0.001)
