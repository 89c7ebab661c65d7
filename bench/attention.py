"""Benchmark: LSH attention (model/lsh_attention.py) against dense SDPA attention, on CPU.

    lmf bench attention [--lengths 1024,2048,4096,8192,16384] [--d-model 256] [--heads 4]
                        [--bucket-size 64] [--hashes 2] [--long-hashes 1] [--long-from 8192]
                        [--rounds 3] [--loss-steps 150] [--data /work/shared/data]

Two measurements, one result line:

1. Speed and memory. Per sequence length, one attention layer of each kind (the model's own
   ``Attention``, i.e. ``F.scaled_dot_product_attention`` causal, which on CPU is a fused
   flash-style kernel; and ``LSHAttention`` with ``--bucket-size`` chunks and ``--hashes``
   rounds, ``--long-hashes`` from ``--long-from`` tokens on) runs forward + backward on the same
   input [1, T, d_model], same rotary tables. Time: CPU seconds of this process (one pinned core,
   one torch thread), sides alternating, the median of ``--rounds``. Peak memory: the highest
   sum of live allocations the torch profiler records during one forward + backward (a
   separate, untimed run). ``per_length`` has both ratios (LSH / dense; below 1: LSH wins) and
   ``crossover`` the first length where LSH is faster / smaller (None: it never is here).
   Up to ``--masked-max`` tokens a third side runs dense SDPA with an explicit T x T mask (what
   packed rows use), which materialises the scores: ``*_masked`` columns.
2. Loss gap. Two small byte-level language models (vocabulary 256: UTF-8 bytes of the WARC
   pages' main text in ``--data``), identical except for the attention, train the same steps on
   the same batches from the same seed; ``loss`` has each one's held-out loss and the gap
   (LSH - dense, nats per byte). The sequence is ``--loss-bucket`` x 8 so LSH really is sparse.

``ours`` / ``baseline`` / ``ratio`` are the seconds of LSH / dense at the longest length (lower
is better).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmfoundry.bench._common import DEFAULT_DATA, allowed_cores, alternating_rounds, pin_one_core, print_result, rounds_arg, warc_paths, warc_texts


def lengths_arg(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lengths must be comma-separated integers (got {text!r})") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"--lengths needs at least one length of 2 or more (got {text!r})")
    return values


def model_cfg(args, attention: str, n_hashes: int, bucket: int, n_layers: int = 1, vocab: int = 256, d_model: int = 0):
    from lmfoundry.infra.config import ModelConfig
    from lmfoundry.model.transformer import resolve

    fields = {"d_model": d_model or args.d_model, "n_layers": n_layers, "n_heads": args.heads, "n_kv_heads": args.heads}
    return resolve(ModelConfig(**fields, attention=attention, lsh_n_hashes=n_hashes, lsh_bucket_size=bucket), vocab)


def peak_bytes(fn) -> int:
    """Highest total of live allocations during fn(), from the profiler's allocation records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


def layer_step(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None):
    """One forward + backward of an attention layer; returns a closure for the timers."""
    def run(_round: int = 0) -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x, cos, sin, mask).sum().backward()
    return run


