"""Post-training losses on known values: sequence log-probs, Bradley-Terry, DPO, masked SFT targets."""
from __future__ import annotations

import math

import pytest
import torch

from lmfoundry.model.losses import IGNORE_INDEX, dpo_loss, lm_loss, masked_targets, reward_loss, sequence_logprobs


def test_sequence_logprobs_sum_the_masked_targets_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    targets = torch.tensor([[1, 2, 3, 4], [0, 0, 9999, 9999]])  # unmasked targets may be out of range (padding)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    logp = logits.log_softmax(-1)
    expected = torch.tensor([logp[0, 1, 2] + logp[0, 2, 3], logp[1, 0, 0] + logp[1, 1, 0]])
    assert torch.allclose(sequence_logprobs(logits, targets, mask), expected, atol=1e-6)


def test_reward_loss_hand_computed():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    softplus = lambda x: math.log1p(math.exp(x))  # -log sigmoid(d) = log(1 + e^-d)
    assert reward_loss(chosen, rejected).item() == pytest.approx((softplus(-1) + softplus(1)) / 2, abs=1e-6)
    assert reward_loss(chosen, rejected, margin=0.5).item() == pytest.approx((softplus(-0.5) + softplus(1.5)) / 2, abs=1e-6)
    per_pair = torch.tensor([0.0, 1.0])
    assert reward_loss(chosen, rejected, margin=per_pair).item() == pytest.approx((softplus(-1) + softplus(2)) / 2, abs=1e-6)
    centred = reward_loss(chosen, rejected, center_coef=0.1).item()
    assert centred == pytest.approx((softplus(-1) + softplus(1)) / 2 + 0.1 * (9 + 1) / 2, abs=1e-6)


def test_reward_loss_gradient_separates_the_pair():
    chosen, rejected = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    reward_loss(chosen, rejected).backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises chosen, lowers rejected


def test_dpo_loss_is_log2_when_policy_equals_reference():
    torch.manual_seed(0)
    ref_c, ref_r = torch.randn(8) * 5, torch.randn(8) * 5
    out = dpo_loss(ref_c.clone(), ref_r.clone(), ref_c, ref_r, beta=0.1)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.equal(out.chosen_rewards, torch.zeros(8)) and torch.equal(out.rejected_rewards, torch.zeros(8))


def test_dpo_loss_hand_computed_and_gradient_sign():
    policy_c = torch.tensor([-1.0], requires_grad=True)
    policy_r = torch.tensor([-3.0], requires_grad=True)
    out = dpo_loss(policy_c, policy_r, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)  # beta * (1 - (-1)) = 1
    assert out.chosen_rewards.item() == pytest.approx(0.5) and out.rejected_rewards.item() == pytest.approx(-0.5)
    out.loss.backward()
    assert policy_c.grad.item() < 0 < policy_r.grad.item()
    assert policy_c.grad.item() == pytest.approx(-0.5 * (1 - 1 / (1 + math.exp(-1))), abs=1e-6)


def test_dpo_step_raises_chosen_and_lowers_rejected_through_a_model():
    """One gradient step on a real model moves the log-probs the way DPO promises."""
    from lmfoundry.infra.config import ModelConfig
    from lmfoundry.model.transformer import Transformer, resolve

    torch.manual_seed(0)
    model = Transformer(resolve(ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2), 50))
    chosen, rejected = torch.randint(0, 50, (2, 10)), torch.randint(0, 50, (2, 10))
    mask = torch.zeros(2, 9, dtype=torch.long)
    mask[:, 4:] = 1  # the reply: the last 5 targets

    def logps():
        both = torch.cat([chosen, rejected])
        return sequence_logprobs(model(both[:, :-1])[0], both[:, 1:], torch.cat([mask, mask])).split(2)

    with torch.no_grad():
        ref_c, ref_r = logps()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    pc, pr = logps()
    dpo_loss(pc, pr, ref_c, ref_r, beta=0.1).loss.backward()
    optimizer.step()
    with torch.no_grad():
        new_c, new_r = logps()
    assert (new_c > ref_c).all() and (new_r < ref_r).all(), (ref_c, new_c, ref_r, new_r)


def test_prompt_targets_get_exactly_zero_gradient():
    """Changing a target the mask excludes changes neither the loss nor any gradient."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    targets = torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]])
    grads, losses = [], []
    for t in (targets, torch.where(mask.bool(), targets, (targets + 3) % 11)):
        logits.grad = None
        loss = lm_loss(logits, masked_targets(t, mask)).total
        loss.backward()
        grads.append(logits.grad.clone())
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])
    assert (grads[0][mask == 0] == 0).all() and (grads[0][mask == 1] != 0).any()
    assert (masked_targets(targets, mask) == IGNORE_INDEX).sum() == (mask == 0).sum()
