"""Benchmark: tokens/s of our DPO training step vs TRL's ``DPOTrainer``, on the same model and pairs.

    lmf bench dpo [--steps 10] [--warmup 2] [--rounds 3] [--profile auto|always|never] [--batch 16] [--beta 0.1] [--d-model 128] [--layers 2]

The pairs are the first --pairs of the demo construction (chatterbot-corpus: chosen = the real
answer, rejected = an answer from another topic), written as a JSONL file and read by the real
preference_data stage (after a train_tokenizer stage on the demo text), as user data is. Both
sides start from the same randomly initialised model (--init-std as in ``lmf bench sft``), which is
also the frozen reference, and
train on the same pairs in the same order, with the sigmoid DPO loss
-log sigmoid(beta * ((log pi_c - log ref_c) - (log pi_r - log ref_r))), log-probs summed over the
reply's tokens (assistant content and its <|end|>):

- ours: model/train.py's Trainer for one CPU rank in this process (a DeepSpeed engine, ZeRO-1 by
  default, the preference loader and the DPO objective); each step is ``Trainer.train_step``.
- trl: ``DPOTrainer`` on the same weights exported as ``LlamaForCausalLM`` (model/export.py),
  given the pairs as conversations (prompt messages, chosen / rejected assistant message) and
  tokenizing them itself with the exported chat template; quality counts the pairs whose
  tokens and scored positions equal ours.

The reference is handled alike: both sides compute the reference log-probs once, with the
starting weights, before the first step (ours: the stage's own pass over the pairs, stored with
the run; TRL: ``precompute_ref_log_probs=True``), so no step runs a reference model and neither
pass is timed. Optimizer settings are matched as in ``lmf bench sft``: AdamW with the dpo
section's betas / eps / clipping, the same constant learning rate, weight decay on matrices only,
fp32, one micro batch per step, TRL in its own child process on the same cores. Rounds
alternate, each a fresh run from the starting weights; the steps after --warmup are timed and
the median round counts. tokens = the real (unpadded)
tokens of both replies of every pair in a step. With policy == reference the first-step loss is
log 2 on both sides.

quality.reward_model: the reward model's held-out accuracy next to the length-only baseline's,
read from a demo store's committed reward_model stage (--store, `make demo` writes one), or why
it is missing; the length-only baseline on the benchmark's own val pairs is always there.
"""
from __future__ import annotations

import argparse
import gc
import math
from pathlib import Path


from lmfoundry.bench import _posttrain as pt
from lmfoundry.bench._common import allowed_cores, alternating_rounds, print_result

TRL = "lmfoundry.bench.dpo:"  # the functions the TRL worker process runs


def step_pairs(data: pt.DemoData, args) -> tuple[list[str], list[dict], list[int]]:
    """The pairs our Trainer's loader yields for --steps steps (same stage, batch, seed, one rank),
    in order: (pair ids, their (tokens, masks) per side, real tokens of each step)."""
    from lmfoundry.model.chat_loader import PreferenceLoader

    loader = PreferenceLoader.from_stage(data.store, data.data, "train", batch_size=args.batch, seed=args.seed)
    ids, sides, tokens = [], [], []
    for _ in range(args.steps):
        batch = next(loader)
        tokens.append(int(batch["lengths"].sum()))
        for sample in batch["index"].tolist():
            ids.append(loader.pair_id(sample))
            sides.append({name: loader.side(sample, name).tolist() for name in ("chosen", "chosen_mask", "rejected", "rejected_mask")})
    return ids, sides, tokens


def write_pairs(path: Path, count: int, seed: int) -> dict[str, dict]:
    """The first `count` demo preference pairs as a JSONL file (what a user points
    preference_data.sources at), and each as a conversational TRL row by the stage's pair id."""
    import json
    from itertools import islice

    from lmfoundry.tasks.chat import demo
    from lmfoundry.tasks.chat.preference_data import pair_id
    from lmfoundry.tasks.chat.shapes import parse_pair

    by_id = {}
    with open(path, "w", encoding="utf-8") as f:
        for _, row in islice(demo.preference_rows(seed), count):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            pair = parse_pair(row)
            by_id[pair_id(pair)] = {
                "prompt": [dict(m) for m in pair.prompt],
                "chosen": [{"role": "assistant", "content": pair.chosen}],
                "rejected": [{"role": "assistant", "content": pair.rejected}],
            }
    return by_id


