"""Mixture-of-Experts feed-forward in the DeepSeekMoE style.

Every token goes through the shared experts and through the top_k of E routed experts that
a linear router scores highest; routed outputs are weighted by the router's softmax
probability. A load-balancing loss (Switch Transformer / DeepSeekMoE expert-level form)

    aux = E * sum_e f_e * P_e,   f_e = share of routed slots taken by expert e,
                                 P_e = mean router probability of expert e

is 1 when routing is uniform and grows as it concentrates; the trainer adds it, weighted,
to the LM loss. ``load`` keeps the last forward's f_e for metrics. The optional router
z-loss (ST-MoE), mean over tokens of logsumexp(router logits)^2, keeps the logits small;
with ``model.moe_z_loss_weight`` > 0 it rides in ``aux`` as ``z_weight / aux_weight * z``
(the trainer multiplies aux by ``moe_aux_weight``, so its net weight is ``moe_z_loss_weight``);
``z_loss`` keeps the last forward's value.

Dispatch: the N * k (token, expert) slots are sorted by expert, so each expert's tokens form
one contiguous segment of a [N * k, D] matrix. On CUDA in bf16 on sm90+ (``dispatch="auto"``)
the experts then run as two grouped GEMMs (``torch._grouped_mm``: gate and up projections
together, then down) over the expert weights stacked per forward, no Python loop over
experts. Elsewhere (CPU, where ``torch._grouped_mm`` runs but was not faster than plain matmuls,
or fp32 on GPUs) each expert's module runs on its contiguous segment. Either way every
expert's weights enter the graph on every rank (data-parallel gradient reduction never waits
on a missing one), and each token's routed outputs are added in expert order, as before.

Shape letters: N tokens (B * T), D d_model, E routed experts, k top_k, H expert hidden,
S = N * k routed slots.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

Dispatch = Literal["auto", "grouped_mm", "segments"]


class MoE(nn.Module):
    def __init__(
        self, d_model: int, expert_hidden: int, n_experts: int, top_k: int, n_shared: int, expert: Callable[[int, int], nn.Module], z_loss_ratio: float = 0.0
    ):
        super().__init__()
        self.n_experts, self.top_k, self.z_loss_ratio = n_experts, top_k, z_loss_ratio
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(expert(d_model, expert_hidden) for _ in range(n_experts))
        # n shared experts of width h compute the same function class as one of width n * h
        self.shared = expert(d_model, expert_hidden * n_shared) if n_shared else None
        self.dispatch: Dispatch = "auto"  # tests and benchmarks pick a path explicitly
        self.register_buffer("load", torch.zeros(n_experts), persistent=False)
        self.register_buffer("z_loss", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> (output [B, T, D], router loss scalar: balance [+ ratio * z])."""
        flat = x.reshape(-1, x.shape[-1])  # [N, D]
        logits = self.router(flat).float()  # [N, E]
        probs = logits.softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [N, k] each
        slots = chosen.flatten()  # [S]: slot s is token s // k
        order = slots.argsort(stable=True)  # [S]: slots grouped by expert, token order kept inside
        token = order // self.top_k  # [S]
        counts = torch.bincount(slots, minlength=self.n_experts)  # [E]
        routed = self.run_experts(flat[token], counts)  # [S, D]
        routed = routed * weights.flatten()[order].unsqueeze(-1).to(flat.dtype)
        out = torch.zeros_like(flat).index_add(0, token, routed)  # [N, D]
        if self.shared is not None:
            out = out + self.shared(flat)
        fraction = counts.float() / slots.numel()  # [E]
        aux = self.n_experts * (fraction * probs.mean(dim=0)).sum()
        self.load = fraction.detach()
        if self.z_loss_ratio:
            z = logits.logsumexp(dim=-1).pow(2).mean()
            self.z_loss = z.detach()
            aux = aux + self.z_loss_ratio * z
        return out.view_as(x), aux

    def run_experts(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [S, D] sorted by expert, counts [E] tokens per expert -> each segment through its expert [S, D]."""
        if self.use_grouped_mm(x):
            return grouped_swiglu(x, counts, self.experts)
        # one host read of the counts, then each expert on its contiguous segment (empty ones too)
        segments = x.split(counts.tolist())
        return torch.cat([expert(segment) for expert, segment in zip(self.experts, segments)])

    def use_grouped_mm(self, x: torch.Tensor) -> bool:
        if self.dispatch != "auto":
            return self.dispatch == "grouped_mm"
        return x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)


def grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """SwiGLU experts (gate_proj, up_proj, down_proj) over sorted segments as two grouped GEMMs.

    x [S, D], counts [E] -> [S, D]. Expert e's rows are offs[e-1]:offs[e] (offs = cumsum of counts)."""
    offs = counts.cumsum(0).to(torch.int32)  # [E]: end row of each expert's segment
    gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts])  # [E, 2H, D]
    down = torch.stack([e.down_proj.weight for e in experts])  # [E, D, H]
    hidden = torch._grouped_mm(x, gate_up.transpose(1, 2), offs=offs)  # [S, 2H]
    gate, up = hidden.chunk(2, dim=-1)  # [S, H] each
    return torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offs)  # [S, D]
