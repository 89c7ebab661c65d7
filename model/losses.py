"""Training losses: language modelling, and the preference losses of post-training.

    loss = lm_loss(logits, targets, label_smoothing=0.1, aux=aux, aux_weight=0.01)
    loss.total.backward()
    sums = linear_cross_entropy(hidden, lm_head_weight, targets, 0.1, chunk=4096)  # no [B, T, V] logits
    loss = lm_loss_from_sums(sums, aux=aux, aux_weight=0.01)
    logp = sequence_logprobs(logits, targets, mask)                 # [B] summed log-probs
    loss = reward_loss(r_chosen, r_rejected, margin=0.5)            # Bradley-Terry
    out = dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1)

Targets equal to ``ignore_index`` (padding, prompt tokens in SFT) are left out of every mean.
The language-modelling losses take the smoothed and the plain cross-entropy from one pass over
the logits, a chunk of tokens at a time in fp32 (never an fp32 copy of all the logits), and
compute the gradient in that same pass; ``linear_cross_entropy`` also folds in the output
projection, so the full [B, T, V] logits never exist (memory measured in tests/model/test_fused_loss.py).
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
    chunk: int = 4096,
) -> LMLoss:
    """logits [B, T, V], targets [B, T] -> mean smoothed CE (+ aux_weight * aux) and the plain CE,
    both from one pass (fused_cross_entropy); no host read (an all-ignored batch gives 0, not NaN)."""
    return lm_loss_from_sums(fused_cross_entropy(logits, targets, label_smoothing, chunk), aux, aux_weight)


@dataclass
class CESums:
    """Token sums of one pass over the logits: what backward runs on, and the counts to divide by."""

    smoothed: torch.Tensor  # summed smoothed CE over the scored targets (carries the gradient)
    plain: torch.Tensor  # summed plain CE (detached)
    count: torch.Tensor  # scored targets (not IGNORE_INDEX), a float tensor on the same device


def lm_loss_from_sums(sums: CESums, aux: torch.Tensor | None = None, aux_weight: float = 0.0) -> LMLoss:
    """CESums -> LMLoss with means over the scored targets; the division stays on the device."""
    count = sums.count.clamp(min=1)
    smoothed = sums.smoothed / count
    aux = aux if aux is not None else smoothed.new_zeros(())
    total = smoothed + aux_weight * aux if aux_weight else smoothed
    return LMLoss(total=total, ce=(sums.plain / count).detach(), aux=aux.detach())


def _ce_chunk(z: torch.Tensor, targets: torch.Tensor, eps: float, want_grad: bool):
    """One chunk: logits z [c, V] (fp32, overwritten), targets [c] -> (smoothed sum, plain sum, count,
    d(smoothed sum)/dz [c, V] fp32 or None). Per token, with lse = logsumexp(z):
    plain = lse - z[t], smoothed = (1 - eps) * plain + eps * (lse - mean(z)), as F.cross_entropy;
    the gradient is softmax(z) - (1 - eps) * onehot(t) - eps / V, zero on ignored rows."""
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    weight = valid.to(z.dtype)
    lse = torch.logsumexp(z, dim=-1)  # [c]
    plain = (lse - z.gather(1, safe[:, None]).squeeze(1)) * weight
    smooth = (lse - z.mean(dim=-1)) * weight
    smoothed = (1 - eps) * plain + eps * smooth if eps else plain
    grad = None
    if want_grad:
        grad = z.sub_(lse[:, None]).exp_()  # softmax, in place: no second [c, V] buffer
        grad.scatter_add_(1, safe[:, None], torch.full_like(lse[:, None], -(1 - eps)))
        if eps:
            grad.sub_(eps / z.shape[1])
        grad.mul_(weight[:, None])
    return smoothed.sum(), plain.sum(), weight.sum(), grad


class _ChunkedCE(torch.autograd.Function):
    """Cross-entropy over logits [N, V] chunk by chunk; the gradient is made in the forward pass
    and kept in the logits' dtype, so no fp32 [N, V] tensor is ever alive."""

    @staticmethod
    def forward(ctx, logits, targets, eps, chunk):
        acc = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for fp64 logits
        sums = torch.zeros(3, dtype=acc, device=logits.device)
        want = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if want else None
        for start in range(0, logits.shape[0], chunk):
            stop = min(start + chunk, logits.shape[0])
            z = logits[start:stop].to(acc, copy=True)  # _ce_chunk overwrites it
            s, p, c, g = _ce_chunk(z, targets[start:stop], eps, want)
            sums += torch.stack([s, p, c])
            if want:
                grad[start:stop] = g
        ctx.save_for_backward(grad)
        smoothed, plain, count = sums.unbind()
        ctx.mark_non_differentiable(plain, count)
        return smoothed, plain, count

    @staticmethod
    def backward(ctx, grad_smoothed, _plain, _count):
        (grad,) = ctx.saved_tensors
        return grad * grad_smoothed.to(grad.dtype), None, None, None


