"""Benchmark: one GRPO step (generation + scoring + update) of ours vs TRL's ``GRPOTrainer``.

    lmf bench grpo [--steps 6] [--warmup 1] [--rounds 3] [--prompts 4] [--group 4] [--max-new-tokens 32] [--threads 1]

Both sides start from the same randomly initialised model (ours in our format, TRL's as the
``LlamaForCausalLM`` model/export.py writes), get the same prompts in the same order (the first
user turns of the demo conversations, chat-templated with the exported template, ending with
<|assistant|>), sample --group responses per prompt at temperature 1.0 without top-k / top-p,
at most --max-new-tokens each, stopping at <|end|> or <|eos|>, and score them with the same rule
reward: how many times the target token (--target, default "the") occurs in the response.
Then one update: group-normalised advantages ((r - mean) / (std + eps)), the clipped surrogate
(epsilon 0.2) averaged over all response tokens of the batch (TRL: loss_type "dapo"), plus
--beta times the k3 KL to the frozen reference in the loss; AdamW with the ppo section's betas,
eps and clipping, a constant --lr, fp32, one optimizer step per generation batch (ours:
ppo_epochs 1, global_batch_size = rollout_batch_size; TRL: num_iterations 1,
steps_per_generation 1).

- ours: model/ppo_train.py's PpoTrainer.step (what the ppo stage runs with advantage: grpo) for
  one CPU rank in this process: KV-cache sampling (model/generate.py), the old-policy and
  reference forwards (model/ppo.py score_rollout), GRPO advantages, the actor loss and the
  DeepSpeed engine's step (ZeRO-0; --zero).
- trl: GRPOTrainer.train (HF generate, the reference model, accelerate) in a plain child process
  on the same cores.

Each round is a fresh run of --steps steps from the starting weights; the steps after --warmup
are timed and the median round counts. Metric: rollout tokens (response tokens actually sampled,
stop token included) per second; steps per second are reported beside. With a random model
almost no response stops early, so both sides sample nearly the same number of tokens.
quality: per-step rewards, response lengths and the first step's KL (0: policy == reference) of
both sides, and, for ours, where a step's time goes (generation / scoring / update).
"""
from __future__ import annotations

import argparse
import gc
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lmfoundry.bench import _posttrain as pt
from lmfoundry.bench._common import (
    allowed_cores,
    alternating_rounds,
    print_result,
    rounds_arg,
)