def speed_and_memory(args) -> list[dict]:
    from lmfoundry.model.lsh_attention import LSHAttention
    from lmfoundry.model.transformer import Attention, block_causal_mask, rope_tables

    rows = []
    head_dim = args.d_model // args.heads
    for T in args.lengths:
        hashes = args.long_hashes if T >= args.long_from else args.hashes
        torch.manual_seed(0)
        dense = Attention(model_cfg(args, "dense", hashes, args.bucket_size))
        lsh = LSHAttention(model_cfg(args, "lsh", hashes, args.bucket_size))
        x = torch.randn(1, T, args.d_model, requires_grad=True)
        cos, sin = rope_tables(T, head_dim, 10000.0, x.device, x.dtype)
        steps = {"lsh": layer_step(lsh, x, cos, sin), "dense": layer_step(dense, x, cos, sin)}
        if T <= args.masked_max:  # what packed rows run: SDPA with a [1, 1, T, T] mask (materialised scores)
            steps["dense_masked"] = layer_step(dense, x, cos, sin, block_causal_mask(torch.zeros(1, T, dtype=torch.long)))
        for step in steps.values():
            step()  # warm-up: first-call allocations and kernel selection before the clock

        def clocked(step):
            def run(r: int) -> float:
                began = time.process_time()
                step(r)
                return time.process_time() - began
            return run

        seconds = alternating_rounds({name: clocked(step) for name, step in steps.items()}, args.rounds)
        peaks = {name: peak_bytes(step) for name, step in steps.items()}
        lsh_s, dense_s = statistics.median(seconds["lsh"]), statistics.median(seconds["dense"])
        row = {
            "seq_len": T, "lsh_hashes": hashes, "lsh_s": round(lsh_s, 6), "dense_s": round(dense_s, 6), "time_ratio": round(lsh_s / dense_s, 3),
            "lsh_peak_mb": round(peaks["lsh"] / 2**20, 3), "dense_peak_mb": round(peaks["dense"] / 2**20, 3),
            "memory_ratio": round(peaks["lsh"] / peaks["dense"], 3), "rounds_s": {k: [round(s, 6) for s in v] for k, v in seconds.items()},
        }
        if "dense_masked" in steps:
            masked_s = statistics.median(seconds["dense_masked"])
            row.update({
                "dense_masked_s": round(masked_s, 6), "dense_masked_peak_mb": round(peaks["dense_masked"] / 2**20, 3),
                "time_ratio_masked": round(lsh_s / masked_s, 3), "memory_ratio_masked": round(peaks["lsh"] / peaks["dense_masked"], 3),
            })
        rows.append(row)
        print(f"T={T}: lsh {lsh_s:.3f}s {peaks['lsh'] / 2**20:.1f}MB, dense {dense_s:.3f}s {peaks['dense'] / 2**20:.1f}MB", flush=True)
    return rows


def byte_batches(args) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, held-out rows), each [N, seq + 1] of UTF-8 bytes of the WARC pages' text."""
    texts = warc_texts(warc_paths(args.data), limit=args.loss_docs, skip_empty=True)
    data = torch.tensor(list("\n\n".join(texts).encode("utf-8")), dtype=torch.long)
    width = args.loss_bucket * 8 + 1
    rows = data[: len(data) // width * width].view(-1, width)
    need = args.loss_steps * args.loss_batch + args.loss_val_rows
    if len(rows) < need:
        raise SystemExit(f"--data gives {len(rows)} rows of {width} bytes; {need} are needed: lower --loss-steps or raise --loss-docs")
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]
    return rows[: need - args.loss_val_rows], rows[need - args.loss_val_rows : need]


