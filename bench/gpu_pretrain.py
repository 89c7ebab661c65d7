"""GPU benchmark: model FLOPs utilisation (MFU) of our DeepSpeed pretraining step on one GPU.

    python bench/gpu_pretrain.py                    # 350M model, bf16, ZeRO-1, SDPA flash attention
    python bench/gpu_pretrain.py --size 125m --steps 50
    python bench/gpu_pretrain.py --smoke            # a tiny model on CPU: checks the script itself
    lmf bench gpu_pretrain [same flags]

One command that builds, checks and times, in a few minutes:
1. builds the model (model/transformer.py) at the chosen size and our DeepSpeed engine
   (lmfoundry.model.engine.build_engine: AdamW, warmup + cosine, clipping 1.0, bf16, ZeRO stage 1);
2. checks that the flash kernel of ``scaled_dot_product_attention`` accepts our attention
   shapes (then forces it while timing), and that both loops start from the same loss;
3. times ``lmfoundry.model.engine.engine_step`` and, as the baseline, a textbook PyTorch loop
   (fp32 weights, bf16 autocast, fused AdamW, clipping) on the same model and batches,
   alternating in chunks of --chunk steps; each chunk is a round and the median round's
   tokens/s counts. MFU = FLOPs/token (6N + attention) x tokens/s / peak.
The last stdout line is the benchmark JSON object. The peak comes from the GPU's name
(dense bf16) or ``--peak-tflops``. The data is a few random batches repeated, so the loss
must fall (a check that training happens); its value means nothing.
"""
from __future__ import annotations

import os
import sys

# run as a plain script, Python puts bench/ first on the path, where bench/tokenize.py would
# shadow the standard library's tokenize: put the repository root there instead
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from contextlib import nullcontext  # noqa: E402

SIZES = {
    # GPT-2 small / medium shapes with the GPT-2-like padded vocabulary of 50304
    "125m": {"d_model": 768, "n_layers": 12, "n_heads": 12, "n_kv_heads": 12},
    "350m": {"d_model": 1024, "n_layers": 24, "n_heads": 16, "n_kv_heads": 16},
    "smoke": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
}
PEAK_BF16_TFLOPS = [  # dense, per GPU; the first name contained in the device name wins
    ("H100 PCIe", 756.0), ("H200", 989.4), ("H100", 989.4), ("H800", 989.4), ("GH200", 989.4), ("B200", 2250.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0), ("A6000", 154.8),
]


def peak_tflops(device_name: str) -> float | None:
    for name, peak in PEAK_BF16_TFLOPS:
        if name.lower() in device_name.lower():
            return peak
    return None


