"""What the post-training benchmarks (bench/sft.py, bench/dpo.py) share: demo chat data built by
the real stages, one starting model in our format and its Hugging Face export, our training step
(model/train.py's Trainer, one rank in this process), a step clock for TRL's trainers, and the
arithmetic of rounds and loss curves.

Not a benchmark itself: the leading underscore keeps it out of `make bench` and `lmf bench`.

    data = demo_data(tmp, "sft_data", seq_len=256, vocab_size=4096)     # real train_tokenizer + sft_data stages
    init = init_model(tmp / "init", data.vocab_size, d_model=128, layers=2, heads=4, kv_heads=2)
    trainer = our_trainer("sft", data, init, tmp / "ours", recipe)      # trainer.train_step() is one step
    hf_dir = export_hf(init, tmp / "hf", data)                          # LlamaForCausalLM + tokenizer + chat template
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lmfoundry.bench._common import commit_doc_shards, pin_cores, rounds_arg

TASKS = "lmfoundry.tasks."


# ---------------------------------------------------------------------- arguments


def add_common_args(parser: argparse.ArgumentParser, batch: int, lr: float) -> None:
    """The knobs both post-training benchmarks share (defaults: the demo model, a few minutes on 2 cores)."""
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per round and side")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of every round left out of the timing")
    parser.add_argument("--rounds", type=rounds_arg, default=3, help="alternating rounds per side (at least 3; the median counts)")
    parser.add_argument("--batch", type=int, default=batch, help="samples per optimizer step (one micro batch, no accumulation)")
    parser.add_argument("--seq-len", type=int, default=256, help="the data stage's seq_len")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary of the bench's tokenizer (trained on the demo corpus)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument(
        "--init-std", type=float, default=0.3,
        help="weight scale of the random starting model: large enough that its predictions depend on the context, so a "
        "difference in attention masks or positions shows in the losses (at 0.02, the pretraining init, it barely does)",
    )
    parser.add_argument("--lr", type=float, default=lr, help="constant learning rate on both sides (no warmup, no decay)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decay of matrices on both sides (norm gains never)")
    parser.add_argument("--zero", type=int, default=1, choices=[0, 1, 2], help="our DeepSpeed ZeRO stage (the stages' default is 1)")
    parser.add_argument(
        "--trl-optim", default="adamw_torch",
        help="TRL's optimizer implementation; adamw_torch is ours (torch.optim.AdamW) and measured faster on CPU than TRL's default adamw_torch_fused",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both sides; the process is pinned to this many cores")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", choices=["auto", "always", "never"], default="auto", help="profile both sides' steps (auto: when ours is slower, ratio < 1)")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps after the warm-up to profile")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.steps <= args.warmup or args.warmup < 1:
        parser.error(f"--warmup must be at least 1 and below --steps (got --warmup {args.warmup}, --steps {args.steps}): a round times the steps after its warm-up")
    if min(args.batch, args.threads, args.seq_len, args.profile_steps) < 1:
        parser.error("--batch, --threads, --seq-len and --profile-steps must be at least 1")


def run_benchmark(args: argparse.Namespace, name: str, run: Callable[[Path, "TrlWorker"], int]) -> int:
    """What every post-training benchmark does around its rounds: quiet logs, pinned cores and
    threads, a scratch folder (removed unless --work) and TRL's side in its own worker process;
    ``run(root, worker)`` prints the result line."""
    quiet()
    pin_cores(args.threads)
    torch.set_num_threads(args.threads)
    root = Path(args.work or tempfile.mkdtemp(prefix=f"lmf-bench-{name}-"))
    try:
        with TrlWorker(args.threads) as worker:
            return run(root, worker)
    finally:
        if not args.work:
            shutil.rmtree(root, ignore_errors=True)


def quiet() -> None:
    """DeepSpeed logs its config at INFO, transformers / datasets print progress bars: keep stdout for the result."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    for name in ("transformers", "datasets", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ---------------------------------------------------------------------- data


@dataclass
class DemoData:
    """A store holding the bench's train_tokenizer stage and one chat data stage built from it."""

    store: Any
    data: Any  # StageRef of sft_data or preference_data
    index: dict[str, Any]
    stats: dict[str, Any]
    tokenizer_json: Path
    special: dict[str, int]

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])


