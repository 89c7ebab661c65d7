"""Tensor and sequence parallelism for the training loop, through DeepSpeed (no communication of our own).

Switched on by ``<section>.distributed.tp`` / ``.sp`` (pretraining only), e.g. for two CPU ranks::

    lmf run --until pretrain --set pretrain.distributed.procs=2 --set pretrain.distributed.tp=2
    lmf run --until pretrain --set pretrain.distributed.procs=2 --set pretrain.distributed.sp=2

Tensor parallelism is DeepSpeed AutoTP (``tensor_parallel.autotp_size`` in the engine config, the
built-in ``llama`` layout, whose module names ours follow): q/k/v and gate/up projections are split
by output rows, o/down by input columns with an all-reduce after them; each rank keeps H / tp query
and K / tp key/value heads, and Attention reads its local head count off the projection widths.
DeepSpeed builds the groups (a (dp, tp) device mesh: TP groups are consecutive ranks) and checks on
the first forward that every rank of a TP group got the same batch, so the loader is split by the
data-parallel rank (rank // tp). The final export gathers the shards (the engine's consolidated
state dict).

Sequence parallelism is DeepSpeed Ulysses: ``DistributedAttention`` around our attention kernel
swaps the sequence split for a head split with an all-to-all (each rank attends over the whole
sequence for H / sp heads) and back. The groups are DeepSpeed's ``parallel_state_sp`` (consecutive
ranks), handed to the engine as its mpu, so gradients are summed over the SP group and averaged over
data-parallel groups. Every rank of an SP group reads the same batch and keeps its slice
[r T / sp, (r + 1) T / sp); rotary positions are that slice's global positions (Transformer
.sequence_rank). The loss is token-weighted over the group: each rank's summed cross-entropy over
the group's target count, so the summed gradient is that of the one-rank mean, and the logged
loss is the group's sum (one all-reduce in the SP group).

tp and sp together, ZeRO-3, pipeline parallelism and objectives other than pretraining are refused
with a message (infra/config_parallel.py says why). Checked on 2 gloo ranks with ZeRO-1
(tests/model/test_parallel.py); ZeRO-0 and -2 ran in trial loops outside the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmfoundry.infra.config_parallel import layout_problems
from lmfoundry.model.losses import IGNORE_INDEX, cross_entropy, split_batch
from lmfoundry.model.transformer import Attention, Transformer, attend


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: rank = dp_rank * (tp * sp) + inner rank (TP and SP groups are consecutive ranks)."""

    rank: int
    world: int
    tp: int = 1
    sp: int = 1

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.sp)

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp * self.sp)

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def reports(self) -> bool:
        """One rank per TP group adds its sums to a world-wide reduction (the others hold copies)."""
        return self.tp_rank == 0


def layout(dist_cfg, rank: int, world: int, section: str) -> Layout:
    """The Layout of this run from ``distributed.tp / sp``, checked against the real rank count."""
    problems = layout_problems(dist_cfg.tp, dist_cfg.sp, ranks=world, section=section, zero_stage=dist_cfg.zero_stage)
    if problems:
        raise ValueError("; ".join(problems))
    return Layout(rank=rank, world=world, tp=dist_cfg.tp, sp=dist_cfg.sp)


def check_model(lay: Layout, model_cfg, seq_len: int, section: str) -> None:
    """Refuse a model or sequence length the layout cannot split (the config checked it already
    when it knew them; a job file written by hand gets the same messages here)."""
    problems = layout_problems(
        lay.tp, lay.sp, n_heads=model_cfg.n_heads, n_kv_heads=model_cfg.n_kv_heads, seq_len=seq_len, section=section,
        moe=bool(model_cfg.moe_experts), attention=model_cfg.attention, share_layers=model_cfg.share_layers,
    )
    if problems:
        raise ValueError("; ".join(problems))


def tensor_parallel_config(tp: int) -> dict:
    """What the DeepSpeed config gets for tensor parallelism: AutoTP with the llama layout."""
    return {"tensor_parallel": {"autotp_size": tp, "preset_model": "llama"}} if tp > 1 else {}