def flash_check(torch, cfg, batch: int, seq_len: int, device) -> tuple[bool, str]:
    """Does the flash SDPA kernel take our shapes (GQA included)?"""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    head_dim = cfg.d_model // cfg.n_heads
    q = torch.randn(batch, cfg.n_heads, seq_len, head_dim, device=device, dtype=torch.bfloat16)
    kv = torch.randn(batch, cfg.n_kv_heads, seq_len, head_dim, device=device, dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=cfg.n_kv_heads != cfg.n_heads)
        return True, "ok"
    except RuntimeError as exc:
        return False, str(exc).splitlines()[0][:200]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["125m", "350m"], default="350m")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (fp32, gloo): checks the script, measures nothing")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per side first")
    parser.add_argument("--chunk", type=int, default=10, help="steps per side before switching")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--zero", type=int, default=1, choices=[0, 1, 2, 3])
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (default: from its name)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.chunk, args.micro_batch, args.seq_len, args.vocab = 3, 1, 2, 2, 32, 128
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.smoke else "cuda")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    import torch

    from lmfoundry.bench._common import median_chunk_rate, print_result
    from lmfoundry.infra.config import ModelConfig, PretrainConfig
    from lmfoundry.model.losses import lm_loss, split_batch
    from lmfoundry.model.engine import build_engine, engine_step, init_single_process
    from lmfoundry.model.transformer import Transformer, resolve

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_pretrain: no CUDA device; run with --smoke to check the script on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    if not args.smoke:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    init_single_process("gloo" if args.smoke else "nccl")
    model_cfg = resolve(ModelConfig(**SIZES["smoke" if args.smoke else args.size]), args.vocab)
    precision = "fp32" if args.smoke else "bf16"
    total_steps = args.warmup + args.steps
    cfg = PretrainConfig(
        steps=total_steps, global_batch_size=args.micro_batch, lr=3e-4, min_lr=3e-5, warmup_steps=2, precision=precision,
        distributed=PretrainConfig.Distributed(zero_stage=args.zero, accelerator=device.type, backend="gloo" if args.smoke else "nccl"),
    )
    device_name = "cpu" if args.smoke else torch.cuda.get_device_name(device)
    peak = args.peak_tflops or (None if args.smoke else peak_tflops(device_name))

    flash_ok, flash_note = (False, "cpu smoke run") if args.smoke else flash_check(torch, model_cfg, args.micro_batch, args.seq_len, device)
    attention = nullcontext
    if flash_ok:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        attention = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)  # noqa: E731

    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.micro_batch, args.seq_len + 1), generator=generator).to(device) for _ in range(4)]

    built = time.perf_counter()
    torch.manual_seed(0)
    engine = build_engine(Transformer(model_cfg), cfg, world_size=1)
    torch.manual_seed(0)
    baseline = Transformer(model_cfg).to(device)
    optimizer = torch.optim.AdamW(baseline.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=not args.smoke)
    build_s = time.perf_counter() - built
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if not args.smoke else nullcontext

    def ours(batch):
        return engine_step(engine, [batch], None, cfg, 0.0)["loss"]

    def plain(batch):
        inputs, targets = split_batch(batch)
        with autocast():
            logits, _ = baseline(inputs)
        loss = lm_loss(logits, targets).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(baseline.parameters(), cfg.grad_clip)
        optimizer.step()
        return loss.item()  # the same per-step host sync as ours

    def sync():
        if not args.smoke:
            torch.cuda.synchronize()

    chunks: dict[str, list[tuple[int, float]]] = {"ours": [], "baseline": []}  # (timed steps, seconds) per round
    losses: dict[str, list[float]] = {"ours": [], "baseline": []}
    with attention():
        for start in range(0, total_steps, args.chunk):
            for name, step in (("ours", ours), ("baseline", plain)):
                timed_steps, seconds = 0, 0.0
                for i in range(start, min(start + args.chunk, total_steps)):
                    sync()
                    began = time.perf_counter()
                    losses[name].append(step(batches[i % len(batches)]))
                    sync()
                    if i >= args.warmup:
                        timed_steps, seconds = timed_steps + 1, seconds + time.perf_counter() - began
                chunks[name].append((timed_steps, seconds))

    tokens = args.steps * args.micro_batch * args.seq_len
    flops = engine.module.flops_per_token(args.seq_len)
    tps = {name: median_chunk_rate(rounds, args.micro_batch * args.seq_len) for name, rounds in chunks.items()}
    mfu = {name: (flops * tps[name] / (peak * 1e12) if peak else None) for name in tps}
    checks = {
        "flash_attention": flash_ok,
        "flash_note": flash_note,
        "same_start_loss": abs(losses["ours"][0] - losses["baseline"][0]) < 0.05,
        "loss_falls": losses["ours"][-1] < losses["ours"][0],
    }
    ratio_of = "mfu" if peak else "tokens_per_s"
    measured = mfu if peak else tps
    same = {"micro_batch": args.micro_batch, "seq_len": args.seq_len, "vocab": args.vocab, "steps": args.steps, "warmup": args.warmup,
            "chunk": args.chunk, "flash_attention": flash_ok, "grad_clip": cfg.grad_clip, "rounds": "chunks", "statistic": "median"}
    print_result(
        "gpu_pretrain", ratio_of, measured["ours"], "pytorch-loop-bf16-autocast-fused-adamw", measured["baseline"],
        digits=4 if peak else 1,
        n=tokens,
        settings={
            "ours": {"engine": f"DeepSpeed ZeRO-{args.zero}", "precision": precision, **same},
            "pytorch-loop": {"precision": "fp32 weights, bf16 autocast" if not args.smoke else "fp32", "optimizer": "AdamW fused" if not args.smoke else "AdamW", **same},
        },
        quality={
            "device": device_name,
            "size": "smoke" if args.smoke else args.size,
            "parameters": engine.module.num_parameters(),
            "flops_per_token": flops,
            "peak_tflops": peak,
            "ratio_of": ratio_of,
            "tokens_per_s_ours": round(tps["ours"], 1),
            "tokens_per_s_baseline": round(tps["baseline"], 1),
            "achieved_tflops_ours": round(flops * tps["ours"] / 1e12, 3),
            "precision": precision,
            "zero_stage": args.zero,
            "micro_batch": args.micro_batch,
            "seq_len": args.seq_len,
            "loss_first": round(losses["ours"][0], 4),
            "loss_last": round(losses["ours"][-1], 4),
            "build_s": round(build_s, 1),
            "max_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if not args.smoke else None,
            **checks,
        },
    )
    return 0 if checks["same_start_loss"] and checks["loss_falls"] else 1


if __name__ == "__main__":
    sys.exit(main())
