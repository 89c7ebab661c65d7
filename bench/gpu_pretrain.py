"""GPU benchmark: model FLOPs utilisation (MFU) of our DeepSpeed pretraining step on one GPU,
against a compiled plain-PyTorch loop on the same model and batches.

    python bench/gpu_pretrain.py --size 350m              # configs/pretrain-350m.yaml: shape, seq_len, micro batch
    python bench/gpu_pretrain.py --size 1b --attention cudnn
    python bench/gpu_pretrain.py --size 350m --micro-batch 8,16,32,48   # a sweep: one JSON line per micro batch
    python bench/gpu_pretrain.py --size 350m --compile off                # our blocks eager (the baseline stays compiled)
    python bench/gpu_pretrain.py --smoke                  # a tiny model on CPU: checks the script, measures nothing
    bash bench/gpu_check.sh                               # smoke + 350m + 1b in ~8 minutes (a lent GPU session)

What it does, per micro batch:
1. builds the model of the preset (model/transformer.py; vocabulary 32768 padded to 128) twice:
   ours goes through the training fast path (model/accel.py fast_path: TF32, the attention
   backend, per-block torch.compile, as Trainer does) into our DeepSpeed engine
   (lmfoundry.model.engine: AdamW, warmup + cosine, clipping 1.0, bf16, ZeRO stage 1); the
   baseline is the textbook loop: fp32 weights, bf16 autocast, fused AdamW, clipping, and the
   whole model under torch.compile (--baseline-compile off to drop that);
2. alternates the two in chunks of --chunk steps (the first --warmup of each untimed: compiling);
   each chunk is a round and the median round's tokens/s counts;
3. MFU = FLOPs/token x tokens/s / peak: FLOPs/token is Transformer.flops_per_token
   (model/accel.py FLOP_CONVENTION: 6N + 12*L*T*d, causal not halved), the peak the GPU's dense
   bf16 peak from its name (model/accel.py) or --peak-tflops.
Memory: ``peak_memory_gib`` is the process peak (both sides' weights and optimizer states stay
resident while they alternate); ``step_memory_gib`` per side is its steps' peak above what was
allocated when its chunk began (activations, gradients, workspaces).
The last stdout line is the benchmark JSON object (with a sweep, one line per micro batch). The
data is a few random batches repeated, so the loss must fall; its value means nothing.
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

PRESETS = {"350m": "configs/pretrain-350m.yaml", "1b": "configs/pretrain-1b.yaml"}
SMOKE = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "pad_vocab_to": 128}


def micro_batches(text: str) -> list[int]:
    """argparse type of --micro-batch: one size or a comma list (a sweep)."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--micro-batch {text!r}: expected sizes like 16 or 8,16,32") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--micro-batch {text!r}: every size must be >= 1")
    return sizes


def shape(args):
    """(ModelConfig before resolve, seq_len, default micro batch) of --size, read from its preset."""
    from lmfoundry.infra.config import REPO_ROOT, ModelConfig, load_config

    if args.smoke:
        return ModelConfig(**SMOKE), 32, 2
    cfg = load_config(REPO_ROOT / PRESETS[args.size])
    return cfg.model, cfg.tokenize.seq_len, cfg.pretrain.distributed.micro_batch_size