def demo_data(root: Path, stage: str, seq_len: int, vocab_size: int, section: dict[str, Any] | None = None) -> DemoData:
    """Run the real train_tokenizer stage on the chatterbot demo corpus' text, then the real
    `stage` (sft_data or preference_data) on it, in a fresh store under `root`. `section` adds to
    the data stage's config (default: the demo corpus, builtin chatterbot)."""
    from lmfoundry.infra.config import PipelineConfig
    from lmfoundry.infra.stage import StageSpec, run_stage
    from lmfoundry.infra.store import Store
    from lmfoundry.tasks.chat import demo
    from lmfoundry.tasks.tokens.train_tokenizer import load_tokenizer

    store = Store(str(root / "store"))
    docs = [{"id": f"chat-{i}", "text": "\n".join(c.turns)} for i, c in enumerate(demo.conversations())]
    docs_ref = commit_doc_shards(store, [docs])
    specs = {
        "train_tokenizer": StageSpec("train_tokenizer", TASKS + "tokens.train_tokenizer:run_train_tokenizer", section="tokenizer", inputs=("bench_docs",)),
        "sft_data": StageSpec("sft_data", TASKS + "chat.sft_data:run_sft_data", section="sft_data", inputs=("train_tokenizer",)),
        "preference_data": StageSpec("preference_data", TASKS + "chat.preference_data:run_preference_data", section="preference_data", inputs=("train_tokenizer",)),
    }
    data_section = {"enabled": True, "seq_len": seq_len, **(section or {"builtin": "chatterbot"})}
    cfg = PipelineConfig.model_validate({"tokenizer": {"vocab_size": vocab_size}, stage: data_section})
    tokenizer_ref = run_stage(store, specs["train_tokenizer"], cfg, [docs_ref]).ref
    outcome = run_stage(store, specs[stage], cfg, [tokenizer_ref])
    tokenizer, special = load_tokenizer(store, tokenizer_ref)
    tokenizer_json = root / "tokenizer.json"
    tokenizer_json.write_text(tokenizer.to_str())
    index = store.reader(outcome.ref).read_json("index.json")
    return DemoData(store, outcome.ref, index, dict(outcome.stats), tokenizer_json, dict(special))


# ---------------------------------------------------------------------- the model, ours and exported


def init_model(directory: Path, vocab_size: int, d_model: int, layers: int, heads: int, kv_heads: int, seed: int = 0, init_std: float = 0.02) -> Path:
    """A randomly initialised dense model in our format (model.safetensors + model_config.json)."""
    from lmfoundry.infra.config import ModelConfig
    from lmfoundry.model.transformer import Transformer, resolve, save_model

    cfg = resolve(ModelConfig(d_model=d_model, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, init_std=init_std), vocab_size)
    torch.manual_seed(seed)
    save_model(Transformer(cfg).state_dict(), cfg, directory)
    return directory


def export_hf(init_dir: Path, out_dir: Path, data: DemoData) -> Path:
    """The same weights as LlamaForCausalLM (model/export.py), with the tokenizer and our chat template."""
    from lmfoundry.model.export import export_llama

    export_llama(init_dir, out_dir, data.index["seq_len"] + 1, data.tokenizer_json, data.special)
    return out_dir


def load_hf(hf_dir: Path):
    """(LlamaForCausalLM in fp32 with SDPA attention, its tokenizer) from an export."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model, AutoTokenizer.from_pretrained(hf_dir)


def recipe(section: str, args: argparse.Namespace):
    """The stage's own recipe defaults (betas, eps, clipping, precision from SftConfig / DpoConfig)
    with the bench's steps, batch, constant learning rate and ZeRO stage."""
    from lmfoundry.infra.config_posttrain import DpoConfig, SftConfig

    cls = {"sft": SftConfig, "dpo": DpoConfig}[section]
    cfg = cls(
        enabled=True, steps=args.steps, global_batch_size=args.batch, lr=args.lr, min_lr=args.lr, warmup_steps=0,
        weight_decay=args.weight_decay, seed=args.seed, precision="fp32",
        distributed=cls.Distributed(zero_stage=args.zero, cpu_threads=args.threads),
    )
    return cfg, cfg.recipe()


