"""The fast path on an accelerator: TF32, the MFU peak, compiled blocks and the attention kernel.

    from lmfoundry.model import accel
    accel.enable_tf32("cuda")                        # fp32 matmuls in TF32 (a no-op on cpu)
    peak, source = accel.resolve_peak(0.0, "cuda", torch.cuda.get_device_name())   # (989.0, "H200 ...")
    accel.compile_blocks(model)                      # torch.compile each Transformer block in place
    with accel.attention_kernel("flash"): ...        # force one SDPA backend ("auto": SDPA chooses)
    accel.check_attention("cudnn", device, dtype, model.cfg)   # AttentionBackendError when unavailable

model/train.py (Trainer.__init__) applies all of them from the recipe's ``distributed`` section;
bench/gpu_pretrain.py uses the same functions. Everything here is a pure function of its
arguments (the peak table, the backend names) except the switches, which set process-wide
torch state on purpose: one training rank is one process.
"""
from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Dense bf16 tensor-core peak of one device in TFLOP/s (no 2:4 sparsity), from the vendors' data
# sheets. The first name contained in the device name wins, so the more specific names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H800", 989.0), ("H20", 148.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0),
    ("A10", 125.0), ("A6000", 154.8), ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0),
]
# A CPU has no meaningful tensor-core peak: MFU on CPU divides by this nominal 1 TFLOP/s, so it
# reads as achieved TFLOP/s, not as a utilisation.
CPU_NOMINAL_TFLOPS = 1.0

# What Transformer.flops_per_token counts, written next to every MFU number (metrics, DONE.json).
FLOP_CONVENTION = (
    "6N + 12*L*T*d per token: N = weights of every linear layer a token passes (output projection "
    "included even when tied, only top_k routed experts, no embedding lookup), forward 2N + backward 4N; "
    "attention scores and values 4*T*d per layer forward, x3 for training, over the full T x T square "
    "(causal masking not halved)"
)

# the same, short enough for every metrics line ("mfu_flops")
FLOP_CONVENTION_SHORT = "6N + 12*L*T*d per token (causal not halved; see DONE.json fast_path.flop_convention)"

SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")
ATTENTION_BACKENDS = ("auto", *SDPA_BACKENDS, "fa3")


class AttentionBackendError(ValueError):
    pass


def peak_tflops_for(device_name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a device by its name (torch.cuda.get_device_name), None if unknown."""
    lowered = device_name.lower()
    for name, peak in PEAK_BF16_TFLOPS:
        if name.lower() in lowered:
            return peak
    return None


def resolve_peak(configured: float, accelerator: str, device_name: str) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it came from) for MFU: a configured value > 0 wins; else the table by
    device name on cuda; else the CPU nominal value. An unknown GPU gives None (MFU is then not
    reported) and a source that says which field to set."""
    if configured > 0:
        return configured, "configured distributed.peak_tflops"
    if accelerator != "cuda":
        return CPU_NOMINAL_TFLOPS, "cpu nominal 1.0 (MFU on CPU is achieved TFLOP/s, not a utilisation)"
    peak = peak_tflops_for(device_name)
    if peak is None:
        return None, f"unknown GPU '{device_name}': set distributed.peak_tflops to its dense bf16 data-sheet value to get MFU"
    return peak, f"{device_name}: dense bf16 peak from model/accel.py's table"


def enable_tf32(accelerator: str) -> bool:
    """On cuda, let fp32 matmuls and convolutions use TF32 tensor cores (bf16 training keeps its
    fp32 pieces: norms, the loss, optimizer math). Returns whether it was turned on."""
    if accelerator != "cuda":
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True


def blocks(model: nn.Module) -> list[nn.Module]:
    """Every distinct Transformer block in ``model`` (a bare Transformer, or a head wrapping one)."""
    from lmfoundry.model.transformer import Block

    found: dict[int, nn.Module] = {}
    for module in model.modules():
        if isinstance(module, Block):
            found.setdefault(id(module), module)
    return list(found.values())


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """torch.compile every block in place (nn.Module.compile: parameter names, state_dict and
    checkpoints are unchanged). Per block rather than the whole model: one graph is compiled
    once and reused by every layer, and the embedding, loss and DeepSpeed hooks stay eager.
    Returns the number of blocks compiled."""
    found = blocks(model)
    for block in found:
        block.compile(backend=backend)
    return len(found)


def fa3_available() -> bool:
    return importlib.util.find_spec("flash_attn_interface") is not None


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def attention_kernel(name: str):
    """A context that forces one SDPA backend ("auto" and "fa3": no restriction on SDPA; fa3 is
    switched on per model by use_fa3, SDPA still serves masked and cached attention)."""
    if name not in ATTENTION_BACKENDS:
        raise AttentionBackendError(f"distributed.attention_backend '{name}' is not one of {', '.join(ATTENTION_BACKENDS)}")
    if name not in SDPA_BACKENDS:
        return nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(_sdpa_backend(name))


def check_attention(name: str, device: torch.device, dtype: torch.dtype, cfg) -> str:
    """Run one small causal attention of the model's head layout under backend ``name``; returns a
    description for the start-of-run log line, or raises AttentionBackendError saying why the
    backend cannot run here and what to choose instead."""
    if name == "auto":
        usable = [backend for backend in SDPA_BACKENDS if _sdpa_runs(backend, device, dtype, cfg) is None]
        return f"auto (SDPA chooses per call; usable here: {', '.join(usable) or 'none'})"
    if name == "fa3":
        if device.type != "cuda" or not fa3_available():
            why = "the flash_attn_interface module (FlashAttention 3) is not installed" if not fa3_available() else "it runs on cuda only"
            raise AttentionBackendError(f"distributed.attention_backend fa3: {why}; choose auto, flash, cudnn, efficient or math")
        return "fa3 (flash_attn_interface for causal rows; SDPA for masked and cached attention)"
    head_dim = cfg.d_model // cfg.n_heads
    reason = _sdpa_runs(name, device, dtype, cfg)
    if reason is not None:
        raise AttentionBackendError(
            f"distributed.attention_backend {name} cannot run on {device.type} with {dtype} and head_dim {head_dim} "
            f"({reason}); choose auto (SDPA picks a kernel that can) or another backend"
        )
    return f"{name} (forced through sdpa_kernel; checked on {device.type}, {dtype}, head_dim {head_dim})"


def _sdpa_runs(name: str, device: torch.device, dtype: torch.dtype, cfg) -> str | None:
    """None when SDPA backend ``name`` runs a small causal attention of the model's head layout,
    else why not (the kernel's own words)."""
    head_dim = cfg.d_model // cfg.n_heads
    q = torch.randn(1, cfg.n_heads, 16, head_dim, device=device, dtype=dtype)
    kv = torch.randn(1, cfg.n_kv_heads, 16, head_dim, device=device, dtype=dtype)
    try:
        with warnings.catch_warnings(), attention_kernel(name):
            warnings.simplefilter("ignore")  # each refusing kernel also warns; the error says it once
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=cfg.n_kv_heads != cfg.n_heads)
    except RuntimeError as exc:
        return " ".join(str(exc).split())[:300]
    return None


