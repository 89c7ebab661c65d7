"""Training losses: language modelling, and the preference losses of post-training.

    loss = lm_loss(logits, targets, label_smoothing=0.1, aux=aux, aux_weight=0.01)
    loss.total.backward()
    logp = sequence_logprobs(logits, targets, mask)                 # [B] summed log-probs
    loss = reward_loss(r_chosen, r_rejected, margin=0.5)            # Bradley-Terry
    out = dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1)

Targets equal to ``ignore_index`` (padding, prompt tokens in SFT) are left out of every mean.
Every function is a pure tensor function; shapes are in the docstrings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class LMLoss:
    total: torch.Tensor  # what backward runs on: smoothed CE + weighted aux
    ce: torch.Tensor  # plain cross-entropy (detached), the number perplexity is exp() of
    aux: torch.Tensor  # MoE balance loss (detached), 0 for dense models


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> mean (or "sum") token cross-entropy over the targets
    that are not IGNORE_INDEX, computed in fp32."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )


def lm_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
    aux: torch.Tensor | None = None,
    aux_weight: float = 0.0,
) -> LMLoss:
    smoothed = cross_entropy(logits, targets, label_smoothing)
    if label_smoothing:
        with torch.no_grad():
            plain = cross_entropy(logits, targets)
    else:
        plain = smoothed.detach()
    aux = aux if aux is not None else smoothed.new_zeros(())
    total = smoothed + aux_weight * aux if aux_weight else smoothed
    return LMLoss(total=total, ce=plain.detach(), aux=aux.detach())


def split_batch(batch: torch.Tensor, pad_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch [B, T + 1] -> inputs [B, T] and targets [B, T] (padding targets ignored)."""
    inputs, targets = batch[:, :-1], batch[:, 1:].clone()
    if pad_id is not None:
        targets[targets == pad_id] = IGNORE_INDEX
    return inputs, targets


def masked_targets(targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """targets [B, T], mask [B, T] (1 = a training target) -> targets with the rest set to IGNORE_INDEX.

    SFT uses it to train on assistant tokens only: an ignored target adds nothing to the loss,
    so its logits get exactly zero gradient."""
    return torch.where(mask.bool(), targets, torch.full_like(targets, IGNORE_INDEX))


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], targets [B, T], mask [B, T] -> [B]: sum over masked t of log p(targets[t]), in fp32.

    Unmasked targets may hold anything (padding): they are replaced before the lookup."""
    B, T, V = logits.shape
    safe = torch.where(mask.bool(), targets, torch.zeros_like(targets))
    token_logp = -F.cross_entropy(logits.reshape(-1, V).float(), safe.reshape(-1), reduction="none").view(B, T)  # [B, T]
    return (token_logp * mask.to(token_logp.dtype)).sum(-1)


def reward_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float | None = None, center_coef: float = 0.0
) -> torch.Tensor:
    """Bradley-Terry pairwise loss: chosen [B], rejected [B] scalar rewards -> mean -log sigmoid(r_c - r_r - margin).

    margin (a number or [B]) asks the chosen reward to win by at least that much (Llama 2's
    rating margin); center_coef adds center_coef * mean((r_c + r_r)^2), which keeps rewards
    near zero mean so they need no offset later."""
    diff = chosen.float() - rejected.float()  # [B]
    if margin is not None:
        diff = diff - (margin.float() if isinstance(margin, torch.Tensor) else margin)
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * (chosen.float() + rejected.float()).pow(2).mean()
    return loss


@dataclass
class DPOLoss:
    loss: torch.Tensor  # scalar, what backward runs on
    chosen_rewards: torch.Tensor  # [B] implicit rewards beta * (log pi - log ref), detached
    rejected_rewards: torch.Tensor  # [B]


def dpo_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> DPOLoss:
    """Sigmoid DPO (Rafailov et al. 2023): each argument [B] summed log-probs of a reply ->
    mean -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), and the implicit rewards.

    When the policy equals the reference the loss is log 2; its gradient raises log pi of the
    chosen reply and lowers that of the rejected one."""
    chosen_ratio = policy_chosen.float() - ref_chosen.float()  # [B]
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio)).mean()
    return DPOLoss(loss=loss, chosen_rewards=(beta * chosen_ratio).detach(), rejected_rewards=(beta * rejected_ratio).detach())
