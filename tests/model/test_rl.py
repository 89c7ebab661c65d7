"""RL math on known values: hand-computed examples and slow loop references (model/rl.py)."""
from __future__ import annotations

import math

import pytest
import torch

from lmfoundry.model import rl


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_gae_on_a_hand_computed_example_with_padding():
    # gamma 0.9, lam 0.8: gamma * lam = 0.72
    rewards = t([0.0, 0.0, 1.0], [0.0, 2.0, 5.0])  # row 2's third token is padding: its reward is ignored
    values = t([0.5, 0.4, 0.6], [1.0, 0.5, 99.0])
    mask = t([1, 1, 1], [1, 1, 0])
    adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 1: d2 = 1 - 0.6 = 0.4; d1 = 0.9 * 0.6 - 0.4 = 0.14; d0 = 0.9 * 0.4 - 0.5 = -0.14
    #        A2 = 0.4; A1 = 0.14 + 0.72 * 0.4 = 0.428; A0 = -0.14 + 0.72 * 0.428 = 0.16816
    # row 2: d1 = 2 - 0.5 = 1.5 (the padded value 99 is not bootstrapped); d0 = 0.9 * 0.5 - 1 = -0.55
    #        A1 = 1.5; A0 = -0.55 + 0.72 * 1.5 = 0.53
    assert torch.allclose(adv, t([0.16816, 0.428, 0.4], [0.53, 1.5, 0.0]), atol=1e-6)
    assert torch.allclose(ret, t([0.66816, 0.828, 1.0], [1.53, 2.0, 0.0]), atol=1e-6)


def test_gae_equals_the_definition_as_a_sum_of_discounted_deltas():
    gen = torch.Generator().manual_seed(0)
    B, T, gamma, lam = 5, 9, 0.97, 0.9
    rewards, values = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    lengths = [9, 1, 4, 7, 2]
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    adv, ret = rl.gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        v = [values[b, i].item() for i in range(n)] + [0.0]  # terminal value 0
        deltas = [rewards[b, i].item() + gamma * v[i + 1] - v[i] for i in range(n)]
        for i in range(T):
            expected = sum((gamma * lam) ** k * deltas[i + k] for k in range(n - i)) if i < n else 0.0
            assert adv[b, i].item() == pytest.approx(expected, abs=1e-5)
            assert ret[b, i].item() == pytest.approx(expected + v[i] if i < n else 0.0, abs=1e-5)


def test_gae_refuses_a_mask_with_holes():
    with pytest.raises(ValueError, match="prefix"):
        rl.gae(t([1.0, 1.0]), t([0.0, 0.0]), t([0, 1]), 1.0, 1.0)