# ---------------------------------------------------------------------- sequence parallelism


class UlyssesAttention(nn.Module):
    """Attention.sequence_parallel: q [B, H, T/sp, Dh], k, v [B, K, T/sp, Dh] -> [B, H, T/sp, Dh],
    attending over the whole sequence through DeepSpeed's DistributedAttention."""

    def __init__(self, group):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        # DistributedAttention works on [B, T, heads, Dh]: scatter heads (2), gather the sequence (1)
        self.inner = DistributedAttention(_local_attention, group, scatter_idx=2, gather_idx=1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            raise ValueError("sequence parallelism covers causal rows only (pretraining); packed rows with segments are not split")
        out = self.inner(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, None)  # [B, T/sp, H, Dh]
        return out.transpose(1, 2)


def _local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """[B, T, H/sp, Dh] over the whole sequence -> [B, T, H/sp, Dh] (causal)."""
    return attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask).transpose(1, 2)


def sequence_parallel_mpu(model: Transformer, lay: Layout):
    """Build DeepSpeed's SP groups, route every attention through Ulysses and tell the model its slice;
    returns the mpu for deepspeed.initialize (None without sequence parallelism)."""
    if lay.sp == 1:
        return None
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    mpu.initialize_sequence_parallel(lay.sp)
    group = mpu.get_sequence_parallel_group()
    for module in model.modules():
        if isinstance(module, Attention):
            module.sequence_parallel = UlyssesAttention(group)
    model.sequence_rank, model.sequence_shards = mpu.get_sequence_parallel_rank(), lay.sp
    return mpu


def local_slice(tensor: torch.Tensor, lay: Layout) -> torch.Tensor:
    """[B, T, ...] -> this rank's [B, T / sp, ...] along the sequence."""
    if lay.sp == 1:
        return tensor
    width = tensor.shape[1] // lay.sp
    return tensor[:, lay.sp_rank * width : (lay.sp_rank + 1) * width]


def sp_lm_loss(engine, batch: torch.Tensor, lay: Layout, pad_id: int | None, label_smoothing: float, aux_weight: float):
    """lm_batch_loss (model/objectives.py) for a sequence-parallel rank: the same batch [B, T + 1] on
    every rank of the group, this rank's slice of it. total = this slice's summed (smoothed) CE over
    the group's target count (+ aux / sp), so the group's summed gradient is the one-rank mean's; the
    metrics are the group's (one all-reduce in the SP group), equal on every rank of it. The slice's
    logits [B, T / sp, V] are materialised (the fused chunked loss is not used here)."""
    import deepspeed.comm as dist
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    inputs, targets = split_batch(batch.to(engine.device), pad_id)
    group_targets = (targets != IGNORE_INDEX).sum().clamp(min=1).float()  # the whole batch is here: no collective
    inputs, targets = local_slice(inputs, lay), local_slice(targets, lay)
    logits, aux = engine(inputs)
    total = cross_entropy(logits, targets, label_smoothing, reduction="sum") / group_targets
    if aux_weight:
        total = total + aux_weight * aux / lay.sp
    with torch.no_grad():
        plain = cross_entropy(logits, targets, reduction="sum") / group_targets if label_smoothing else total.detach()
        parts = torch.stack([total.detach().double(), plain.double(), aux.detach().double() / lay.sp])
        dist.all_reduce(parts, group=mpu.get_sequence_parallel_group())  # each rank held its share of the group's loss
    return total, {"loss": parts[0], "ce": parts[1], "aux": parts[2], "tokens": inputs.numel()}


# ---------------------------------------------------------------------- export


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Every rank calls it; rank 0 gets the whole (unsharded) weights of a tensor-parallel engine.

    DeepSpeed's consolidated state dict gathers each AutoTP layer's shards (and ZeRO-3 partitions);
    the weights are the module's own, so bf16 training exports its rounded weights."""
    return engine._consolidated_16bit_state_dict()
