"""One PPO / GRPO iteration's tensors: score a generated batch, compute advantages, the two losses.

    from lmfoundry.model import ppo
    gen = generate(actor.module, prompts, max_new_tokens=32, pad_id=pad, stop_ids={end, eos},
                   sampling=Sampling(temperature=1.0), generator=g)
    rollout = ppo.score_rollout(gen, actor, reference, critic, scorer, cfg, reward_stats)
    ppo.add_advantages(rollout, cfg, kl_coef)                        # GAE or GRPO
    for rows in ppo.minibatches(len(rollout), size, generator):     # ppo_epochs times
        loss, stats = ppo.actor_loss(actor, rollout.rows(rows), cfg, kl_coef)
        loss, stats = ppo.critic_loss(critic, rollout.rows(rows), cfg)

The run around it (DeepSpeed engines, prompts, checkpoints, metrics) is model/ppo_train.py; the
RL math is model/rl.py. ``actor`` and ``critic`` may be DeepSpeed engines or plain modules:
only their forward is called. ``cfg`` is the ``ppo`` section (infra/config_posttrain.py).

Every forward over a rollout reads ``gen.sequences()`` (left-padded prompt, then the response)
with ``generate.padding_layout``'s positions and segments: the same positions the tokens had
while they were generated, so the recomputed log-probs match the sampling ones (the drift is
logged) and the first minibatch's ratio is exactly 1. The logits that predict response token j
sit at position P - 1 + j (P: the prompt part's width); the critic's value of that state too.

A ``Scorer`` maps a Generation to one float per row: the reward model's score at each
sequence's last real token (``RewardModelScorer``) or any rule (tests: a count of a target token).

Shape letters: B rollouts, P prompt width, N response width, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch

from lmfoundry.model import rl
from lmfoundry.model.generate import Generation, padding_layout

Scorer = Callable[[Generation], torch.Tensor]  # -> [B] raw scores


@dataclass
class Rollout:
    """A scored batch of responses; every tensor has the rollouts on dim 0."""

    tokens: torch.Tensor  # [B, P + N] prompt (left-padded) then response (right-padded)
    mask: torch.Tensor  # [B, P + N] 1 on real tokens
    response_mask: torch.Tensor  # [B, N] float 1 on generated tokens (the stop token included)
    logprobs: torch.Tensor  # [B, N] the actor's before any update ("old" policy), recomputed
    ref_logprobs: torch.Tensor  # [B, N] the frozen reference's
    gen_logprobs: torch.Tensor  # [B, N] what the sampler saw (drift check only)
    kl: torch.Tensor  # [B, N] per-token KL estimate of old vs reference, 0 where masked
    raw_scores: torch.Tensor  # [B] the scorer's output
    scores: torch.Tensor  # [B] after normalisation, missing-EOS penalty and clipping
    stopped: torch.Tensor  # [B] bool: emitted a stop id
    values: torch.Tensor | None = None  # [B, N] the critic's (GAE only)
    advantages: torch.Tensor | None = None  # [B, N]
    returns: torch.Tensor | None = None  # [B, N] the critic's targets (GAE only)

    @property
    def width(self) -> int:
        """P: where the response part starts."""
        return self.tokens.shape[1] - self.response_mask.shape[1]

    @property
    def response(self) -> torch.Tensor:  # [B, N]
        return self.tokens[:, self.width :]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def rows(self, index: torch.Tensor) -> "Rollout":
        """The rollouts at ``index`` (a minibatch); the widths stay."""
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self) if getattr(self, f.name) is not None})


# ---------------------------------------------------------------- forwards over a rollout


def response_logits(model, tokens: torch.Tensor, mask: torch.Tensor, width: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits / temperature [B, N, V] fp32 that predict each response token, MoE aux) of a causal LM."""
    positions, segments = padding_layout(mask)
    logits, aux = model(tokens[:, :-1], positions[:, :-1], segments[:, :-1])
    return logits[:, width - 1 :].float() / temperature, aux


