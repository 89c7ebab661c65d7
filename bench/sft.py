"""Benchmark: tokens/s of our SFT training step vs TRL's ``SFTTrainer``, on the same model and rows.

    lmf bench sft [--steps 10] [--warmup 2] [--rounds 3] [--profile auto|always|never] [--batch 8] [--seq-len 256] [--d-model 128] [--layers 2]

The data is the demo corpus (chatterbot-corpus) through the real stages: a train_tokenizer stage
trained on its text and the sft_data stage (conversations rendered by our chat template, loss
mask on assistant content and its <|end|>, packed first-fit into rows of seq_len + 1 tokens
with positions restarting at every conversation). Both sides start from the same randomly
initialised model (the demo shape by default; --init-std 0.3, so that its predictions depend on
the context and a difference in attention masks or positions shows in the first loss) and train
on the same rows, in the same order:

- ours: model/train.py's Trainer for one CPU rank in this process (a DeepSpeed engine, ZeRO-1 by
  default, the sft_data loader and the SFT objective: block-diagonal attention inside each
  packed row, loss = summed cross-entropy of the assistant targets / their count in the batch);
  each step is ``Trainer.train_step``, exactly what the stage's run loop calls.
- trl: ``SFTTrainer`` on the same weights exported as ``LlamaForCausalLM`` (model/export.py),
  given the same packed rows pre-tokenized: input_ids = the row's seq_len + 1 tokens, labels =
  the token where the loss mask is 1 else -100, position_ids = our positions and no attention
  mask, from which transformers builds the same block-diagonal mask (its packed-sequence
  detection). Its loss is the same mean over the batch's assistant targets. The one extra input
  token per row (HF shifts labels inside) is computed and dropped.

Optimizer settings are matched: AdamW with the sft section's betas / eps and clipping, the same
constant learning rate (no warmup, no decay), the same weight decay on matrices and none on norm
gains, fp32, one micro batch per step; TRL gets torch.optim.AdamW like ours (--trl-optim; its
default fused AdamW measured slower on CPU). Packing is the same on both sides (ours, reset
positions). TRL runs in a child process started once (bench/_posttrain.py TrlWorker): in ours,
accelerate would see our gloo world and wrap the model in DistributedDataParallel; the child is
pinned to the same cores with the same thread count.
Each round is a fresh run of --steps steps from the initial weights on each side, alternating;
the steps after --warmup are timed (CPU time with one thread, wall time otherwise) and the
median round counts. quality holds the first-step losses (|diff| < 1e-4 expected), the largest
relative gap of the loss curves (< 2 % expected) and a check that TRL's own tokenization of the
conversations (``assistant_only_loss`` with our template's ``{% generation %}`` markers) gives
exactly the tokens and labels of every conversation in the benchmarked rows.
"""
from __future__ import annotations

import argparse
import gc
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from lmfoundry.bench import _posttrain as pt
from lmfoundry.bench._common import allowed_cores, alternating_rounds, print_result

TRL = "lmfoundry.bench.sft:"  # the functions the TRL worker process runs


def step_rows(data: pt.DemoData, args) -> list[dict[str, torch.Tensor]]:
    """The batches our Trainer's loader yields for --steps steps (same stage, batch, seed, one rank)."""
    from lmfoundry.model.chat_loader import SftLoader

    loader = SftLoader.from_stage(data.store, data.data, "train", batch_size=args.batch, seed=args.seed)
    return [next(loader) for _ in range(args.steps)]


def hf_rows(batches: list[dict[str, torch.Tensor]]) -> dict[str, list[list[int]]]:
    """Packed rows as TRL's pre-tokenized columns, in step order."""
    tokens = torch.cat([b["tokens"] for b in batches])
    labels = torch.where(torch.cat([b["loss_mask"] for b in batches]).bool(), tokens, torch.full_like(tokens, -100))
    return {"input_ids": tokens.tolist(), "labels": labels.tolist(), "position_ids": torch.cat([b["positions"] for b in batches]).tolist()}


def stack_rows(examples: list[dict]) -> dict[str, torch.Tensor]:
    """TRL's data collator here: the rows are already packed to one width, so stacking is all."""
    return {key: torch.tensor([e[key] for e in examples], dtype=torch.long) for key in ("input_ids", "labels", "position_ids")}