def parse(argv):
    parser = argparse.ArgumentParser(prog="gpu_pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(PRESETS), default="350m", help="the preset whose model, seq_len and micro batch to use")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (fp32, gloo, no compile): checks the script, measures nothing")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per side first (compilation happens here)")
    parser.add_argument("--chunk", type=int, default=5, help="steps per side before switching")
    parser.add_argument("--micro-batch", type=micro_batches, default=None, help="sequences per step, or a comma list to sweep (default: the preset's)")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the preset's tokenize.seq_len")
    parser.add_argument("--vocab", type=int, default=32768, help="tokenizer size (padded to the preset's pad_vocab_to)")
    parser.add_argument("--zero", type=int, default=1, choices=[0, 1, 2, 3])
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile our blocks (auto: on for cuda)")
    parser.add_argument(
        "--baseline-compile", choices=["model", "blocks", "off"], default=None,
        help="torch.compile the baseline's whole model (default on cuda), each of its blocks, or nothing (default on cpu)",
    )
    parser.add_argument("--attention", default="auto", choices=["auto", "flash", "cudnn", "efficient", "math", "fa3"], help="attention backend (sdpa_kernel) of both sides; fa3: ours only, the baseline keeps SDPA")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (default: from its name)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.chunk, args.vocab = 3, 1, 2, 100
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.smoke else "cuda")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    import gc

    import torch

    from lmfoundry.model.engine import init_single_process

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_pretrain: no CUDA device; run with --smoke to check the script on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    if not args.smoke:
        torch.cuda.set_device(device)
    init_single_process("gloo" if args.smoke else "nccl")
    model_shape, seq_len, preset_micro = shape(args)
    seq_len = args.seq_len or seq_len
    status = 0
    for micro in args.micro_batch or [preset_micro]:
        result = run_point(args, torch, device, model_shape, seq_len, micro)
        gc.collect()  # the next sweep point starts from an empty device and fresh compilations
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        status = status or (0 if result["quality"]["same_start_loss"] and result["quality"]["loss_falls"] else 1)
    return status