def response_values(critic, tokens: torch.Tensor, mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [B, N] fp32 of the states each response token is chosen in, MoE aux) of a ValueModel."""
    positions, segments = padding_layout(mask)
    values, aux = critic(tokens[:, :-1], positions[:, :-1], segments[:, :-1])
    return values[:, width - 1 :], aux


class RewardModelScorer:
    """The reward model's score at each sequence's last real token (its stop token, or the last
    token it had when max_new_tokens ran out)."""

    def __init__(self, reward_model):
        self.reward_model = reward_model

    @torch.no_grad()
    def __call__(self, gen: Generation) -> torch.Tensor:
        tokens, mask = gen.sequences()
        positions, segments = padding_layout(mask)
        last = gen.prompt.shape[1] + gen.lengths  # RewardModel reads row b at last[b] - 1
        scores, _ = self.reward_model(tokens, last, positions, segments)
        return scores.float()


def shape_scores(raw: torch.Tensor, stopped: torch.Tensor, *, mean: float = 0.0, std: float = 1.0, normalize: bool = False,
                 missing_eos_penalty: float = 0.0, clip: float = 0.0) -> torch.Tensor:
    """raw [B], stopped [B] bool -> the scores PPO optimises [B]: (raw - mean) / std when
    normalize, minus missing_eos_penalty where the response never stopped, then clipped to
    +-clip (0: no clip)."""
    scores = raw.float()
    if normalize:
        scores = (scores - mean) / std
    scores = scores - missing_eos_penalty * (~stopped.bool()).float()
    return scores.clamp(-clip, clip) if clip else scores


@torch.no_grad()
def score_rollout(gen: Generation, actor, reference, critic, scorer: Scorer, cfg, reward_stats: dict[str, Any]) -> Rollout:
    """One no-grad forward of each model over the generated batch -> a Rollout (no advantages yet).
    ``reward_stats``: {"mean", "std"} of the reward model (used when cfg.reward_normalize)."""
    tokens, mask = gen.sequences()
    width = gen.prompt.shape[1]
    response_mask = gen.response_mask.float()
    logits, _ = response_logits(actor, tokens, mask, width, cfg.temperature)
    logprobs = rl.token_logprobs(logits, gen.response) * response_mask
    ref_logits, _ = response_logits(reference, tokens, mask, width, cfg.temperature)
    ref_logprobs = rl.token_logprobs(ref_logits, gen.response) * response_mask
    values = response_values(critic, tokens, mask, width)[0] * response_mask if critic is not None else None
    raw = scorer(gen).float()
    scores = shape_scores(
        raw, gen.stopped, mean=reward_stats.get("mean") or 0.0, std=reward_stats.get("std") or 1.0, normalize=cfg.reward_normalize,
        missing_eos_penalty=cfg.missing_eos_penalty, clip=cfg.reward_clip,
    )
    kl = rl.kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator) * response_mask
    gen_logprobs = gen.logprobs if gen.logprobs is not None else logprobs
    return Rollout(tokens, mask, response_mask, logprobs, ref_logprobs, gen_logprobs * response_mask, kl, raw, scores, gen.stopped, values)


# ---------------------------------------------------------------- advantages


def add_advantages(rollout: Rollout, cfg, kl_coef: float) -> None:
    """Fill rollout.advantages (and returns for GAE).

    gae:  per-token rewards = -kl_coef * kl (when the KL goes into the reward) plus the score on
          the last token -> GAE against the critic's values -> whitened (cfg.whiten_advantages).
    grpo: score (minus kl_coef * the sequence's summed KL when it goes into the reward),
          normalised within each group of cfg.group_size adjacent rollouts, on every token."""
    mask = rollout.response_mask
    in_reward = kl_coef if not cfg.kl_in_loss else 0.0
    if cfg.advantage == "grpo":
        sequence_reward = rollout.scores - in_reward * rollout.kl.sum(dim=1)
        rollout.advantages = rl.grpo_advantages(sequence_reward, cfg.group_size)[:, None] * mask
        return
    if rollout.values is None:
        raise ValueError("GAE needs the critic's values: score the rollout with a critic (advantage: gae)")
    rewards = rl.shaped_rewards(rollout.scores, rollout.kl, mask, in_reward)
    advantages, returns = rl.gae(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
    rollout.advantages = rl.masked_whiten(advantages, mask) if cfg.whiten_advantages and mask.sum() > 1 else advantages
    rollout.returns = returns


def minibatches(n: int, size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A seeded shuffle of range(n) cut into index tensors of ``size`` (n is a multiple of size)."""
    if n % size:
        raise ValueError(f"{n} rollouts do not split into minibatches of {size}")
    return list(torch.randperm(n, generator=generator).split(size))


# ---------------------------------------------------------------- losses


def actor_loss(actor, mb: Rollout, cfg, kl_coef: float, aux_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss - entropy_coef * entropy (+ kl_coef * KL to the reference when the KL
    goes into the loss, + MoE aux) of one minibatch -> (loss, detached stats)."""
    mask = mb.response_mask
    logits, aux = response_logits(actor, mb.tokens, mb.mask, mb.width, cfg.temperature)
    logprobs = rl.token_logprobs(logits, mb.response)
    loss, stats = rl.policy_loss(logprobs, mb.logprobs, mb.advantages, mask, cfg.clip_ratio)
    stats["policy_loss"] = loss.detach()
    entropy = rl.masked_mean(rl.entropy_from_logits(logits), mask) if cfg.entropy_coef else None
    if entropy is not None:
        loss = loss - cfg.entropy_coef * entropy
    else:
        with torch.no_grad():
            entropy = rl.masked_mean(rl.entropy_from_logits(logits), mask)
    stats["entropy"] = entropy.detach()
    if cfg.kl_in_loss:
        kl = rl.masked_mean(rl.kl_penalty(logprobs, mb.ref_logprobs, cfg.kl_estimator), mask)
        loss = loss + kl_coef * kl
        stats["kl_loss"] = kl.detach()
    if aux_weight:
        loss = loss + aux_weight * aux
    stats["loss"] = loss.detach()
    return loss, stats


def critic_loss(critic, mb: Rollout, cfg, aux_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss of one minibatch against its GAE returns -> (loss, detached stats)."""
    values, aux = response_values(critic, mb.tokens, mb.mask, mb.width)
    loss, stats = rl.value_loss(values, mb.values, mb.returns, mb.response_mask, cfg.value_clip)
    stats = {"value_loss": loss.detach(), "value_clip_fraction": stats["clip_fraction"]}
    return (loss + aux_weight * aux if aux_weight else loss), stats


# ---------------------------------------------------------------- what a person debugging RLHF reads


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """Per-batch means of one rank's rollout: rewards, KL, lengths, EOS rate, log-prob drift,
    advantage spread, and for GAE the critic's explained variance of the returns."""
    mask = rollout.response_mask
    lengths = mask.sum(dim=1)
    out = {
        "reward": rollout.raw_scores.mean().item(),
        "reward_std": rollout.raw_scores.std().item() if len(rollout) > 1 else 0.0,
        "score": rollout.scores.mean().item(),
        "kl": rollout.kl.sum(dim=1).mean().item(),
        "kl_per_token": rl.masked_mean(rollout.kl, mask).item(),
        "response_length": lengths.mean().item(),
        "eos_rate": rollout.stopped.float().mean().item(),
        "logprob_drift": rl.masked_mean((rollout.gen_logprobs - rollout.logprobs).abs(), mask).item(),
    }
    if rollout.advantages is not None:
        out["advantage_std"] = rl.masked_var(rollout.advantages, mask, unbiased=False).sqrt().item()
    if rollout.returns is not None and rollout.values is not None:
        residual = rl.masked_var(rollout.returns - rollout.values, mask, unbiased=False)
        spread = rl.masked_var(rollout.returns, mask, unbiased=False)
        out["explained_variance"] = (1.0 - residual / spread).item() if spread > 0 else 0.0
    return out