def segments(batches: list[dict[str, torch.Tensor]], pad_id: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(tokens, loss mask) of every conversation in the rows (pad tails left out)."""
    out = []
    for batch in batches:
        for tokens, mask, positions in zip(batch["tokens"].tolist(), batch["loss_mask"].tolist(), batch["positions"].tolist()):
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(tokens)]
            out += [(tuple(tokens[a:b]), tuple(mask[a:b])) for a, b in pairwise(starts) if tokens[a] != pad_id]
    return out


# ---------------------------------------------------------------------- TRL's side (run in the worker process)


def trl_trainer(hf_dir: Path, dataset, args, section_cfg, out_dir: Path, callbacks=(), **extra):
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = pt.load_hf(hf_dir)
    config = SFTConfig(**pt.trl_common(args, out_dir, section_cfg), max_length=None, packing=False, **extra)
    collator = stack_rows if config.dataset_kwargs else None
    return SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, data_collator=collator, callbacks=list(callbacks))


def trl_round(hf_dir: Path, rows: dict, args, section_cfg, out_dir: Path, profile_steps: int = 0) -> pt.Round:
    """One TRL round: a fresh SFTTrainer on the exported weights, args.steps steps over the
    pre-tokenized rows. With profile_steps, the steps after the warm-up are also profiled."""
    from datasets import Dataset

    clock = pt.trl_clock()
    profiler = pt.trl_profiler(args.warmup, profile_steps) if profile_steps else None
    trainer = trl_trainer(
        hf_dir, Dataset.from_dict(rows), args, section_cfg, out_dir, [clock, profiler] if profiler else [clock],
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer.train()
    if profiler:
        clock.round.profile = profiler.table
    return clock.round


def trl_tokenize(hf_dir: Path, conversations: list[dict], args, section_cfg, out_dir: Path) -> dict[tuple[int, ...], tuple[int, ...]]:
    """TRL's own preparation of conversations (assistant_only_loss=True, the exported chat
    template with its {% generation %} markers): input_ids -> labels."""
    from datasets import Dataset

    trainer = trl_trainer(hf_dir, Dataset.from_list(conversations), args, section_cfg, out_dir, assistant_only_loss=True)
    return {tuple(ids): tuple(labels) for ids, labels in zip(trainer.train_dataset["input_ids"], trainer.train_dataset["labels"])}


# ---------------------------------------------------------------------- the benchmark


def demo_conversations() -> list[dict]:
    """The demo conversations as the sft_data stage may take them: cut after any assistant turn
    (a conversation too long for a row keeps its first whole turns; trailing user turns go)."""
    from lmfoundry.tasks.chat import demo

    out = []
    for conv in demo.conversations():
        messages = demo.as_messages(conv.turns)
        out += [{"messages": messages[: i + 1]} for i, m in enumerate(messages) if m["role"] == "assistant"]
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lmf bench sft", description=__doc__.splitlines()[0])
    pt.add_common_args(parser, batch=8, lr=2e-3)
    args = parser.parse_args(argv)
    pt.check_args(parser, args)
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    return pt.run_benchmark(args, "sft", lambda root, worker: run(args, root, worker))


@dataclass
class Setup:
    """What both sides train from: the data stage, the starting model (ours and exported), the
    recipe, and the step batches (ours) with the same rows as TRL's columns."""

    data: pt.DemoData
    init: Path
    hf_dir: Path
    section_cfg: Any
    train_recipe: Any
    batches: list[dict[str, torch.Tensor]]
    rows: dict[str, list[list[int]]]


def prepare(args: argparse.Namespace, root: Path) -> Setup:
    data = pt.demo_data(root, "sft_data", args.seq_len, args.vocab)
    init = pt.init_model(root / "init", data.vocab_size, args.d_model, args.layers, args.heads, args.kv_heads, args.seed, args.init_std)
    section_cfg, train_recipe = pt.recipe("sft", args)
    batches = step_rows(data, args)
    return Setup(data, init, pt.export_hf(init, root / "hf", data), section_cfg, train_recipe, batches, hf_rows(batches))


