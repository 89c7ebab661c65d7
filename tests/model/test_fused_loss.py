"""model/losses.py's one-pass losses against F.cross_entropy: values and gradients, with label
smoothing, padding and packed (SFT) masks, across chunk boundaries; and the memory they save.

Run: .venv/bin/pytest -q tests/model/test_fused_loss.py (about 5 s).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lmfoundry.model.losses import IGNORE_INDEX, fused_cross_entropy, linear_cross_entropy, lm_loss, lm_loss_from_sums, masked_targets

N_B, N_T, DIM, VOCAB = 3, 7, 16, 37


def planted(seed: int = 0):
    """hidden [3, 7, 16], weight [37, 16], targets [3, 7] with padding at the end of row 2 and a
    packed-SFT mask that leaves only assistant spans of rows 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N_B, N_T, DIM, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, DIM, generator=g, dtype=torch.float64) * 0.5
    targets = torch.randint(0, VOCAB, (N_B, N_T), generator=g)
    padded = targets.clone()
    padded[2, 4:] = IGNORE_INDEX
    mask = torch.tensor([[0, 0, 1, 1, 0, 1, 1], [1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]])
    return hidden, weight, {"plain": targets, "padded": padded, "packed": masked_targets(targets, mask)}


def reference(hidden, weight, targets, eps):
    logits = hidden @ weight.t()
    flat = targets.reshape(-1)
    smoothed = F.cross_entropy(logits.reshape(-1, VOCAB), flat, ignore_index=IGNORE_INDEX, label_smoothing=eps)
    plain = F.cross_entropy(logits.reshape(-1, VOCAB), flat, ignore_index=IGNORE_INDEX)
    return smoothed, plain


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["plain", "padded", "packed"])
@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_linear_cross_entropy_equals_reference_loss_and_gradients(eps, kind, chunk):
    hidden, weight, all_targets = planted()
    targets = all_targets[kind]
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    smoothed, plain = reference(h_ref, w_ref, targets, eps)
    (smoothed * 3.0).backward()  # a scaled loss, as DeepSpeed's accumulation and loss scaling do
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = lm_loss_from_sums(linear_cross_entropy(h, w, targets, eps, chunk))
    (loss.total * 3.0).backward()
    assert loss.total.item() == pytest.approx(smoothed.item(), rel=1e-10)
    assert loss.ce.item() == pytest.approx(plain.item(), rel=1e-10)
    assert not loss.ce.requires_grad
    assert torch.allclose(h.grad, h_ref.grad, atol=1e-12) and torch.allclose(w.grad, w_ref.grad, atol=1e-12)
    if kind != "plain":
        assert (h.grad.reshape(-1, DIM)[targets.reshape(-1) == IGNORE_INDEX] == 0).all()  # ignored targets: zero gradient


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cross_entropy_on_logits_matches_and_leaves_the_logits_alone(eps, dtype):
    """fp32 logits: PyTorch's log_softmax path; bf16 logits: the chunked fp32 pass (chunks of 4
    rows over 21), gradient in bf16. Both against F.cross_entropy in fp64."""
    hidden, weight, all_targets = planted(1)
    targets = all_targets["padded"]
    logits = (hidden @ weight.t()).to(dtype).requires_grad_()
    kept = logits.detach().clone()
    loss = lm_loss(logits, targets, eps, aux=torch.tensor(2.0), aux_weight=0.5, chunk=4)
    loss.total.backward()
    ref_logits = kept.double().requires_grad_()
    flat = ref_logits.reshape(-1, VOCAB)
    smoothed = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, label_smoothing=eps)
    plain = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX)
    smoothed.backward()
    rel = 1e-6 if dtype == torch.float32 else 1e-5  # bf16 inputs are exact in fp32: only the sums round
    assert loss.total.item() == pytest.approx(smoothed.item() + 1.0, rel=rel)
    assert loss.ce.item() == pytest.approx(plain.item(), rel=rel) and loss.aux.item() == 2.0
    assert logits.grad.dtype == dtype
    atol = 1e-7 if dtype == torch.float32 else 2e-3  # the bf16 gradient is rounded to bf16
    assert torch.allclose(logits.grad.double(), ref_logits.grad, atol=atol)
    assert torch.equal(logits.detach(), kept)  # the fp32 chunk is a copy, not the caller's logits


def test_fp32_logits_get_exactly_pytorchs_gradient():
    """Bit for bit: CPU runs (fp32, full logits) train exactly as with F.cross_entropy."""
    torch.manual_seed(0)
    x = (torch.randn(64, 48) * 3).requires_grad_()
    t = torch.randint(0, 48, (64,))
    t[::7] = IGNORE_INDEX
    torch.nn.functional.cross_entropy(x, t, ignore_index=IGNORE_INDEX).backward()
    expected, x.grad = x.grad.clone(), None
    (lm_loss(x, t).total * 1.0).backward()
    assert torch.equal(x.grad, expected)


def test_all_ignored_batch_gives_zero_not_nan():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = lm_loss(logits, torch.full((2, 3), IGNORE_INDEX), 0.1)
    loss.total.backward()
    assert loss.total.item() == 0.0 and loss.ce.item() == 0.0 and (logits.grad == 0).all()


def test_bf16_weights_get_bf16_gradients_close_to_fp32():
    hidden, weight, all_targets = planted(2)
    targets = all_targets["plain"]
    h, w = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    loss = lm_loss_from_sums(linear_cross_entropy(h, w, targets, 0.1, chunk=8))
    loss.total.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    smoothed, _ = reference(h.detach().double(), w.detach().double(), targets, 0.1)
    assert loss.total.item() == pytest.approx(smoothed.item(), rel=2e-2)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_chunked_loss_never_allocates_the_full_logits():
    """A 32k vocabulary over 512 tokens: full fp32 logits are 64 MiB; with 64-token chunks the
    largest tensor is one chunk's logits (8 MiB), the weight gradient (4 MiB) or smaller."""
    vocab, tokens, dim, chunk = 32768, 512, 32, 64
    torch.manual_seed(0)
    hidden = torch.randn(tokens, dim, requires_grad=True)
    weight = (torch.randn(vocab, dim) * 0.1).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,))
    full = tokens * vocab * 4
    with LargestTensor() as fused:
        lm_loss_from_sums(linear_cross_entropy(hidden, weight, targets, 0.1, chunk)).total.backward()
    with LargestTensor() as plain:
        F.cross_entropy(hidden @ weight.t(), targets, label_smoothing=0.1).backward()
    assert plain.largest >= full  # the measurement sees the logits when they exist
    assert fused.largest <= chunk * vocab * 4 and fused.largest * 8 <= full, (fused.largest, full)
    # and the fused pass over logits never makes an fp32 copy of all of them
    logits = (hidden.detach() @ weight.detach().t()).bfloat16().requires_grad_()
    with LargestTensor() as on_logits:
        fused_cross_entropy(logits, targets, 0.1, chunk).smoothed.backward()
    assert on_logits.largest <= tokens * vocab * 2  # bf16 [N, V] (the gradient); fp32 only per chunk
