"""Mixture-of-Experts feed-forward in the DeepSeekMoE style.

Every token goes through the shared experts and through the top_k of E routed experts that
a linear router scores highest; routed outputs are weighted by the router's softmax
probability. A load-balancing loss (Switch Transformer / DeepSeekMoE expert-level form)

    aux = E * sum_e f_e * P_e,   f_e = share of routed slots taken by expert e,
                                 P_e = mean router probability of expert e

is 1 when routing is uniform and grows as it concentrates; the trainer adds it, weighted,
to the LM loss. ``load`` keeps the last forward's f_e for metrics.

Shape letters: N tokens (B * T), D d_model, E routed experts, k top_k.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class MoE(nn.Module):
    def __init__(self, d_model: int, expert_hidden: int, n_experts: int, top_k: int, n_shared: int, expert: Callable[[int, int], nn.Module]):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(expert(d_model, expert_hidden) for _ in range(n_experts))
        # n shared experts of width h compute the same function class as one of width n * h
        self.shared = expert(d_model, expert_hidden * n_shared) if n_shared else None
        self.register_buffer("load", torch.zeros(n_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> (output [B, T, D], balance loss scalar)."""
        flat = x.reshape(-1, x.shape[-1])  # [N, D]
        probs = self.router(flat).float().softmax(dim=-1)  # [N, E]
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [N, k] each
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            # every expert runs, even on zero tokens, so each rank's backward touches every
            # parameter and data-parallel gradient reduction never waits on a missing one
            token, slot = (chosen == e).nonzero(as_tuple=True)  # [n_e], [n_e]
            routed = expert(flat[token]) * weights[token, slot].unsqueeze(-1).to(flat.dtype)  # [n_e, D]
            out = out.index_add(0, token, routed)
        if self.shared is not None:
            out = out + self.shared(flat)
        fraction = torch.bincount(chosen.flatten(), minlength=self.n_experts).float() / chosen.numel()  # [E]
        aux = self.n_experts * (fraction * probs.mean(dim=0)).sum()
        self.load = fraction.detach()
        return out.view_as(x), aux