TRL = "lmfoundry.bench.grpo:"  # the functions the TRL worker process runs


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lmf bench grpo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="GRPO steps per round and side")
    parser.add_argument("--warmup", type=int, default=1, help="first steps of every round left out of the timing")
    parser.add_argument("--rounds", type=rounds_arg, default=3, help="alternating rounds per side (at least 3; the median counts)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=4, help="responses per prompt (GRPO group size, at least 2)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--target", default="the", help="the rule reward counts this token (its first token id) in each response")
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient (k3, in the loss) on both sides; > 0 so both run the reference")
    parser.add_argument("--lr", type=float, default=1e-4, help="constant learning rate on both sides")
    parser.add_argument("--seq-len", type=int, default=256, help="the sft_data stage's seq_len (the bench only needs its tokenizer stage)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--init-std", type=float, default=0.02)
    parser.add_argument("--zero", type=int, default=0, choices=[0, 1, 2], help="our DeepSpeed ZeRO stage")
    parser.add_argument("--trl-optim", default="adamw_torch", help="TRL's optimizer implementation (adamw_torch = torch.optim.AdamW, as ours)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both sides; the process is pinned to this many cores")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup or args.warmup < 1:
        parser.error(f"--warmup must be at least 1 and below --steps (got --warmup {args.warmup}, --steps {args.steps})")
    if args.group < 2 or min(args.prompts, args.max_new_tokens, args.threads) < 1:
        parser.error("--group must be at least 2; --prompts, --max-new-tokens and --threads at least 1")
    return args


def ppo_config(args: argparse.Namespace):
    """Our ppo section for the bench: GRPO, one update per rollout batch, no reward shaping."""
    from lmfoundry.infra.config_posttrain import PpoConfig

    batch = args.prompts * args.group
    return PpoConfig(
        enabled=True, advantage="grpo", steps=args.steps, rollout_batch_size=batch, global_batch_size=batch, group_size=args.group,
        ppo_epochs=1, max_new_tokens=args.max_new_tokens, temperature=1.0, lr=args.lr, min_lr=args.lr, warmup_steps=0, weight_decay=0.0,
        clip_ratio=0.2, kl_coef=args.beta, kl_estimator="k3", kl_in="loss", entropy_coef=0.0, reward_normalize=False, reward_clip=0.0,
        missing_eos_penalty=0.0, precision="fp32", seed=args.seed, log_every=1000, checkpoint_every=1000, eval_every=1000, samples_logged=0,
        distributed=PpoConfig.Distributed(zero_stage=args.zero, cpu_threads=args.threads),
    )


# ---------------------------------------------------------------------- the shared input


@dataclass
class Setup:
    init: Path  # our format
    rm: Path  # a reward model directory the job names (the rule scorer replaces its score)
    hf_dir: Path
    prompts: list[list[int]]  # every prompt, templated token ids
    texts: list[str]  # the same prompts as user messages
    order: list[int]  # the prompt indices ours takes, step by step (each repeated --group times)
    target: int
    pad: int
    stops: list[int]


def prepare(args: argparse.Namespace, root: Path) -> Setup:
    """The tokenizer (real train_tokenizer stage on the demo text), the random model and its
    export, and the prompts: the first user turn of each demo conversation, templated by the
    exported tokenizer (what TRL does to a conversational prompt)."""
    from lmfoundry.model.heads import RewardModel, save_reward_model
    from lmfoundry.model.ppo_train import prompt_order
    from lmfoundry.model.transformer import load_model
    from lmfoundry.tasks.chat import demo
    from transformers import AutoTokenizer

    data = pt.demo_data(root, "sft_data", args.seq_len, args.vocab)
    init = pt.init_model(root / "init", data.vocab_size, args.d_model, args.layers, args.heads, args.kv_heads, args.seed, args.init_std)
    rm = root / "rm"
    policy = load_model(init)
    reward_model = RewardModel.from_policy(policy)
    save_reward_model(reward_model.state_dict(), reward_model.cfg, rm, {"mean": 0.0, "std": 1.0})
    hf_dir = pt.export_hf(init, root / "hf", data)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    texts = [c.turns[0] for c in demo.conversations()]
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True, return_dict=False)) for t in texts]
    target_ids = tokenizer.encode(args.target, add_special_tokens=False)
    if not target_ids:
        raise SystemExit(f"--target {args.target!r} encodes to no token; pass a word the demo tokenizer knows")
    order = prompt_order(len(prompts), args.seed, 0, args.steps * args.prompts)
    special = data.special
    return Setup(init, rm, hf_dir, prompts, texts, order, target_ids[0], special["pad"], [special["end"], special["eos"]])


# ---------------------------------------------------------------------- our side