def fused_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0, chunk: int = 4096) -> CESums:
    """logits [..., V], targets [...] -> CESums: smoothed and plain CE summed in one pass.

    Half-precision logits go `chunk` tokens at a time in fp32 (_ChunkedCE: the gradient is kept in
    the logits' dtype, no fp32 copy of all of them). fp32 logits need no copy: they go through
    torch.log_softmax, PyTorch's own kernels, so the gradient is bit for bit F.cross_entropy's."""
    V = logits.shape[-1]
    flat, flat_targets = logits.reshape(-1, V), targets.reshape(-1)
    if logits.dtype in (torch.float32, torch.float64):
        return _log_softmax_sums(flat, flat_targets, float(label_smoothing))
    return CESums(*_ChunkedCE.apply(flat, flat_targets, float(label_smoothing), max(1, chunk)))


def _log_softmax_sums(logits: torch.Tensor, targets: torch.Tensor, eps: float) -> CESums:
    """logits [N, V] (fp32/fp64), targets [N] -> CESums from one log_softmax, through autograd."""
    valid = targets != IGNORE_INDEX
    weight = valid.to(logits.dtype)
    logp = torch.log_softmax(logits, dim=-1)  # [N, V]
    plain = -(logp.gather(1, torch.where(valid, targets, torch.zeros_like(targets))[:, None]).squeeze(1) * weight).sum()
    smoothed = (1 - eps) * plain - eps * (logp.mean(dim=-1) * weight).sum() if eps else plain
    return CESums(smoothed, plain.detach(), weight.sum())


class _LinearCE(torch.autograd.Function):
    """hidden [N, D] @ weight[V, D]^T -> cross-entropy, chunk by chunk: each chunk's logits are
    made, scored and turned into the gradients of hidden and weight, then freed. The matmuls run
    in the weight's dtype (bf16 on GPUs), the softmax in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, eps, chunk):
        acc = torch.promote_types(weight.dtype, torch.float32)
        sums = torch.zeros(3, dtype=acc, device=hidden.device)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want = want_h or want_w
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            z = h @ weight.t()  # [c, V]
            s, p, c, g = _ce_chunk(z.to(acc), targets[start : start + chunk], eps, want)
            del z
            sums += torch.stack([s, p, c])
            if want:
                g = g.to(weight.dtype)
                if want_h:
                    grad_h[start : start + chunk] = g @ weight
                if want_w:
                    grad_w.add_(g.t() @ h)  # bf16 matmul, accumulated in fp32 over chunks
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        smoothed, plain, count = sums.unbind()
        ctx.mark_non_differentiable(plain, count)
        return smoothed, plain, count

    @staticmethod
    def backward(ctx, grad_smoothed, _plain, _count):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_smoothed.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_smoothed).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0, chunk: int = 4096) -> CESums:
    """Output projection and cross-entropy fused: hidden [..., D], weight [V, D] (lm_head),
    targets [...] -> CESums, without the [..., V] logits; peak extra memory is one chunk's
    [chunk, V] fp32 logits plus a [V, D] fp32 weight gradient."""
    D = hidden.shape[-1]
    return CESums(*_LinearCE.apply(hidden.reshape(-1, D), weight, targets.reshape(-1), float(label_smoothing), max(1, chunk)))


def split_batch(batch: torch.Tensor, pad_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch [B, T + 1] -> inputs [B, T] and targets [B, T] (padding targets ignored)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    if pad_id is not None:  # torch.where, not a boolean-mask assignment: that one syncs with the host on GPUs
        return inputs, torch.where(targets == pad_id, torch.full_like(targets, IGNORE_INDEX), targets)
    return inputs, targets.clone()


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
