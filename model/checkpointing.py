"""Selective activation checkpointing: which blocks recompute their activations in backward.

    pretrain:
      distributed:
        activation_checkpointing: every:2   # off | all | every:K | attention; true = all, false = off

- ``off``: everything the backward needs is kept (fastest, most memory);
- ``all``: every block keeps only its input and recomputes the rest in backward (~1/3 more compute);
- ``every:K``: blocks 0, K, 2K, ... are checkpointed, the others keep their activations;
- ``attention``: only the attention sub-layer (input norm, projections, scores) is recomputed;
  the feed-forward keeps its activations.

Implemented with ``torch.utils.checkpoint`` (non-reentrant). Only while training: eval and
generation never checkpoint. The policy is read from ``Transformer.activation_checkpointing``,
which the trainers set from the config (a bool or one of the strings above).
"""
from __future__ import annotations

from typing import NamedTuple

from torch.utils.checkpoint import checkpoint


class Policy(NamedTuple):
    every: int  # checkpoint whole blocks i with i % every == 0; 0: none
    attention: bool  # checkpoint the attention sub-layer of the other blocks


OFF = Policy(0, False)


def parse_policy(value: bool | str | None) -> Policy:
    """True/"all" -> every block, False/None/"off" -> none, "every:K", "attention"."""
    if value is True or value == "all":
        return Policy(1, False)
    if value is False or value is None or value == "off":
        return OFF
    if value == "attention":
        return Policy(0, True)
    if isinstance(value, str) and value.startswith("every:") and value[6:].isdigit() and int(value[6:]) >= 1:
        return Policy(int(value[6:]), False)
    raise ValueError(
        f"distributed.activation_checkpointing {value!r} is not one of: off, all, every:K (K >= 1), attention (or true / false)"
    )


def run_block(policy: Policy, index: int, block, x, cos, sin, mask):
    """block(x, cos, sin, mask) as the policy says for layer `index`: whole block checkpointed,
    attention only, or plain."""
    if policy.every and index % policy.every == 0:
        return checkpoint(block, x, cos, sin, mask, use_reentrant=False)
    if policy.attention:
        return block(x, cos, sin, mask, checkpoint_attention=True)
    return block(x, cos, sin, mask)


def checkpointed(module, *args):
    """module(*args), its activations recomputed in backward (the attention-only policy)."""
    return checkpoint(module, *args, use_reentrant=False)