def our_round(args: argparse.Namespace, setup: Setup, work: Path) -> dict[str, Any]:
    """A fresh PpoTrainer (one rank, this process) and --steps of its step(): a pt.Round with a
    clock mark before and after each step, plus per-step tokens, rewards, KL and time split."""
    from lmfoundry.model.ppo_train import PpoJob, PpoTrainer
    from lmfoundry.model.engine import init_single_process

    init_single_process("gloo")
    target = setup.target

    def count_target(gen) -> torch.Tensor:
        return ((gen.response == target) & gen.response_mask.bool()).sum(dim=1).float()

    job = PpoJob(recipe=ppo_config(args), init_from=str(setup.init), reward_from=str(setup.rm), prompts=setup.prompts,
                 pad_id=setup.pad, stop_ids=setup.stops, work_dir=str(work))
    trainer = PpoTrainer(job, scorer=count_target)
    out, info = pt.Round(marks=[pt.now()]), {"tokens": [], "reward": [], "kl": [], "split": []}
    for _ in range(args.steps):
        metrics, rollout = trainer.step()
        trainer.iteration += 1
        out.marks.append(pt.now())
        out.losses.append(metrics["loss"])
        info["tokens"].append(int(rollout.response_mask.sum().item()))
        info["reward"].append(metrics["reward"])
        info["kl"].append(metrics["kl"])
        info["split"].append({k: metrics[f"time_{k}"] for k in ("generate", "score", "train")})
    del trainer
    gc.collect()
    return {"round": out, **info}


# ---------------------------------------------------------------------- TRL's side (run in the worker process)


def trl_round(args: argparse.Namespace, setup: Setup, out_dir: Path) -> dict[str, Any]:
    """A fresh GRPOTrainer on the exported model and --steps steps of its train(): the same
    prompts in our order, the same rule reward, sampling and optimizer settings."""
    from datasets import Dataset
    from lmfoundry.infra.config_posttrain import PpoConfig
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = pt.load_hf(setup.hf_dir)
    cfg = PpoConfig()
    common = pt.trl_common(argparse.Namespace(**{**vars(args), "batch": args.prompts * args.group, "weight_decay": 0.0}), out_dir, cfg)
    config = GRPOConfig(
        **common, num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
        steps_per_generation=1, num_iterations=1, beta=args.beta, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        shuffle_dataset=False, log_completions=False,
    )
    # TRL stops at, and masks after, the model's generation-config EOS ids (plus the tokenizer's): ours are <|end|> and <|eos|>
    model.generation_config.eos_token_id = list(setup.stops)
    rows = [{"prompt": [{"role": "user", "content": setup.texts[i]}]} for i in setup.order]
    seen: dict[str, list] = {"tokens": [], "reward": [], "kl": [], "prompt_ids_match": []}
    target, ours = setup.target, [setup.prompts[i] for i in setup.order]

    def count_target(prompts, completions, completion_ids, **kwargs) -> list[float]:
        seen["tokens"].append(sum(len(ids) for ids in completion_ids))
        return [float(sum(1 for t in ids if t == target)) for ids in completion_ids]

    clock = pt.trl_clock()
    trainer = GRPOTrainer(model=model, reward_funcs=[count_target], args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[clock])
    # TRL's own tokenization of the prompts, next to ours (same template, same ids expected)
    theirs = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False) for r in rows]
    seen["prompt_ids_match"] = [list(a) == list(b) for a, b in zip(theirs, ours)]
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    seen["reward"] = [float(entry["reward"]) for entry in logs]
    seen["kl"] = [float(entry.get("kl", float("nan"))) for entry in logs]  # TRL: mean per token
    return {"round": clock.round, **seen}


# ---------------------------------------------------------------------- the benchmark


def main(argv: list[str]) -> int:
    args = parse(argv)
    return pt.run_benchmark(args, "grpo", lambda root, worker: run(args, root, worker, prepare(args, root)))


def rate(result: dict[str, Any], warmup: int, clock: int, per: str) -> float:
    """tokens (or steps) per second of one round's timed steps."""
    seconds = result["round"].seconds(warmup, clock)
    work = sum(result["tokens"][warmup:]) if per == "tokens" else len(result["tokens"]) - warmup
    return work / seconds


