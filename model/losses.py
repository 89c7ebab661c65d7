"""Training losses for the language model.

    loss = lm_loss(logits, targets, label_smoothing=0.1, aux=aux, aux_weight=0.01)
    loss.total.backward()

Targets equal to ``ignore_index`` (padding) are left out of every mean.
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


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> mean token cross-entropy, computed in fp32."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
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