def our_trainer(objective: str, data: DemoData, init_dir: Path, work_dir: Path, train_recipe, options: dict[str, Any] | None = None):
    """model/train.py's Trainer for one rank in this process: the engine, loader and objective the
    training stages run (DPO computes its reference log-probs here, before any step)."""
    from lmfoundry.model.train import Trainer, TrainJob
    from lmfoundry.model.engine import init_single_process

    init_single_process("gloo")
    job = TrainJob(
        objective=objective, recipe=train_recipe, store_url=data.store.url, data=data.data, init_from=str(init_dir),
        options=options or {}, work_dir=str(work_dir),
    )
    return Trainer(job)


# ---------------------------------------------------------------------- clocks


def now() -> tuple[float, float]:
    """(wall, CPU) seconds: perf_counter and this process' CPU time (all its threads)."""
    return time.perf_counter(), time.process_time()


@dataclass
class Round:
    """One side's round: a clock reading before the first step and after every step, and the losses."""

    marks: list[tuple[float, float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    profile: list[dict[str, Any]] = field(default_factory=list)  # op_table of profiled steps, if any

    def seconds(self, warmup: int, clock: int) -> float:
        """Seconds of the steps after the warm-up: from the end of step `warmup` to the end of the last."""
        return self.marks[-1][clock] - self.marks[warmup][clock]


def run_ours(trainer, steps: int) -> Round:
    """`steps` training steps exactly as the stage's run loop takes them (Trainer.train_step: the
    micro batches from the loader, the objective's loss, backward, the engine's optimizer step and
    the per-step loss all-reduce), without the loop's logging, validation, checkpoints and spike watch."""
    out = Round(marks=[now()])
    for _ in range(steps):
        out.losses.append(trainer.train_step(record_activations=False)["loss"])
        out.marks.append(now())
    return out


def trl_clock():
    """A transformers TrainerCallback that reads the clock when training begins and after every
    optimizer step, and keeps the loss each step logs (logging_steps=1); `.round` is the Round."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.round = Round()

        def on_train_begin(self, args, state, control, **kwargs):
            self.round.marks.append(now())

        def on_step_end(self, args, state, control, **kwargs):
            self.round.marks.append(now())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.round.losses.append(float(logs["loss"]))

    return StepClock()


def trl_common(args: argparse.Namespace, out_dir: Path, section_cfg) -> dict[str, Any]:
    """The TrainingArguments both TRL trainers get: our optimizer settings, fp32 on CPU, no
    gradient checkpointing (TRL's default is on), a sequential sampler (the order we feed), a log
    line per step and nothing saved."""
    return dict(
        output_dir=str(out_dir), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=args.weight_decay,
        adam_beta1=section_cfg.betas[0], adam_beta2=section_cfg.betas[1], adam_epsilon=section_cfg.adam_eps, max_grad_norm=section_cfg.grad_clip,
        optim=args.trl_optim, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, seed=args.seed,
        train_sampling_strategy="sequential", dataloader_num_workers=0, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True,
    )


class TrlWorker:
    """TRL's side in a child process of its own, started once before the rounds.

    Our side needs a torch.distributed world (gloo, one rank) in this process; in the same
    process accelerate would see it, wrap TRL's model in DistributedDataParallel and reset the
    torch thread count. The child is what a TRL user runs: one plain process. It inherits this
    process' core pinning, runs with the same torch thread count, prints to stderr (stdout is
    the benchmark's), and measures its own clock. ``call("module:function", *args)`` runs a
    top-level function there and returns its (picklable) result."""

    def __init__(self, threads: int):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, threads), daemon=True)
        self.process.start()
        child.close()

    def call(self, target: str, *args: Any) -> Any:
        self.conn.send((target, args))
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"the TRL side failed in its worker process:\n{value}")
        return value

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send(None)
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()

    def __enter__(self) -> "TrlWorker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _serve(conn, threads: int) -> None:
    """The worker's loop: a plain single process (no launcher variables), stdout to stderr."""
    import importlib
    import sys
    import traceback

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # what accelerate would otherwise set on its own
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    quiet()
    torch.set_num_threads(threads)
    while (message := conn.recv()) is not None:
        target, args = message
        try:
            module, name = target.split(":")
            conn.send(("ok", getattr(importlib.import_module(module), name)(*args)))
        except BaseException:  # reported to the parent (argparse's SystemExit too), which raises it with this traceback
            conn.send(("error", traceback.format_exc()))
    sys.stderr.flush()
    os._exit(0)  # nothing left to save: skip the seconds of interpreter teardown (torch, datasets)


# ---------------------------------------------------------------------- statistics


def clock_index(threads: int) -> int:
    """CPU time for one thread (other programs on a shared machine barely disturb it), wall time otherwise."""
    return 1 if threads == 1 else 0


def median_rate(rounds: list[Round], warmup: int, work_per_step: float, clock: int) -> float:
    """Work per second of the median round (each round: its steps after the warm-up)."""
    steps = len(rounds[0].losses) - warmup
    return statistics.median(steps * work_per_step / r.seconds(warmup, clock) for r in rounds)


def curve_gap(ours: list[float], theirs: list[float]) -> tuple[float, float]:
    """(|first-step loss difference|, max over steps of |ours - theirs| / |theirs|)."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"loss curves of different lengths: ours {len(ours)} steps, baseline {len(theirs)}")
    return abs(ours[0] - theirs[0]), max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, theirs))


def round_seconds(rounds: list[Round], warmup: int) -> dict[str, list[float]]:
    return {"cpu_s": [round(r.seconds(warmup, 1), 4) for r in rounds], "wall_s": [round(r.seconds(warmup, 0), 4) for r in rounds]}


def op_table(prof, steps: int, top: int = 12) -> list[dict[str, Any]]:
    """The operators of a finished torch.profiler run with the most self CPU time, per step."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [
        {"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 3), "share": round(e.self_cpu_time_total / total, 3), "calls_per_step": e.count // steps}
        for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    ]


def profile_ours(trainer, warmup: int, steps: int) -> list[dict[str, Any]]:
    """Our steps after `warmup` untimed ones, under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    run_ours(trainer, warmup)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_ours(trainer, steps)
    return op_table(prof, steps)


def profile_sides(args: argparse.Namespace, slower: bool, make_ours, trl_round) -> dict[str, Any]:
    """Where each side's step time goes (--profile auto: only when ours is the slower one):
    torch.profiler over --profile-steps steps after the warm-up, ours from make_ours() (a fresh
    Trainer), TRL's from trl_round(args for warm-up + profiled steps) in the worker."""
    if args.profile == "never" or (args.profile == "auto" and not slower):
        return {}
    trainer = make_ours()
    ours = profile_ours(trainer, args.warmup, args.profile_steps)
    del trainer
    short = argparse.Namespace(**{**vars(args), "steps": args.warmup + args.profile_steps})
    return {"steps": args.profile_steps, "ours": ours, "trl": trl_round(short).profile}


def trl_profiler(warmup: int, steps: int):
    """A TrainerCallback that profiles TRL's own loop from the end of step `warmup` to the end of
    step `warmup + steps`; `.table` is op_table's result afterwards."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        def __init__(self):
            self.prof, self.table = None, []

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.prof = profile(activities=[ProfilerActivity.CPU])
                self.prof.__enter__()
            elif state.global_step == warmup + steps and self.prof is not None:
                self.prof.__exit__(None, None, None)
                self.table = op_table(self.prof, steps)

    return StepProfiler()


def reward_model_stats(store_url: str, pipeline: str = "demo") -> dict[str, Any]:
    """The committed reward_model stage's held-out accuracy next to the length-only baseline's,
    from a demo store (`make demo` writes .lmf/store), or why there is none."""
    from lmfoundry.infra.store import Store

    if "://" not in store_url and not Path(store_url).is_dir():  # a Store would create the folder
        return {"available": False, "why": f"no store at {store_url}: run `make demo` first, or pass --store"}
    try:
        store = Store(store_url)
        version = store.get_ref(pipeline, "reward_model")
        manifest = store.manifest("reward_model", version) if version else None
    except Exception as exc:  # an unreadable store is a note in the result, not a failed benchmark
        return {"available": False, "why": f"cannot read the store {store_url}: {exc}"}
    if not manifest:
        return {"available": False, "why": f"no committed reward_model stage in {store_url} (pipeline '{pipeline}'): run `make demo` first"}
    stats = manifest.get("stats", {})
    return {
        "available": True, "store": store_url, "version": version,
        "val_accuracy": stats.get("val_accuracy"), "length_baseline_accuracy": stats.get("length_baseline_accuracy"),
        "first_val_accuracy": stats.get("first_val_accuracy"), "pairs": stats.get("pairs"),
    }