def run(args: argparse.Namespace, root: Path, worker: pt.TrlWorker, setup: Setup) -> int:
    """The rounds and the result line; main() pins the cores and sets the thread count first."""
    cores = allowed_cores()
    rounds = alternating_rounds({
        "ours": lambda r: our_round(args, setup, root / f"ours-{r}"),
        "trl": lambda r: worker.call(TRL + "trl_round", args, setup, root / f"trl-{r}"),
    }, args.rounds)
    clock = pt.clock_index(args.threads)
    med = {side: {per: statistics.median(rate(x, args.warmup, clock, per) for x in rounds[side]) for per in ("tokens", "steps")} for side in rounds}
    split = {k: statistics.median(s[k] for x in rounds["ours"] for s in x["split"][args.warmup :]) for k in ("generate", "score", "train")}
    total = sum(split.values()) or 1.0
    same = {
        "model": {"d_model": args.d_model, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads, "vocab": args.vocab, "init": f"random, seed {args.seed}, std {args.init_std}"},
        "prompts": f"first user turns of the demo conversations, chat-templated, in our seeded order; {args.prompts} per step",
        "group_size": args.group, "rollouts_per_step": args.prompts * args.group, "max_new_tokens": args.max_new_tokens,
        "sampling": "temperature 1.0, no top-k, no top-p; stop at <|end|> or <|eos|>", "reward": f"count of token {setup.target} ({args.target!r}) in the response",
        "advantage": "(r - group mean) / (group std + eps)", "loss": "clipped surrogate (0.2), mean over the batch's response tokens, + beta * k3 KL to the reference",
        "beta": args.beta, "updates_per_step": 1, "precision": "fp32", "optimizer": "AdamW", "lr": args.lr, "schedule": "constant",
        "steps": args.steps, "warmup_untimed": args.warmup, "rounds": args.rounds, "statistic": "median round, each a fresh run from the same weights",
        "clock": "process CPU time" if clock else "wall (perf_counter)", "cores": cores, "threads": args.threads,
    }
    print_result(
        "grpo", "rollout_tokens_per_s", med["ours"]["tokens"], "trl-grpotrainer", med["trl"]["tokens"],
        n=sum(sum(x["tokens"][args.warmup :]) for x in rounds["ours"]), digits=2,
        steps_per_s={"ours": round(med["ours"]["steps"], 4), "trl": round(med["trl"]["steps"], 4), "ratio": round(med["ours"]["steps"] / med["trl"]["steps"], 3)},
        settings={
            "ours": {**same, "engine": f"model/ppo_train.py PpoTrainer.step: DeepSpeed ZeRO-{args.zero}, gloo world of 1 rank, this process",
                     "generation": "model/generate.py KV-cache sampling", "forwards": "old-policy and reference log-probs recomputed (no grad) before the update"},
            "trl-grpotrainer": {**same, "engine": "trl.GRPOTrainer.train (transformers Trainer + accelerate) in a plain single child process, same cores",
                                "generation": "HF generate (no vLLM on CPU)", "optimizer_impl": args.trl_optim,
                                "forwards": "reference log-probs (beta > 0); old log-probs skipped (num_iterations 1: the ratio is 1 by construction)",
                                "config": "loss_type dapo, scale_rewards group, num_iterations 1, steps_per_generation 1, shuffle_dataset off"},
        },
        quality={
            "tokens_per_step": {side: rounds[side][0]["tokens"] for side in rounds},
            "reward_per_step": {side: [round(v, 4) for v in rounds[side][0]["reward"]] for side in rounds},
            "first_step_kl": {side: rounds[side][0]["kl"][0] for side in rounds},
            "trl_prompt_ids_equal_ours": all(all(x["prompt_ids_match"]) for x in rounds["trl"]),
            "seconds_ours": pt.round_seconds([x["round"] for x in rounds["ours"]], args.warmup),
            "seconds_trl": pt.round_seconds([x["round"] for x in rounds["trl"]], args.warmup),
            "ours_step_split_wall_s": {k: round(v, 4) for k, v in split.items()},
            "ours_step_share": {k: round(v / total, 3) for k, v in split.items()},
        },
    )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
