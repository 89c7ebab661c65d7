"""The RL math of PPO and GRPO as small pure tensor functions (issue 14).

    from lmfoundry.model import rl
    kl = rl.kl_penalty(logprobs, ref_logprobs, "k1")                   # [B, T]
    rewards = rl.shaped_rewards(scores, kl, mask, kl_coef=controller.coef)  # [B, T]
    advantages, returns = rl.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    advantages = rl.masked_whiten(advantages, mask)
    loss, stats = rl.policy_loss(new_logprobs, logprobs, advantages, mask, clip=0.2)

Everything works on the response tokens of a batch of rollouts: [B, T] tensors whose ``mask``
is 1 on each row's generated tokens (a prefix of the row: responses are right-padded after
their stop token) and 0 on padding. Values at masked positions never reach a result.
Means are over all unmasked tokens of the batch (a token-level mean: long and short
responses weigh by their tokens). Functions take float tensors and return float32.

Shape letters: B rollouts, T response tokens, V vocabulary, n samples per GRPO group.
"""
from __future__ import annotations

from typing import Any

import torch

KL_ESTIMATORS = ("k1", "k3")


# ---------------------------------------------------------------- masked statistics


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum of x where mask is 1 (x [B, T], mask [B, T]); over everything, or along dim."""
    x, mask = x.float(), mask.float()
    return (x * mask).sum() if dim is None else (x * mask).sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """mean of x over its unmasked entries; along dim a row without any gives 0."""
    if dim is None:
        count = mask.float().sum()
        if count == 0:
            raise ValueError("masked_mean over a mask without a single 1: no response tokens to average")
        return masked_sum(x, mask) / count
    return masked_sum(x, mask, dim) / mask.float().sum(dim=dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """variance of x over its unmasked entries (unbiased: divided by count - 1)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x.float() - mean) ** 2, mask)
    if unbiased:
        count = mask.float().sum()
        if count < 2:
            raise ValueError("an unbiased masked variance needs at least two unmasked entries")
        var = var * count / (count - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the unmasked entries [B, T]; masked entries become 0.
    shift_mean=False keeps the mean (only rescales), as for rewards whose sign matters."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x.float() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.float()


# ---------------------------------------------------------------- from logits


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V] (the logits that predict each token), tokens [B, T] -> log p(token) [B, T]."""
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V] -> entropy of each next-token distribution [B, T], in nats:
    H = logsumexp(z) - sum softmax(z) * z, which never takes log(0)."""
    logits = logits.float()
    return logits.logsumexp(dim=-1) - (logits.softmax(dim=-1) * logits).sum(dim=-1)