def loss_gap(args) -> dict:
    from lmfoundry.model.losses import lm_loss, split_batch
    from lmfoundry.model.transformer import Transformer

    train, val = byte_batches(args)
    out = {}
    for attention in ("dense", "lsh"):
        torch.manual_seed(0)
        model = Transformer(model_cfg(args, attention, args.hashes, args.loss_bucket, n_layers=args.loss_layers, d_model=args.loss_d_model))
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.loss_lr, weight_decay=0.0)
        first = last = None
        for step in range(args.loss_steps):
            inputs, targets = split_batch(train[step * args.loss_batch : (step + 1) * args.loss_batch])
            loss = lm_loss(model(inputs)[0], targets).total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            first = loss.item() if first is None else first
            last = loss.item()
        model.eval()
        with torch.no_grad():
            inputs, targets = split_batch(val)
            held_out = lm_loss(model(inputs)[0], targets).total.item()
        out[attention] = {"first_train_loss": round(first, 4), "last_train_loss": round(last, 4), "held_out_loss": round(held_out, 4)}
    out["gap_held_out"] = round(out["lsh"]["held_out_loss"] - out["dense"]["held_out_loss"], 4)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmf bench attention", description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=lengths_arg, default=lengths_arg("1024,2048,4096,8192,16384"))
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4, help="query heads (= key/value heads); head_dim = d_model / heads")
    parser.add_argument("--bucket-size", type=int, default=64, help="LSH chunk length")
    parser.add_argument("--hashes", type=int, default=2, help="LSH hashing rounds below --long-from")
    parser.add_argument("--long-hashes", type=int, default=1, help="LSH hashing rounds from --long-from tokens on")
    parser.add_argument("--long-from", type=int, default=8192)
    parser.add_argument("--rounds", type=rounds_arg, default=3, help="alternating timed rounds per length (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: pinned to one core)")
    parser.add_argument("--masked-max", type=int, default=8192, help="also time dense SDPA with an explicit T x T mask (packed rows' path) up to this length")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder of WARC files (or one .warc.gz) for the loss gap")
    parser.add_argument("--loss-steps", type=int, default=150, help="training steps of each loss-gap model (0: skip the loss gap)")
    parser.add_argument("--loss-batch", type=int, default=8)
    parser.add_argument("--loss-bucket", type=int, default=32, help="LSH chunk length of the loss-gap model; rows are 8 chunks long")
    parser.add_argument("--loss-layers", type=int, default=2)
    parser.add_argument("--loss-d-model", type=int, default=128)
    parser.add_argument("--loss-lr", type=float, default=3e-3)
    parser.add_argument("--loss-val-rows", type=int, default=32)
    parser.add_argument("--loss-docs", type=int, default=400, help="WARC pages read for the loss-gap bytes")
    args = parser.parse_args(argv)
    if args.d_model % args.heads or (args.d_model // args.heads) % 2:
        parser.error(f"--d-model {args.d_model} must split into --heads {args.heads} heads of even width")
    core = pin_one_core() if args.threads == 1 else None
    torch.set_num_threads(args.threads)

    rows = speed_and_memory(args)
    loss = loss_gap(args) if args.loss_steps else None
    faster = [r["seq_len"] for r in rows if r["time_ratio"] < 1]
    smaller = [r["seq_len"] for r in rows if r["memory_ratio"] < 1]
    last = rows[-1]
    same = {
        "d_model": args.d_model, "heads": args.heads, "head_dim": args.d_model // args.heads, "batch": 1, "precision": "fp32",
        "work": "one attention layer, forward + backward (projections included)", "rounds": args.rounds, "statistic": "median",
        "clock": "process CPU seconds", "memory": "peak live bytes, torch profiler", "threads": torch.get_num_threads(), "pinned_core": core,
        "cores": allowed_cores(),
    }
    print_result(
        "attention", "fwd_bwd_seconds", last["lsh_s"], "dense-sdpa", last["dense_s"],
        n=[r["seq_len"] for r in rows], digits=6,
        quality={
            "loss": loss,
            "loss_model": {"d_model": args.loss_d_model, "layers": args.loss_layers, "seq_len": args.loss_bucket * 8, "batch": args.loss_batch, "steps": args.loss_steps, "lr": args.loss_lr, "lsh_bucket_size": args.loss_bucket, "lsh_hashes": args.hashes, "data": f"UTF-8 bytes of {args.data}"} if loss else None,
        },
        settings={
            "ours": {"attention": "LSH (shared QK)", "bucket_size": args.bucket_size, "hashes": args.hashes, "long_hashes": args.long_hashes, "long_from": args.long_from, **same},
            "dense-sdpa": {"attention": "F.scaled_dot_product_attention causal (CPU flash kernel)", **same},
            "dense-sdpa-masked": {"attention": "F.scaled_dot_product_attention with a bool [1, 1, T, T] block-causal mask", "up_to": args.masked_max, **same},
        },
        lower_is_better=True,
        per_length=rows,
        crossover={
            "time": faster[0] if faster else None, "memory": smaller[0] if smaller else None,
            "memory_vs_masked": next((r["seq_len"] for r in rows if r.get("memory_ratio_masked", 2) < 1), None),
        },
    )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
