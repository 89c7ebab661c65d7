"""Benchmark: tokens/s of our DeepSpeed training step vs a plain PyTorch training loop.

    lmf bench train [--steps 20] [--zero 1] [--d-model 256] [--layers 4] [--seq-len 256] [--batch 8]

Both sides train the same model (same initial weights), on the same batches, with the same
optimizer (AdamW, matrices decayed), schedule (warmup + cosine), clipping (1.0) and fp32, in
this one process on CPU. Ours is ``lmfoundry.model.engine.engine_step`` on a DeepSpeed engine (ZeRO
stage as given, gloo world of one rank) plus the per-step loss all-reduce the trainer does;
the baseline is the textbook loop. Steps alternate in chunks of --chunk steps so machine noise
hits both alike; each chunk is a round, and the median round's tokens/s counts (at least 3
rounds with timed steps). Both sides run in this process on the same cores and torch threads.
quality.loss_abs_diff shows they did the same work.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from lmfoundry.bench._common import MIN_ROUNDS, allowed_cores, median_chunk_rate, print_result


def plain_step(model, optimizer, scheduler, batch: torch.Tensor, clip: float) -> float:
    from lmfoundry.model.losses import lm_loss, split_batch

    inputs, targets = split_batch(batch)
    logits, aux = model(inputs)
    loss = lm_loss(logits, targets).total
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    scheduler.step()
    return loss.item()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmf bench train", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    parser.add_argument("--chunk", type=int, default=5, help="steps per side before switching")
    parser.add_argument("--zero", type=int, default=1, choices=[0, 1, 2, 3])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = parser.parse_args(argv)
    if -(-args.steps // args.chunk) < MIN_ROUNDS:
        parser.error(f"--steps {args.steps} in chunks of {args.chunk} give fewer than {MIN_ROUNDS} rounds; raise --steps or lower --chunk")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)

    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    import torch.distributed as dist

    from lmfoundry.infra.config import ModelConfig, PretrainConfig
    from lmfoundry.model.engine import build_engine, engine_step, init_single_process, make_scheduler, param_groups
    from lmfoundry.model.transformer import Transformer, resolve

    init_single_process("gloo")
    model_cfg = resolve(ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=max(1, args.d_model // 64), n_kv_heads=max(1, args.d_model // 128)), args.vocab)
    total_steps = args.warmup + args.steps
    cfg = PretrainConfig(
        steps=total_steps, global_batch_size=args.batch, lr=1e-3, min_lr=1e-5, warmup_steps=2,
        distributed=PretrainConfig.Distributed(zero_stage=args.zero),
    )
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=generator) for _ in range(total_steps)]

    torch.manual_seed(0)
    baseline_model = Transformer(model_cfg)
    torch.manual_seed(0)
    engine = build_engine(Transformer(model_cfg), cfg, world_size=1)
    optimizer = torch.optim.AdamW(param_groups(baseline_model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps)
    scheduler = make_scheduler(optimizer, cfg)

    def ours(batch: torch.Tensor) -> float:
        local = engine_step(engine, [batch], None, cfg, 0.0)
        loss = torch.tensor([local["loss"]], dtype=torch.float64)
        dist.all_reduce(loss)  # the trainer's per-step agreement on the loss
        return loss.item()

    chunks: dict[str, list[tuple[int, float]]] = {"ours": [], "baseline": []}  # (timed steps, seconds) per round
    losses = {"ours": [], "baseline": []}
    sides = {"ours": ours, "baseline": lambda b: plain_step(baseline_model, optimizer, scheduler, b, cfg.grad_clip)}
    for start in range(0, total_steps, args.chunk):
        for name, step in sides.items():
            timed_steps, seconds = 0, 0.0
            for i in range(start, min(start + args.chunk, total_steps)):
                began = time.perf_counter()
                losses[name].append(step(batches[i]))
                if i >= args.warmup:
                    timed_steps, seconds = timed_steps + 1, seconds + time.perf_counter() - began
            chunks[name].append((timed_steps, seconds))
    tokens = args.steps * args.batch * args.seq_len
    ours_tps, base_tps = (median_chunk_rate(chunks[name], args.batch * args.seq_len) for name in ("ours", "baseline"))
    flops = Transformer(model_cfg).flops_per_token(args.seq_len)
    same = {
        "d_model": args.d_model, "layers": args.layers, "vocab": args.vocab, "seq_len": args.seq_len, "batch": args.batch,
        "steps": args.steps, "warmup": args.warmup, "chunk": args.chunk, "precision": "fp32", "optimizer": "AdamW", "grad_clip": cfg.grad_clip,
        "rounds": "chunks", "statistic": "median", "clock": "perf_counter", "cores": allowed_cores(), "threads": torch.get_num_threads(),
    }
    print_result(
        "train", "tokens_per_s", ours_tps, "pytorch-loop", base_tps,
        n=tokens,
        settings={"ours": {"engine": f"DeepSpeed ZeRO-{args.zero}, gloo, 1 rank", **same}, "pytorch-loop": same},
        quality={
            "zero_stage": args.zero,
            "parameters": engine.module.num_parameters(),
            "flops_per_token": flops,
            "gflops_ours": round(flops * ours_tps / 1e9, 2),
            "final_loss_ours": round(losses["ours"][-1], 5),
            "final_loss_baseline": round(losses["baseline"][-1], 5),
            "loss_abs_diff": abs(losses["ours"][-1] - losses["baseline"][-1]),
            "threads": torch.get_num_threads(),
        },
    )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