# ---------------------------------------------------------------- KL to the reference


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k1 = log p(x) - log q(x) [B, T]: unbiased for KL(p || q) when x ~ p, can be negative."""
    return logprobs.float() - ref_logprobs.float()


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 = (r - 1) - log r with r = q(x) / p(x) [B, T]: unbiased for KL(p || q) when
    x ~ p, never negative, lower variance than k1 while p and q are close (Schulman's estimator)."""
    log_r = ref_logprobs.float() - logprobs.float()
    return torch.expm1(log_r) - log_r


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """The per-token KL estimate named by ``estimator`` ("k1" or "k3") [B, T]."""
    if estimator == "k1":
        return kl_k1(logprobs, ref_logprobs)
    if estimator == "k3":
        return kl_k3(logprobs, ref_logprobs)
    raise ValueError(f"unknown KL estimator {estimator!r}: expected one of {', '.join(KL_ESTIMATORS)}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, T] (1 on a prefix of each row) -> index of each row's last unmasked token [B]."""
    lengths = mask.long().sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError(f"rows {(lengths == 0).nonzero().flatten().tolist()} have no response token")
    return lengths - 1


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token PPO rewards [B, T]: -kl_coef * kl on every response token, plus the sequence's
    score [B] (reward model, after normalisation/clipping) on its last response token."""
    rewards = -kl_coef * kl.float() * mask.float()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.float()
    return rewards


# ---------------------------------------------------------------- advantages


def check_prefix_mask(mask: torch.Tensor) -> None:
    """GAE treats the token after a row's last unmasked one as the episode's end: the mask
    must be 1 on a prefix of each row."""
    if mask.shape[1] > 1 and bool((mask[:, 1:].long() > mask[:, :-1].long()).any()):
        raise ValueError("the response mask must be 1 on a prefix of each row (right padding only)")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens.

    rewards, values, mask [B, T] -> (advantages, returns) [B, T], 0 where masked:
        delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last response token is 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        return_t = A_t + V_t                            (the value head's target)
    """
    check_prefix_mask(mask)
    rewards, values, mask = rewards.float(), values.float(), mask.float()
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        # masked tokens end the episode: nothing after the last response token flows back
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        advantages[:, t] = next_advantage
    returns = (advantages + values) * mask
    return advantages, returns


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """GRPO: rewards [G * n] of n samples per prompt, each prompt's samples next to each other ->
    advantages [G * n] = (r - group mean) / (group std + eps) (unbiased std; scale=False keeps
    r - mean). A group whose samples all scored the same gets 0: it teaches nothing. Every
    response token of a sample gets its sample's advantage: ``advantages[:, None] * mask``."""
    if group_size < 2:
        raise ValueError(f"GRPO needs at least 2 samples per prompt to compare, got group_size {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"GRPO rewards must be flat with a multiple of group_size {group_size} entries, got shape {tuple(rewards.shape)}")
    groups = rewards.float().view(-1, group_size)  # [G, n]
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.flatten()


# ---------------------------------------------------------------- PPO losses


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate: logprobs (current policy, with grad), old_logprobs (at rollout),
    advantages, mask [B, T] -> (loss scalar, stats).

        ratio = exp(logprobs - old_logprobs)
        loss  = mean over tokens of max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip))

    stats (detached scalars): clip_fraction (tokens where the clipped term won, so no gradient),
    approx_kl (k3 estimate of KL(old || new), how far this update moved), ratio_mean (~1.0
    at the first minibatch; drifting away means log-probs differ between rollout and training)."""
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = torch.exp(log_ratio)
    advantages = advantages.float().detach()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: values (critic now, with grad), old_values (at rollout), returns, mask
    [B, T] -> (loss scalar, stats {clip_fraction}).

        clipped = old_values + clamp(values - old_values, -clip, clip)
        loss    = 0.5 * mean over tokens of max((values - R)^2, (clipped - R)^2)"""
    values, old_values, returns = values.float(), old_values.float().detach(), returns.float().detach()
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        stats = {"clip_fraction": masked_mean((clipped_error > unclipped_error).float(), mask)}
    return loss, stats


# ---------------------------------------------------------------- KL coefficient


def adaptive_kl_coef(coef: float, kl: float, n_steps: int, target: float, horizon: int) -> float:
    """One update of the adaptive KL controller (Ziegler et al. 2019, "Fine-Tuning Language
    Models from Human Preferences"): the proportional error clip(kl / target - 1, -0.2, 0.2)
    moves the coefficient by a factor 1 + error * n_steps / horizon, where n_steps is how many
    samples (rollouts) the measured kl came from."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)


class KLController:
    """The KL coefficient: fixed (target None) or adaptive toward ``target`` over ``horizon``.
    ``state_dict()`` is a plain dict for checkpoints; ``KLController.from_state(d)`` restores it."""

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000):
        if coef < 0:
            raise ValueError(f"the KL coefficient must be >= 0, got {coef}")
        if target is not None and (target <= 0 or horizon <= 0):
            raise ValueError(f"an adaptive KL controller needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.coef, self.target, self.horizon = float(coef), target, int(horizon)

    def update(self, kl: float, n_steps: int) -> float:
        """Feed the mean KL (per sequence, summed over its tokens) of n_steps rollouts; returns the new coefficient."""
        if self.target is not None:
            self.coef = adaptive_kl_coef(self.coef, float(kl), n_steps, self.target, self.horizon)
        return self.coef

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "target": self.target, "horizon": self.horizon}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "KLController":
        return cls(state["coef"], state["target"], state["horizon"])