def same_tokens(ours: list[dict], theirs: dict[str, list]) -> int:
    """Pairs whose TRL tokenization (prompt_ids + chosen_ids / rejected_ids, completion scored)
    equals ours (tokens, and the mask 1 exactly on the reply)."""
    same = 0
    for i, pair in enumerate(ours):
        prompt = theirs["prompt_ids"][i]
        ok = True
        for side in ("chosen", "rejected"):
            reply = theirs[f"{side}_ids"][i]
            ok &= pair[side] == prompt + reply and pair[f"{side}_mask"] == [0] * len(prompt) + [1] * len(reply)
        same += ok
    return same


# ---------------------------------------------------------------------- TRL's side (run in the worker process)


def trl_trainer(hf_dir: Path, rows: list[dict], args, section_cfg, out_dir: Path, callbacks=(), precompute: bool = True):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = pt.load_hf(hf_dir)
    config = DPOConfig(**pt.trl_common(args, out_dir, section_cfg), beta=args.beta, loss_type=["sigmoid"], precompute_ref_log_probs=precompute, max_length=None)
    return DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=list(callbacks))


def trl_round(hf_dir: Path, rows: list[dict], args, section_cfg, out_dir: Path, profile_steps: int = 0) -> pt.Round:
    """One TRL round: a fresh DPOTrainer (reference log-probs precomputed in its constructor,
    before the clock starts), args.steps steps. With profile_steps, steps after the warm-up are profiled."""
    clock = pt.trl_clock()
    profiler = pt.trl_profiler(args.warmup, profile_steps) if profile_steps else None
    trainer = trl_trainer(hf_dir, rows, args, section_cfg, out_dir, [clock, profiler] if profiler else [clock])
    trainer.train()
    if profiler:
        clock.round.profile = profiler.table
    return clock.round


def trl_tokenize(hf_dir: Path, rows: list[dict], args, section_cfg, out_dir: Path) -> dict[str, list]:
    """TRL's own tokenization of the conversational pairs: prompt_ids, chosen_ids, rejected_ids."""
    dataset = trl_trainer(hf_dir, rows, args, section_cfg, out_dir, precompute=False).train_dataset
    return {name: dataset[name] for name in ("prompt_ids", "chosen_ids", "rejected_ids")}