def run(args: argparse.Namespace, root: Path, worker: pt.TrlWorker, setup: Setup | None = None) -> int:
    """The benchmark with scratch files under `root` and TRL's side in `worker`; prints the
    result line. main() pins the cores and sets the thread count first."""
    cores = allowed_cores()
    setup = setup or prepare(args, root)
    data, init, hf_dir, section_cfg, train_recipe, batches, rows = (
        setup.data, setup.init, setup.hf_dir, setup.section_cfg, setup.train_recipe, setup.batches, setup.rows,
    )

    def ours(r: int) -> pt.Round:
        trainer = pt.our_trainer("sft", data, init, root / f"ours-{r}", train_recipe)
        result = pt.run_ours(trainer, args.steps)
        del trainer
        gc.collect()
        return result

    def trl(r: int) -> pt.Round:
        return worker.call(TRL + "trl_round", hf_dir, rows, args, section_cfg, root / f"trl-{r}")

    rounds = alternating_rounds({"ours": ours, "trl": trl}, args.rounds)
    clock = pt.clock_index(args.threads)
    per_step = args.batch * args.seq_len
    ours_tps, trl_tps = (pt.median_rate(rounds[side], args.warmup, per_step, clock) for side in ("ours", "trl"))
    first_diff, curve_gap = pt.curve_gap(rounds["ours"][0].losses, rounds["trl"][0].losses)

    theirs = worker.call(TRL + "trl_tokenize", hf_dir, demo_conversations(), args, section_cfg, root / "trl-tokenize")
    ours_segments = segments(batches, data.index["pad_id"])
    same_tokens = sum(1 for ids, mask in ours_segments if theirs.get(ids) == tuple(t if m else -100 for t, m in zip(ids, mask)))

    profile = pt.profile_sides(
        args, ours_tps < trl_tps, lambda: pt.our_trainer("sft", data, init, root / "ours-profile", train_recipe),
        lambda short: worker.call(TRL + "trl_round", hf_dir, rows, short, section_cfg, root / "trl-profile", short.steps - short.warmup),
    )

    same = {
        "model": {"d_model": args.d_model, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads, "vocab": data.vocab_size, "init": f"random, seed {args.seed}, std {args.init_std}"},
        "data": "demo corpus (chatterbot-corpus) through the train_tokenizer and sft_data stages; the same rows in the same order",
        "seq_len": args.seq_len, "batch": args.batch, "micro_batches": 1,
        "packing": "the same packed rows: whole conversations first-fit, positions reset per conversation, block-diagonal causal attention",
        "loss": "summed CE over assistant targets (content + <|end|>) / their count in the batch",
        "precision": "fp32", "optimizer": "AdamW", "lr": args.lr, "schedule": "constant (no warmup, no decay)", "betas": list(section_cfg.betas),
        "eps": section_cfg.adam_eps, "weight_decay": args.weight_decay, "weight_decay_on": "matrices, not norm gains", "grad_clip": section_cfg.grad_clip,
        "steps": args.steps, "warmup_untimed": args.warmup, "rounds": args.rounds, "statistic": "median round, each a fresh run from the same weights",
        "clock": "process CPU time" if clock else "wall (perf_counter)", "cores": cores, "threads": args.threads,
        "tokens": "input positions of the packed rows (padding included): batch x seq_len per step",
    }
    print_result(
        "sft", "tokens_per_s", ours_tps, "trl-sfttrainer", trl_tps,
        n=per_step * (args.steps - args.warmup),
        settings={
            "ours": {**same, "engine": f"model/train.py Trainer.train_step: DeepSpeed ZeRO-{args.zero}, gloo world of 1 rank, this process",
                     "optimizer_impl": "torch.optim.AdamW inside DeepSpeed (torch_adam)"},
            "trl-sfttrainer": {**same, "engine": "trl.SFTTrainer.train (transformers Trainer + accelerate) in a plain single child process, same cores",
                               "optimizer_impl": args.trl_optim, "model": "LlamaForCausalLM exported by model/export.py, SDPA attention, gradient checkpointing off",
                               "input": "pre-tokenized packed rows: input_ids (seq_len + 1 tokens), labels (-100 off the loss mask), position_ids, no attention mask"},
        },
        quality={
            "first_loss_ours": rounds["ours"][0].losses[0], "first_loss_trl": rounds["trl"][0].losses[0],
            "first_loss_abs_diff": first_diff, "first_loss_ok": first_diff < 1e-4, "max_rel_curve_gap": curve_gap, "curve_ok": curve_gap < 0.02,
            "loss_ours": [round(x, 6) for x in rounds["ours"][0].losses], "loss_trl": [round(x, 6) for x in rounds["trl"][0].losses],
            "rounds_reproduce_losses": {side: all(r.losses == rounds[side][0].losses for r in rounds[side]) for side in rounds},
            "trl_tokenization": {"conversations_in_rows": len(ours_segments), "same_tokens_and_labels": same_tokens},
            "data": {k: data.stats.get(k) for k in ("conversations", "samples", "fill", "too_long_truncated", "too_long_dropped")},
            "seconds_ours": pt.round_seconds(rounds["ours"], args.warmup), "seconds_trl": pt.round_seconds(rounds["trl"], args.warmup),
            **({"profile": profile} if profile else {}),
        },
    )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