def use_fa3(model: nn.Module) -> None:
    """Route each block's causal, unmasked attention through FlashAttention 3's flash_attn_func."""
    import flash_attn_interface

    for block in blocks(model):
        block.self_attn.causal_kernel = flash_attn_interface.flash_attn_func


@contextmanager
def attention_for_run(name: str, model: nn.Module, cfg, device: torch.device, dtype: torch.dtype) -> Iterator[str]:
    """Check backend ``name`` on the model's head layout (cfg: its ModelConfig), switch it on for
    the model and yield its description (logged once)."""
    described = check_attention(name, device, dtype, cfg)
    if name == "fa3":
        use_fa3(model)
    with attention_kernel(name):
        yield described


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fast_path(model: nn.Module, cfg, dist, precision: str, device: torch.device) -> tuple[ExitStack, dict[str, Any]]:
    """Apply a training section's execution knobs (dist: its ``distributed``) to a freshly built
    model on this rank: TF32, the attention kernel, compiled blocks, the MFU peak. Returns the
    open attention context (keep it for the rank's life) and what was chosen, for the log line
    and DONE.json. Under ZeRO-3 the blocks stay eager (``compiled_blocks`` 0): its parameter
    gathering runs in hooks around every block."""
    stack = ExitStack()
    tf32 = enable_tf32(dist.accelerator)
    attention = stack.enter_context(attention_for_run(dist.attention_backend, model, cfg, device, DTYPES[precision]))
    # ZeRO-3 gathers each block's parameters in module hooks around its forward: left eager
    compiled = compile_blocks(model) if dist.compile and dist.zero_stage < 3 else 0
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak, source = resolve_peak(dist.peak_tflops, dist.accelerator, device_name)
    chosen = {"device": device_name, "precision": precision, "tf32": tf32, "attention": attention, "compiled_blocks": compiled,
              "peak_tflops": peak, "peak_source": source, "flop_convention": FLOP_CONVENTION}
    return stack, chosen


def describe(chosen: dict[str, Any]) -> str:
    """The start-of-run line: what fast_path chose."""
    peak = f"{chosen['peak_tflops']:g} TFLOP/s" if chosen["peak_tflops"] else "none"
    return (
        f"fast path on {chosen['device']}: precision {chosen['precision']}, tf32 {'on' if chosen['tf32'] else 'off'}, "
        f"attention {chosen['attention']}, compiled blocks {chosen['compiled_blocks']}; MFU peak {peak} ({chosen['peak_source']}); "
        f"FLOPs/token = {FLOP_CONVENTION}"
    )