# ---------------------------------------------------------------------- the benchmark


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lmf bench dpo", description=__doc__.splitlines()[0])
    pt.add_common_args(parser, batch=16, lr=1e-3)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta on both sides (the dpo section's default)")
    parser.add_argument("--pairs", type=int, default=256, help="demo pairs given to the preference_data stage (both sides precompute reference log-probs of theirs)")
    parser.add_argument("--store", default=".lmf/store", help="a demo store to read the reward_model stage's accuracy from")
    parser.add_argument("--pipeline", default="demo", help="the pipeline name whose reward_model ref to read in --store")
    args = parser.parse_args(argv)
    pt.check_args(parser, args)
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    return pt.run_benchmark(args, "dpo", lambda root, worker: run(args, root, worker))


def run(args: argparse.Namespace, root: Path, worker: pt.TrlWorker) -> int:
    """The benchmark with scratch files under `root` and TRL's side in `worker`; prints the
    result line. main() pins the cores and sets the thread count first."""
    cores = allowed_cores()
    root.mkdir(parents=True, exist_ok=True)
    by_id = write_pairs(root / "pairs.jsonl", args.pairs, args.seed)
    data = pt.demo_data(root, "preference_data", args.seq_len, args.vocab, {"builtin": None, "sources": [{"paths": [str(root / "pairs.jsonl")]}]})
    init = pt.init_model(root / "init", data.vocab_size, args.d_model, args.layers, args.heads, args.kv_heads, args.seed, args.init_std)
    hf_dir = pt.export_hf(init, root / "hf", data)
    section_cfg, train_recipe = pt.recipe("dpo", args)
    ids, our_sides, tokens = step_pairs(data, args)
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise SystemExit(f"{len(missing)} pair ids of the preference_data stage are not among the demo pairs (e.g. {missing[0]}): tasks/chat/preference_data.pair_id no longer hashes what it did")
    rows = [by_id[i] for i in ids]

    def ours(r: int) -> pt.Round:
        # one work dir for every round: the reference log-probs are computed once and read back
        trainer = pt.our_trainer("dpo", data, init, root / "ours", train_recipe, {"beta": args.beta})
        result = pt.run_ours(trainer, args.steps)
        del trainer
        gc.collect()
        return result

    def trl(r: int) -> pt.Round:
        return worker.call(TRL + "trl_round", hf_dir, rows, args, section_cfg, root / f"trl-{r}")

    rounds = alternating_rounds({"ours": ours, "trl": trl}, args.rounds)
    clock = pt.clock_index(args.threads)
    timed_tokens = sum(tokens[args.warmup :])
    per_step = timed_tokens / (args.steps - args.warmup)  # every round times the same steps
    ours_tps, trl_tps = (pt.median_rate(rounds[side], args.warmup, per_step, clock) for side in ("ours", "trl"))
    first_diff, curve_gap = pt.curve_gap(rounds["ours"][0].losses, rounds["trl"][0].losses)
    theirs = worker.call(TRL + "trl_tokenize", hf_dir, rows, args, section_cfg, root / "trl-tokenize")

    profile = pt.profile_sides(
        args, ours_tps < trl_tps, lambda: pt.our_trainer("dpo", data, init, root / "ours", train_recipe, {"beta": args.beta}),
        lambda short: worker.call(TRL + "trl_round", hf_dir, rows, short, section_cfg, root / "trl-profile", short.steps - short.warmup),
    )

    same = {
        "model": {"d_model": args.d_model, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads, "vocab": data.vocab_size, "init": f"random, seed {args.seed}, std {args.init_std}"},
        "data": f"the first {args.pairs} demo preference pairs (chatterbot-corpus construction) as a JSONL source of the preference_data stage (after train_tokenizer); the same pairs in the same order",
        "seq_len": args.seq_len, "batch_pairs": args.batch, "micro_batches": 1, "beta": args.beta, "loss": "sigmoid DPO, log-probs summed over the reply (content + <|end|>)",
        "reference": "the starting weights; log-probs precomputed once before training, not timed, no reference forward in a step",
        "padding": "right-padded to the longest side of the batch (chosen and rejected in one forward)",
        "precision": "fp32", "optimizer": "AdamW", "lr": args.lr, "schedule": "constant (no warmup, no decay)", "betas": list(section_cfg.betas),
        "eps": section_cfg.adam_eps, "weight_decay": args.weight_decay, "weight_decay_on": "matrices, not norm gains", "grad_clip": section_cfg.grad_clip,
        "steps": args.steps, "warmup_untimed": args.warmup, "rounds": args.rounds, "statistic": "median round, each a fresh run from the same weights",
        "clock": "process CPU time" if clock else "wall (perf_counter)", "cores": cores, "threads": args.threads,
        "tokens": "real (unpadded) tokens of both replies of every pair",
    }
    log2 = math.log(2)
    print_result(
        "dpo", "tokens_per_s", ours_tps, "trl-dpotrainer", trl_tps,
        n=timed_tokens,
        settings={
            "ours": {**same, "engine": f"model/train.py Trainer.train_step: DeepSpeed ZeRO-{args.zero}, gloo world of 1 rank, this process",
                     "optimizer_impl": "torch.optim.AdamW inside DeepSpeed (torch_adam)",
                     "reference_impl": "Dpo.prepare: the engine in eval mode over the stage's train + val pairs, stored in the work dir (reference/)",
                     "attention": "causal, no padding mask (right padding never reaches a real token)"},
            "trl-dpotrainer": {**same, "engine": "trl.DPOTrainer.train (transformers Trainer + accelerate) in a plain single child process, same cores",
                               "optimizer_impl": args.trl_optim, "model": "LlamaForCausalLM exported by model/export.py, SDPA attention, gradient checkpointing off",
                               "reference_impl": "precompute_ref_log_probs=True (ref_model=None: the starting weights)",
                               "input": "conversational pairs tokenized by TRL with the exported chat template; attention_mask for the padding"},
        },
        quality={
            "first_loss_ours": rounds["ours"][0].losses[0], "first_loss_trl": rounds["trl"][0].losses[0], "log2": log2,
            "first_loss_abs_diff": first_diff, "first_loss_ok": first_diff < 1e-4,
            "first_loss_minus_log2": {"ours": rounds["ours"][0].losses[0] - log2, "trl": rounds["trl"][0].losses[0] - log2},
            "max_rel_curve_gap": curve_gap, "curve_ok": curve_gap < 0.02,
            "loss_ours": [round(x, 6) for x in rounds["ours"][0].losses], "loss_trl": [round(x, 6) for x in rounds["trl"][0].losses],
            "rounds_reproduce_losses": {side: all(r.losses == rounds[side][0].losses for r in rounds[side]) for side in rounds},
            "trl_tokenization": {"pairs": len(our_sides), "same_tokens_and_scored_positions": same_tokens(our_sides, theirs)},
            "reward_model": {
                "demo_store": pt.reward_model_stats(args.store, args.pipeline),
                "length_baseline_accuracy_bench_pairs": data.stats.get("length_baseline_accuracy"),
                "pairs": data.stats.get("pairs"),
            },
            "seconds_ours": pt.round_seconds(rounds["ours"], args.warmup), "seconds_trl": pt.round_seconds(rounds["trl"], args.warmup),
            **({"profile": profile} if profile else {}),
        },
    )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
