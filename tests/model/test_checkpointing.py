"""Selective activation checkpointing (model/checkpointing.py): the same gradients, the right
blocks recomputed, and the activation memory kept by the forward in the expected order.

    .venv/bin/pytest -q tests/model/test_checkpointing.py
"""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lmfoundry.infra.config import ModelConfig, PretrainConfig
from lmfoundry.model.checkpointing import Policy, parse_policy
from lmfoundry.model.losses import lm_loss, split_batch
from lmfoundry.model.transformer import Transformer, resolve

VOCAB = 71
POLICIES = ("off", "all", "every:2", "attention")


# one torch thread (tests/model/conftest.py): on two shared cores intra-op threads spin against other processes
pytestmark = pytest.mark.usefixtures("one_thread")


def model(**overrides) -> Transformer:
    torch.manual_seed(0)
    fields = {"d_model": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, **overrides}
    return Transformer(resolve(ModelConfig(**fields), VOCAB))


def batch(length: int = 65) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(0))


def gradients(m: Transformer, policy) -> torch.Tensor:
    m.activation_checkpointing = policy
    inputs, targets = split_batch(batch())
    lm_loss(m(inputs)[0], targets).total.backward()
    return torch.cat([p.grad.flatten() for p in m.parameters()])


@pytest.mark.parametrize("overrides", [{}, {"attention": "lsh", "lsh_bucket_size": 16}, {"share_layers": 2}])
def test_every_policy_gives_the_gradients_of_no_checkpointing(overrides):
    reference = gradients(model(**overrides), False)
    for policy in (True, *POLICIES[1:]):
        assert torch.allclose(gradients(model(**overrides), policy), reference, atol=1e-6), policy


def test_the_policy_recomputes_exactly_its_blocks():
    calls: dict[str, int] = {}

    def counter(name):
        def hook(module, args):
            calls[name] = calls.get(name, 0) + 1
        return hook

    for policy, blocks, attention in (("every:2", [2, 1, 2, 1], [2, 1, 2, 1]), ("attention", [1, 1, 1, 1], [2, 2, 2, 2]), ("off", [1] * 4, [1] * 4)):
        m = model()
        for i, layer in enumerate(m.layers):
            layer.register_forward_pre_hook(counter(f"block{i}"))
            layer.self_attn.register_forward_pre_hook(counter(f"attn{i}"))
            layer.mlp.register_forward_pre_hook(counter(f"mlp{i}"))
        calls.clear()
        gradients(m, policy)  # a recomputed module runs its forward again during backward
        assert [calls[f"block{i}"] for i in range(4)] == blocks, policy
        assert [calls[f"attn{i}"] for i in range(4)] == attention, policy
        assert [calls[f"mlp{i}"] for i in range(4)] == blocks, policy
    m = model().eval()
    m.activation_checkpointing = "all"
    calls.clear()
    m.layers[0].register_forward_pre_hook(counter("eval"))
    with torch.no_grad():
        m(batch()[:, :-1])
    assert calls == {"eval": 1}  # never outside training


def kept_by_forward(m: Transformer, policy) -> int:
    """Bytes the forward allocated and still holds when it returns (what backward will read),
    from the profiler's allocation records."""
    m.activation_checkpointing = policy
    inputs, _ = split_batch(batch(257))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        logits, _ = m(inputs)
    held = sum(e.self_cpu_memory_usage for e in prof.events())
    del logits
    return held


def test_saved_activation_memory_falls_in_the_expected_order():
    m = model()
    kept = {policy: kept_by_forward(m, policy) for policy in POLICIES}
    assert kept["all"] < kept["every:2"] < kept["off"], kept
    assert kept["attention"] < kept["off"], kept
    # every:2 recomputes half the blocks: it keeps about half of what "off" keeps above "all"
    half = (kept["off"] + kept["all"]) / 2
    assert abs(kept["every:2"] - half) < 0.15 * half, kept


def test_config_spellings():
    assert parse_policy(True) == parse_policy("all") == Policy(1, False)
    assert parse_policy(False) == parse_policy("off") == Policy(0, False)
    assert parse_policy("every:3") == Policy(3, False) and parse_policy("attention") == Policy(0, True)
    Distributed = PretrainConfig.Distributed
    assert Distributed(activation_checkpointing="true").activation_checkpointing is True
    assert Distributed(activation_checkpointing="every:2").activation_checkpointing == "every:2"
    for bad in ("every:0", "sometimes", "every:x"):
        with pytest.raises(ValueError, match="distributed.activation_checkpointing"):
            Distributed(activation_checkpointing=bad)