def run_point(args, torch, device, model_shape, seq_len: int, micro: int) -> dict:
    """Both sides at one micro batch: build, alternate, measure; prints and returns the JSON object."""
    import torch.nn.functional as F

    from lmfoundry.bench._common import median_chunk_rate, print_result
    from lmfoundry.infra.config import PretrainConfig
    from lmfoundry.model import accel
    from lmfoundry.model.engine import build_engine, engine_step
    from lmfoundry.model.transformer import Transformer, resolve

    cuda = device.type == "cuda"
    model_cfg = resolve(model_shape, args.vocab)
    compile_ours = cuda if args.compile == "auto" else args.compile == "on"
    compile_baseline = args.baseline_compile or ("model" if cuda else "off")
    total_steps = args.warmup + args.steps
    cfg = PretrainConfig(
        steps=total_steps, global_batch_size=micro, lr=3e-3 if args.smoke else 3e-4, min_lr=3e-5, warmup_steps=2,
        distributed={"accelerator": device.type, "zero_stage": args.zero, "compile": compile_ours, "attention_backend": args.attention,
                     "peak_tflops": args.peak_tflops or 0.0},
    )
    generator = torch.Generator().manual_seed(0)
    # a few batches repeated, so the loss falls within the run (one in the smoke run, whose 4 steps are few)
    batches = [torch.randint(0, args.vocab, (micro, seq_len + 1), generator=generator).to(device) for _ in range(1 if args.smoke else 4)]

    built = time.perf_counter()
    torch.manual_seed(0)
    model = Transformer(model_cfg)
    kernels, fast = accel.fast_path(model, model_cfg, cfg.distributed, cfg.precision, device)  # as Trainer.__init__ does
    engine = build_engine(model, cfg, world_size=1)
    torch.manual_seed(0)
    baseline = Transformer(model_cfg).to(device)
    optimizer = torch.optim.AdamW(baseline.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=cuda)
    forward = torch.compile(baseline) if compile_baseline == "model" else baseline
    if compile_baseline == "blocks":
        accel.compile_blocks(baseline)
    build_s = time.perf_counter() - built
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext

    def ours(batch):
        return engine_step(engine, [batch], None, cfg, 0.0)["loss"]

    def plain(batch):
        with autocast():
            logits, _ = forward(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(baseline.parameters(), cfg.grad_clip)
        optimizer.step()
        return loss.item()  # the same per-step host read as ours

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def allocated():
        return torch.cuda.memory_allocated(device) if cuda else 0

    chunks: dict[str, list[tuple[int, float]]] = {"ours": [], "baseline": []}  # (timed steps, seconds) per round
    losses: dict[str, list[float]] = {"ours": [], "baseline": []}
    step_memory, peak_memory = {"ours": 0, "baseline": 0}, 0
    with kernels:  # the attention backend, for both sides
        for start in range(0, total_steps, args.chunk):
            for name, step in (("ours", ours), ("baseline", plain)):
                timed_steps, seconds = 0, 0.0
                sync()
                resident = allocated()
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                for i in range(start, min(start + args.chunk, total_steps)):
                    sync()
                    began = time.perf_counter()
                    losses[name].append(step(batches[i % len(batches)]))
                    sync()
                    if i >= args.warmup:
                        timed_steps, seconds = timed_steps + 1, seconds + time.perf_counter() - began
                chunks[name].append((timed_steps, seconds))
                if cuda:
                    step_memory[name] = max(step_memory[name], torch.cuda.max_memory_allocated(device) - resident)
                    peak_memory = max(peak_memory, torch.cuda.max_memory_allocated(device))

    tokens_per_step = micro * seq_len
    flops = model.flops_per_token(seq_len)
    tps = {name: median_chunk_rate(rounds, tokens_per_step) for name, rounds in chunks.items()}
    peak = fast["peak_tflops"] if cuda else None  # the CPU's nominal peak would make a meaningless MFU
    mfu = {name: (flops * tps[name] / (peak * 1e12) if peak else None) for name in tps}
    checks = {"same_start_loss": abs(losses["ours"][0] - losses["baseline"][0]) < 0.05, "loss_falls": losses["ours"][-1] < losses["ours"][0]}
    ratio_of = "mfu" if peak else "tokens_per_s"
    measured = mfu if peak else tps
    gib = 2**30
    compiled = {"model": "-compiled", "blocks": "-compiled-blocks", "off": ""}[compile_baseline]
    baseline_name = "pytorch-loop" + compiled + ("-bf16-autocast-fused-adamw" if cuda else "-fp32-adamw")
    same = {"micro_batch": micro, "seq_len": seq_len, "vocab": args.vocab, "steps": args.steps, "warmup": args.warmup,
            "chunk": args.chunk, "attention": fast["attention"], "grad_clip": cfg.grad_clip, "rounds": "chunks", "statistic": "median"}
    result = print_result(
        "gpu_pretrain", ratio_of, measured["ours"], baseline_name, measured["baseline"],
        digits=4 if peak else 1,
        n=args.steps * tokens_per_step,
        settings={
            "ours": {"engine": f"DeepSpeed ZeRO-{args.zero}", "precision": cfg.precision, "compiled_blocks": fast["compiled_blocks"], **same},
            "pytorch-loop": {"precision": "fp32 weights, bf16 autocast" if cuda else "fp32", "optimizer": "AdamW fused" if cuda else "AdamW",
                             "compiled": {"model": "whole model", "blocks": "each block", "off": "no"}[compile_baseline], **same},
        },
        quality={
            "device": fast["device"],
            "size": "smoke" if args.smoke else args.size,
            "parameters": model.num_parameters(),
            "flops_per_token": flops,
            "flop_convention": accel.FLOP_CONVENTION,
            "peak_tflops": peak,
            "peak_source": fast["peak_source"] if cuda else "none on cpu (MFU not reported)",
            "ratio_of": ratio_of,
            "mfu_ours": round(mfu["ours"], 4) if peak else None,
            "mfu_baseline": round(mfu["baseline"], 4) if peak else None,
            "tokens_per_s_ours": round(tps["ours"], 1),
            "tokens_per_s_baseline": round(tps["baseline"], 1),
            "achieved_tflops_ours": round(flops * tps["ours"] / 1e12, 3),
            "peak_memory_gib": round(peak_memory / gib, 2) if cuda else None,
            "step_memory_gib_ours": round(step_memory["ours"] / gib, 2) if cuda else None,
            "step_memory_gib_baseline": round(step_memory["baseline"] / gib, 2) if cuda else None,
            "tf32": fast["tf32"],
            "precision": cfg.precision,
            "zero_stage": args.zero,
            "loss_first": round(losses["ours"][0], 4),
            "loss_last": round(losses["ours"][-1], 4),
            "build_s": round(build_s, 1),
            **checks,
        },
    )
    return result


if __name__ == "__main__":
    sys.exit(main())