def test_masked_mean_var_and_whitening_ignore_masked_entries():
    x = t([2.0, 4.0, 1000.0], [6.0, -50.0, 7.0])
    mask = t([1, 1, 0], [1, 0, 0])
    assert rl.masked_mean(x, mask).item() == pytest.approx(4.0)
    assert rl.masked_mean(x, mask, dim=1).tolist() == pytest.approx([3.0, 6.0])
    assert rl.masked_var(x, mask).item() == pytest.approx(4.0)  # (4 + 0 + 4) / 2
    assert rl.masked_var(x, mask, unbiased=False).item() == pytest.approx(8 / 3)
    white = rl.masked_whiten(x, mask)
    assert torch.allclose(white, t([-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(rl.masked_whiten(x, mask, shift_mean=False), t([3.0, 4.0, 0.0], [5.0, 0.0, 0.0]), atol=1e-6)
    with pytest.raises(ValueError, match="no response tokens"):
        rl.masked_mean(x, torch.zeros_like(mask))


def test_kl_estimators_on_known_values_and_in_expectation():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert rl.kl_k1(logp, ref).item() == pytest.approx(math.log(2))
    assert rl.kl_k3(logp, ref).item() == pytest.approx(0.5 - 1 + math.log(2))  # r = 1/2: (r - 1) - log r
    assert rl.kl_penalty(logp, ref, "k3").item() == pytest.approx(rl.kl_k3(logp, ref).item())
    with pytest.raises(ValueError, match="unknown KL estimator 'k9'"):
        rl.kl_penalty(logp, ref, "k9")
    # sampled from p, both estimate KL(p || q); k3 is never negative
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    exact = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    k1, k3 = rl.kl_k1(p.log()[x], q.log()[x]), rl.kl_k3(p.log()[x], q.log()[x])
    assert k1.mean().item() == pytest.approx(exact, abs=0.01)
    assert k3.mean().item() == pytest.approx(exact, abs=0.01)
    assert (k3 >= 0).all() and (k1 < 0).any()


def test_shaped_rewards_put_the_score_on_the_last_response_token():
    kl = t([0.1, 0.2, 0.3], [0.5, 0.5, 0.5])
    mask = t([1, 1, 1], [1, 0, 0])
    rewards = rl.shaped_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.1)
    assert torch.allclose(rewards, t([-0.01, -0.02, -0.03 + 2.0], [-0.05 - 1.0, 0.0, 0.0]), atol=1e-6)
    with pytest.raises(ValueError, match=r"rows \[1\] have no response token"):
        rl.shaped_rewards(torch.tensor([1.0, 1.0]), kl, t([1, 0, 0], [0, 0, 0]), 0.1)


def test_entropy_from_logits():
    V = 7
    uniform = torch.zeros(1, 1, V)
    assert rl.entropy_from_logits(uniform).item() == pytest.approx(math.log(V))
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    assert rl.entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(2, 3, V, generator=torch.Generator().manual_seed(1))
    probs = logits.softmax(-1)
    assert torch.allclose(rl.entropy_from_logits(logits), -(probs * probs.log()).sum(-1), atol=1e-6)
    tokens = torch.tensor([[0, 3, 6], [1, 1, 2]])
    assert torch.allclose(rl.token_logprobs(logits, tokens), probs.log().gather(-1, tokens.unsqueeze(-1)).squeeze(-1), atol=1e-6)


def policy_case(ratio: float, advantage: float, clip: float = 0.2):
    old = torch.zeros(1, 1)
    logp = torch.full((1, 1), math.log(ratio), requires_grad=True)
    loss, stats = rl.policy_loss(logp, old, torch.full((1, 1), advantage), torch.ones(1, 1), clip)
    loss.backward()
    return loss.item(), stats, logp.grad.item()


def test_clipped_policy_loss_at_and_beyond_the_clip_boundary():
    loss, stats, grad = policy_case(1.2, 1.0)  # exactly at 1 + clip: both terms equal, not counted as clipped
    assert loss == pytest.approx(-1.2) and stats["clip_fraction"].item() == 0.0
    loss, stats, grad = policy_case(1.3, 1.0)  # too far up on a good action: clipped, no gradient
    assert loss == pytest.approx(-1.2) and stats["clip_fraction"].item() == 1.0 and grad == 0.0
    loss, stats, grad = policy_case(1.3, -1.0)  # up on a bad action: the unclipped term keeps pushing back
    assert loss == pytest.approx(1.3) and stats["clip_fraction"].item() == 0.0 and grad == pytest.approx(1.3)
    loss, stats, grad = policy_case(0.7, -1.0)  # too far down on a bad action: clipped at 0.8
    assert loss == pytest.approx(0.8) and stats["clip_fraction"].item() == 1.0 and grad == 0.0
    loss, stats, grad = policy_case(0.7, 1.0)  # down on a good action: unclipped, gradient -A * ratio
    assert loss == pytest.approx(-0.7) and grad == pytest.approx(-0.7)
    assert stats["ratio_mean"].item() == pytest.approx(0.7)
    assert stats["approx_kl"].item() == pytest.approx(0.7 - 1 - math.log(0.7))


def test_policy_loss_averages_over_unmasked_tokens_only():
    logp = torch.log(t([1.0, 1.1, 5.0]))
    loss, stats = rl.policy_loss(logp, torch.zeros(1, 3), t([1.0, 2.0, 100.0]), t([1, 1, 0]), clip=0.2)
    assert loss.item() == pytest.approx(-(1.0 * 1.0 + 2.0 * 1.1) / 2)
    assert stats["ratio_mean"].item() == pytest.approx(1.05)


def test_clipped_value_loss():
    def case(value: float, old: float, ret: float, clip: float = 0.2):
        v = torch.full((1, 1), value, requires_grad=True)
        loss, stats = rl.value_loss(v, torch.full((1, 1), old), torch.full((1, 1), ret), torch.ones(1, 1), clip)
        loss.backward()
        return loss.item(), stats["clip_fraction"].item(), v.grad.item()

    # moved 0.5 toward a return of 1.0 from 0.0: clipped value 0.2 is further away, so it counts (no gradient)
    assert case(0.5, 0.0, 1.0) == pytest.approx((0.5 * 0.8**2, 1.0, 0.0))
    # moved past the return: the unclipped error (0.5) is larger than the clipped one (0.3)
    assert case(1.5, 1.0, 1.0) == pytest.approx((0.5 * 0.5**2, 0.0, 0.5))
    # inside the clip range the loss is plain 0.5 * (v - R)^2
    assert case(0.1, 0.0, 1.0) == pytest.approx((0.5 * 0.9**2, 0.0, -0.9))


def test_adaptive_kl_controller_update_and_state():
    # Ziegler et al.: error clipped to [-0.2, 0.2], factor 1 + error * n / horizon
    assert rl.adaptive_kl_coef(0.1, kl=9.0, n_steps=256, target=6.0, horizon=10000) == pytest.approx(0.1 * (1 + 0.2 * 0.0256))
    assert rl.adaptive_kl_coef(0.1, kl=3.0, n_steps=256, target=6.0, horizon=10000) == pytest.approx(0.1 * (1 - 0.2 * 0.0256))
    assert rl.adaptive_kl_coef(0.1, kl=6.6, n_steps=256, target=6.0, horizon=10000) == pytest.approx(0.1 * (1 + 0.1 * 0.0256))
    controller = rl.KLController(0.1, target=6.0, horizon=1000)
    controller.update(9.0, 100)
    saved = controller.state_dict()
    assert saved == {"coef": pytest.approx(0.1 * 1.02), "target": 6.0, "horizon": 1000}
    restored = rl.KLController.from_state(dict(saved))
    for kl in (1.0, 7.0, 20.0):
        assert restored.update(kl, 64) == controller.update(kl, 64)
    fixed = rl.KLController(0.05)
    assert fixed.update(100.0, 64) == 0.05 and fixed.state_dict()["target"] is None


def test_grpo_advantages_normalise_within_each_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 4.0, 8.0])
    adv = rl.grpo_advantages(rewards, group_size=3, eps=0.0 + 1e-12)
    assert torch.allclose(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0]), atol=1e-5)  # std 1, 0, 4
    assert torch.allclose(rl.grpo_advantages(rewards, 3, scale=False)[6:], torch.tensor([-4.0, 0.0, 4.0]))
    with pytest.raises(ValueError, match="multiple of group_size 4"):
        rl.grpo_advantages(rewards, group_size=4)
