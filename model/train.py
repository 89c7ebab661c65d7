"""The training run loop: one DeepSpeed rank per process, for every objective.

Normally started by a training stage (tasks/train/: pretrain, sft, reward_model, dpo), which writes
the job file and uploads what this script leaves in the work directory. By hand, with a job file::

    deepspeed --num_gpus 2 --master_port 29512 model/train.py --job job.json         # 2 local ranks
    torchrun --standalone --nproc_per_node 2 model/train.py --job job.json           # the same
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 model/train.py --job job.json           # on CPUs (gloo)

The job file is a ``TrainJob`` (below): the objective (pretrain, sft, reward, dpo; model/objectives.py
says what each optimises), the training recipe, the data stage, the model to start from (a
local directory in our format; pretraining builds job.model's shape instead), objective
options, a local work directory and an optional checkpoint to resume from. This file owns the
rest: engine, schedule, checkpoints with RNG and data position, exact resume, metrics, the
divergence stop and the evaluation cadence.

Work directory, written by rank 0 (other ranks only add their checkpoint shards)::

    metrics.jsonl                      one JSON object per logged step and per validation
    checkpoints/step-0000050/          DeepSpeed engine state + rng_rankNNNNN.pt per rank
    checkpoints/step-0000050/COMPLETE.json   written last: the checkpoint is whole
    reference/                         DPO only: the starting model's log-probs (COMPLETE.json last)
    final/model.safetensors, final/model_config.json   fp32 weights at the end (+ reward.json)
    DONE.json                          summary, written last

Every step all ranks agree on the loss (one small all-reduce, kept on the device: model/step_checks.py
reads the queued steps every ``divergence_check_every`` steps and before each log line, validation
and checkpoint), so a NaN/inf stops every rank with the same clear error at most that many steps
late, and the last complete checkpoint, always taken before it, stays the one to resume from.
Checkpoint files are written by a background thread (model/async_checkpoint.py, ``async_checkpoints``).
A finite spike (loss or grad norm above a rolling mean + k sigma, model/stability.py; the
recipe's ``stability`` section) marks the last checkpoint before it ``PROTECTED.json`` (the
stage's rotation keeps it), then stops with an error naming it, or rolls back to it: the
batches since are skipped, the learning rate optionally scaled, a ``rollback`` line logged.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import AliasChoices, BaseModel, Field

from lmfoundry.infra import faults
from lmfoundry.infra.config import ModelConfig
from lmfoundry.infra.config_train import TrainRecipe
from lmfoundry.infra.heartbeat import beat
from lmfoundry.infra.store import StageRef, Store
from lmfoundry.model.cluster import CollectiveTimeout, check_shared_work_dir, collective_errors, init_distributed, rank_device
from lmfoundry.model.universal import load_resharded, needs_reshard, rng_file
from lmfoundry.model.accel import FLOP_CONVENTION_SHORT as MFU_FLOPS, describe as describe_fast_path, fast_path
from lmfoundry.model import parallel
from lmfoundry.model.async_checkpoint import CheckpointWriter, write_torch
from lmfoundry.model.loader import Prefetcher
from lmfoundry.model.objectives import OBJECTIVES
from lmfoundry.model.stability import Spike, StabilityMonitor
from lmfoundry.model.engine import batch_split, build_engine, device_micro_steps, lr_at
from lmfoundry.model.step_checks import DivergenceError, StepQueue, activation_summary, check_every

COMPLETE = "COMPLETE.json"
PROTECTED = "PROTECTED.json"  # in a checkpoint: the last one before a spike; rotation keeps it
DONE = "DONE.json"
METRICS = "metrics.jsonl"


# the config section each objective's recipe comes from (named in messages and log lines)
SECTIONS = {"pretrain": "pretrain", "sft": "sft", "reward": "reward_model", "dpo": "dpo"}


class TrainJob(BaseModel):
    objective: Literal["pretrain", "sft", "reward", "dpo"] = "pretrain"
    model: ModelConfig | None = None  # the shape to build (pretraining); post-training reads init_from's
    recipe: TrainRecipe = Field(validation_alias=AliasChoices("recipe", "pretrain"))  # the shared fields only
    store_url: str
    storage_options: dict[str, Any] = {}
    data: StageRef = Field(validation_alias=AliasChoices("data", "tokens"))  # tokenize, sft_data or preference_data
    init_from: str | None = None  # a local directory with model.safetensors + model_config.json to start from
    options: dict[str, Any] = {}  # objective options: reward margin / center_coef, dpo beta
    work_dir: str
    resume_tag: str | None = None  # a checkpoint under work_dir/checkpoints to continue from

    @property
    def section(self) -> str:
        return SECTIONS[self.objective]


# ---------------------------------------------------------------------- pure pieces


def percent(value: float | None) -> str:
    return "n/a (unknown peak)" if value is None else f"{value:.2%}"


def step_tag(step: int) -> str:
    return f"step-{step:07d}"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def keep_metrics_until(path: Path, step: int) -> None:
    """On resume, drop metric lines written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


# ---------------------------------------------------------------------- the run


class Trainer:
    def __init__(self, job: TrainJob):
        import torch.distributed as dist

        self.job, self.cfg, self.dist, self.section = job, job.recipe, dist, job.section
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        init_distributed(self.cfg.distributed)  # with distributed.collective_timeout_s
        self.world = dist.get_world_size()
        # tensor / sequence parallel groups inside the world; data parallel across them (model/parallel.py)
        self.layout = parallel.layout(self.cfg.distributed, self.rank, self.world, self.section)
        self.device = rank_device(self.cfg.distributed, self.local_rank)
        self.work = Path(job.work_dir)
        self.checkpoints = self.work / "checkpoints"
        if self.rank == 0:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
        if self.world > 1:  # every rank writes checkpoint shards here and rank 0 commits them: it must be one directory
            check_shared_work_dir(self.work, self.rank, self.world, self.section)

        store = Store(job.store_url, job.storage_options)
        self.micro, self.accumulation = batch_split(self.cfg.global_batch_size, self.layout.dp, self.cfg.distributed.micro_batch_size, self.section)
        self.objective = OBJECTIVES[job.objective](job, self)
        self.loader, self.val = self.objective.loaders(store)
        # the next batch is drawn (and pinned, on GPUs) in a thread while a step runs; same order and state
        self.loader = Prefetcher(self.loader, pin_memory=self.device.type == "cuda")
        self.seq_len = self.objective.seq_len

        torch.manual_seed(self.cfg.seed)  # the same initial weights on every rank
        model = self.objective.build_model()
        self.model_cfg = self.objective.model_cfg
        model.activation_checkpointing = self.cfg.distributed.activation_checkpointing
        parallel.check_model(self.layout, self.model_cfg, self.seq_len, self.section)
        mpu = parallel.sequence_parallel_mpu(model, self.layout)  # Ulysses attention; None without sp
        # the fast path on this device (model/accel.py): TF32, attention kernel, compiled blocks, MFU
        # peak; the attention context stays open for the rank's life
        self.kernels, self.fast = fast_path(model, self.model_cfg, self.cfg.distributed, self.cfg.precision, self.device)
        self.log(describe_fast_path(self.fast))
        self.flops_per_token = model.flops_per_token(self.seq_len)
        self.n_params = model.num_parameters()
        self.engine = build_engine(model, self.cfg, self.layout.dp, self.section, mpu=mpu)  # AutoTP shards it when tp > 1
        self.step = 0
        self.tokens_seen = 0
        stab = self.cfg.stability
        self.monitor = StabilityMonitor(stab.window, stab.sigmas, stab.warmup_steps, stab.min_history, stab.min_ratio)
        self.lr_scale, self.rollbacks, self.last_checkpoint = 1.0, 0, None  # scale and count change on rollback
        # step metrics on the device until a check step; tokens count once per TP group
        self.queue = StepQueue(self.objective.metrics, self.world // self.layout.tp)
        self.check_every = check_every(self.cfg.divergence_check_every, self.cfg.distributed.accelerator)
        self.last_save_time = time.monotonic()
        # checkpoint files written by a background thread from a host snapshot (COMPLETE.json last)
        self.writer = CheckpointWriter(self.rank, self.world, threaded=self.cfg.async_checkpoints)
        self.writer.install(self.engine)
        self.save_stall_s = 0.0  # time training waited for checkpoints (the snapshot, or the whole write)
        self.objective.prepare(self.engine)  # before a resume: it may need the starting weights
        if job.resume_tag:
            self.resume(job.resume_tag)
        self.metrics_path = self.work / METRICS
        if self.rank == 0:
            keep_metrics_until(self.metrics_path, self.step)
        # the whole-run clock (tokens_per_s_wall): from here, evaluation and checkpoints included
        self.clock_start, self.clock_tokens = time.perf_counter(), self.tokens_seen

    # ------------------------------------------------------------------ checkpoints
    def resume(self, tag: str) -> None:
        if hasattr(self, "writer"):
            self.writer.wait()  # a rollback may load the checkpoint still being written
        marker = json.loads((self.checkpoints / tag / COMPLETE).read_text())
        zero_stage = self.cfg.distributed.zero_stage
        if needs_reshard(marker, self.world, zero_stage):  # written by another rank count or ZeRO stage: its universal form
            path, client = load_resharded(self.engine, self.work, self.checkpoints, tag, marker, self.world, zero_stage, self.rank, self.dist.barrier, self.section)
        else:
            path, client = self.engine.load_checkpoint(str(self.checkpoints), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {tag} under {self.checkpoints}")
        self.step = int(client["step"])
        self.tokens_seen = int(client.get("tokens", 0))
        self.loader.load_state_dict(client["loader"])
        set_rng_state(torch.load(rng_file(self.checkpoints / tag, self.rank, int(marker["world_size"])), weights_only=False))
        self.monitor.load_state_dict(client.get("stability", {}))
        self.lr_scale, self.rollbacks = float(client.get("lr_scale", 1.0)), int(client.get("rollbacks", 0))
        self.last_checkpoint = tag
        self.log(f"resumed from {tag} at step {self.step} (sample {client['loader']['sample']})")

    def save(self, loss: float) -> None:
        tag = step_tag(self.step)
        client = {
            "step": self.step, "loader": self.loader.state_dict(), "tokens": self.tokens_seen,
            "stability": self.monitor.state_dict(), "lr_scale": self.lr_scale, "rollbacks": self.rollbacks,
        }
        started = time.perf_counter()
        self.writer.wait()  # one checkpoint in flight at a time; a failed write is raised here
        self.engine.save_checkpoint(str(self.checkpoints), tag=tag, client_state=client)  # snapshot, files queued
        self.writer.submit(write_torch, rng_state(), self.checkpoints / tag / f"rng_rank{self.rank:05d}.pt")
        self.writer.submit(faults.hit, self.section, "checkpoint_write", self.step)  # tests: die mid-write
        marker = {"step": self.step, "loss": loss, "world_size": self.world, "zero_stage": self.cfg.distributed.zero_stage, "sample": client["loader"]["sample"]}
        self.writer.finish_checkpoint(self.checkpoints / tag, marker, after=lambda: self.committed(tag, self.step))
        self.save_stall_s += time.perf_counter() - started
        self.last_checkpoint = tag
        self.last_save_time = time.monotonic()

    def committed(self, tag: str, step: int) -> None:
        """Rank 0, once COMPLETE.json is written (in the writer thread when checkpoints are async)."""
        self.log(f"checkpoint {tag} saved")
        self.heartbeat("checkpoint")
        faults.hit(self.section, "after_checkpoint", step)

    # ------------------------------------------------------------------ metrics
    def log(self, text: str) -> None:
        if self.rank == 0:
            print(f"[{self.section}] {text}", flush=True)

    def heartbeat(self, phase: str) -> None:
        """Progress for the stage watchdog (infra/heartbeat.py); rank 0 speaks for all (they move in lockstep)."""
        if self.rank == 0:
            beat(self.work, self.step, phase)

    def throughput(self, tokens_per_s: float) -> dict[str, Any]:
        """Interval tokens/s and its MFU, tokens per wall-clock second of the whole run (evaluation
        and checkpoints included) and its MFU, and the FLOP convention both MFUs use."""
        wall = (self.tokens_seen - self.clock_tokens) / max(time.perf_counter() - self.clock_start, 1e-9)
        peak = self.fast["peak_tflops"]
        mfu = (lambda rate: self.flops_per_token * rate / (peak * 1e12 * self.world)) if peak else (lambda rate: None)
        return {"tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s), "tokens_per_s_wall": wall, "mfu_wall": mfu(wall), "mfu_flops": MFU_FLOPS}

    def write_metrics(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def all_mean(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(tensor)
        return (tensor / self.world).tolist()

    def all_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(tensor)
        return tensor.tolist()

    # ------------------------------------------------------------------ steps
    def step_on_device(self, record_activations: bool) -> torch.Tensor:
        """One optimizer step; its metrics all-reduced into one device vector (StepQueue.pack's
        order), with no host read: the caller queues it and reads it on a check step."""
        batches = [next(self.loader) for _ in range(self.accumulation)]
        self.objective.begin_step(batches)
        local = device_micro_steps(self.engine, batches, self.objective.loss, record_activations, self.plain_grad_norm)
        every_s = self.cfg.checkpoint_every_s
        due = bool(every_s) and time.monotonic() - self.last_save_time >= every_s
        # tokens ride along as a mean (exact in float64), so the step costs one all-reduce
        values = torch.stack(self.queue.pack(local, self.device, due))
        self.dist.all_reduce(values)
        return values / self.world

    def train_step(self, record_activations: bool) -> dict[str, float | None]:
        """One step read back at once (benchmarks): its metrics, checked for NaN/inf."""
        self.queue.push(self.step + 1, self.step_on_device(record_activations), self.loader.state_dict(), 0.0)
        return self.queue.read(self.cfg.precision, self.section)[-1].metrics

    def plain_grad_norm(self) -> torch.Tensor | None:
        """DeepSpeed reports the norm only when an optimizer wrapper (ZeRO, bf16/fp16) computes it;
        plain ZeRO-0 fp32 grads are whole and already averaged over ranks here, so measure them (on the device)."""
        if self.cfg.distributed.zero_stage or self.cfg.precision != "fp32" or self.layout.tp > 1:
            return None  # under tp a rank holds shards: only DeepSpeed's ZeRO norm (zero_stage >= 1) spans them
        norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else None

    def check_queued(self) -> dict[str, Any] | None:
        """Read the queued steps (one host read), oldest first: a NaN/inf raises DivergenceError, a
        spike stops or rolls back (then None). Else the newest step's metrics (+ lr, save_due)."""
        newest = None
        for step in self.queue.read(self.cfg.precision, self.section):
            spike = self.monitor.observe(step.number, step.metrics) if self.cfg.stability.enabled else None
            if spike is not None:
                self.on_spike(spike, step.loader_state)  # raises (stop) or rolls back to the protected checkpoint
                return None
            self.tokens_seen += step.metrics["tokens"]
            self.interval_tokens += step.metrics["tokens"]
            newest = step
        return {**newest.metrics, "lr": newest.lr, "save_due": newest.save_due}

    def evaluate(self) -> dict[str, float]:
        self.engine.eval()
        try:
            return self.objective.evaluate(self.engine)
        finally:
            self.engine.train()

    def run(self) -> dict[str, Any]:
        """Train to the configured steps; when training stops early (divergence, an error) the
        checkpoint still being written is finished first, so it is the one to resume from."""
        try:
            summary = self.train_loop()
        except BaseException:
            self.writer.close(raise_errors=False)
            raise
        self.writer.close()
        return summary

    def train_loop(self) -> dict[str, Any]:
        cfg = self.cfg
        self.log(
            f"{self.job.objective}: {self.n_params / 1e6:.2f}M parameters, {self.flops_per_token / 1e6:.1f} MFLOP/token, {self.world} rank(s) (tp {self.layout.tp}, sp {self.layout.sp}), "
            f"batch {cfg.global_batch_size} = {self.layout.dp} data-parallel x {self.micro} x {self.accumulation} accumulation, seq_len {self.seq_len}, "
            f"train {self.loader.num_samples} samples, val {self.val.num_samples}"
        )
        interval_start, self.interval_tokens = time.perf_counter(), 0
        run_start = time.perf_counter()
        last: dict[str, Any] = {}
        last_saved = self.step
        while self.step < cfg.steps:
            log_now = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.steps
            lr = lr_at(self.step, cfg) * self.lr_scale
            values = self.step_on_device(record_activations=log_now)
            self.step += 1
            self.heartbeat("train")
            self.queue.push(self.step, values, self.loader.state_dict(), lr)
            eval_now = self.step % cfg.eval_every == 0 or self.step == cfg.steps
            save_now = self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps
            if not (log_now or eval_now or save_now or self.step % self.check_every == 0):
                continue  # the metrics stay queued on the device: no host read this step
            checked = self.check_queued()  # NaN/inf raises, a spike stops or rolls back
            if checked is None:
                continue
            last = {k: v for k, v in checked.items() if k not in ("lr", "save_due")}
            if log_now:
                tokens_per_s = self.interval_tokens / (time.perf_counter() - interval_start)
                record = {
                    "kind": "train",
                    "step": self.step,
                    **last,
                    "lr": lr,
                    "tokens": self.tokens_seen,
                    **self.throughput(tokens_per_s),
                    "activations": activation_summary(self.engine.module.activation_stats),
                }
                if self.model_cfg.moe_experts:
                    record["expert_load"] = self.engine.module.expert_load()
                self.write_metrics(record)
                extra = "".join(f" {name} {last[name]:.3f}" for name in ("accuracy", "margin") if name in last)
                self.log(
                    f"step {self.step}/{cfg.steps} loss {last['loss']:.4f}{extra} lr {lr:.2e} grad_norm {record['grad_norm'] or 0:.3f} "
                    f"tokens/s {tokens_per_s:,.0f} (whole run {record['tokens_per_s_wall']:,.0f}) mfu {percent(record['mfu'])}"
                )
                interval_start, self.interval_tokens = time.perf_counter(), 0
            if eval_now:
                val = self.evaluate()
                self.write_metrics({"kind": "val", "step": self.step, **val})
                self.log(f"step {self.step} " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in val.items()))
                self.heartbeat("eval")
                interval_start = time.perf_counter()  # validation time is not training throughput
            if save_now or checked["save_due"]:  # always after a check: never a checkpoint past an unread NaN
                self.save(last["loss"])
                last_saved = self.step
                interval_start = time.perf_counter()
        if last_saved != self.step:  # resumed at the final step: nothing left to train
            self.save(last.get("loss", float("nan")))
        return self.finish(time.perf_counter() - run_start)

    # ------------------------------------------------------------------ spikes
    def on_spike(self, spike: Spike, skip_to: dict[str, Any]) -> None:
        """Protect the last checkpoint before the spike, then stop or roll back to it (every rank alike:
        they all saw the same all-reduced loss and global norm). skip_to: the loader position after
        the spiking step (it may have been found a few steps later)."""
        stab, tag = self.cfg.stability, self.last_checkpoint
        if tag is not None and self.rank == 0:
            write_json_atomic(self.checkpoints / tag / PROTECTED, {**spike.__dict__, "rollbacks": self.rollbacks})
        where = f"checkpoint {tag} (the last before the spike) is protected from rotation" if tag else "no checkpoint was saved before the spike"
        if stab.action == "stop" or tag is None or self.rollbacks >= stab.max_rollbacks:
            why = "" if stab.action == "stop" else (f"; {self.rollbacks} rollbacks used ({self.section}.stability.max_rollbacks)" if tag else "; nothing to roll back to")
            other = f" (or set {self.section}.stability.action=rollback with lr_factor < 1)" if stab.action == "stop" else ""
            raise DivergenceError(f"training is diverging: {spike.describe()}{why}. {where}: resume from it with a lower {self.section}.lr{other}.")
        spike_step = spike.step  # the batches up to it are skipped (skip_to), later ones drawn again
        self.log(f"spike: {spike.describe()}; rolling back to {tag}")
        rollbacks, scale = self.rollbacks + 1, self.lr_scale * stab.lr_factor  # both compound over rollbacks
        self.resume(tag)
        self.rollbacks, self.lr_scale = rollbacks, scale
        self.loader.load_state_dict(skip_to)
        # the schedule multiplies its base rates (saved with later checkpoints, so a resume keeps
        # them); the optimizer already holds the next step's rate
        sched = self.engine.lr_scheduler
        sched.base_lrs = [self.cfg.lr * scale for _ in sched.base_lrs]
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.cfg) * scale
        if self.rank == 0:
            keep_metrics_until(self.metrics_path, self.step)
        self.write_metrics({"kind": "rollback", "step": self.step, "spike_step": spike_step, "metric": spike.metric, "value": spike.value,
                            "threshold": spike.threshold, "to": tag, "skipped_to_sample": skip_to.get("sample"), "lr_scale": self.lr_scale})

    def finish(self, seconds: float) -> dict[str, Any]:
        """fp32 weights of the final step in our format, and a summary; rank 0 only writes.

        With ZeRO >= 1 they come from the optimizer's fp32 master copy in the checkpoint; with
        ZeRO-0 from the module itself (so bf16/fp16 training exports its rounded weights)."""
        self.writer.wait()  # the final checkpoint is whole before it is exported or reported
        extra = self.objective.finalize(self.engine)  # every rank: it may run the model
        tag = step_tag(self.step)
        if self.layout.tp > 1:  # AutoTP shards: gathered by every rank, whole on rank 0 (the module's weights)
            state = parallel.full_state_dict(self.engine)
        elif self.cfg.distributed.zero_stage == 0:
            state = self.engine.module.state_dict() if self.rank == 0 else None
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(self.checkpoints), tag=tag) if self.rank == 0 else None
        summary: dict[str, Any] = {}
        if self.rank == 0:
            self.objective.save({k: v.float() for k, v in state.items()}, self.work / "final", extra)
            summary = {
                "objective": self.job.objective,
                "steps": self.step,
                "seconds": seconds,
                "parameters": self.n_params,
                "flops_per_token": self.flops_per_token,
                "seq_len": self.seq_len,
                "world_size": self.world,
                "vocab_size": self.model_cfg.vocab_size,
                "tokens": self.tokens_seen,
                **{k: v for k, v in self.throughput(0.0).items() if k in ("tokens_per_s_wall", "mfu_wall", "mfu_flops")},
                "fast_path": self.fast,  # device, precision, tf32, attention, compiled blocks, peak and its source, FLOP convention
                **extra,
            }
            write_json_atomic(self.work / DONE, summary)
            self.log(f"done: {self.step} steps in {seconds:.1f}s")
        self.dist.barrier()
        return summary



def run_rank(argv: list[str] | None, job_type: type[BaseModel], trainer_type: type, section: Callable[[Any], str]) -> int:
    """One rank's entry point (the launcher starts one per device): read the job file, run the
    trainer; a divergence is one clear line from rank 0 and exit status 3."""
    parser = argparse.ArgumentParser(description=f"one {trainer_type.__name__} rank (see the module docstring)")
    parser.add_argument("--job", required=True, help=f"{job_type.__name__} JSON file")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    job = job_type.model_validate_json(Path(args.job).read_text())
    rank = int(os.environ.get("RANK", "0"))
    # DeepSpeed logs its whole config at INFO on every rank; rank 0's own lines are enough
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    try:
        with collective_errors(section(job), job.recipe.distributed.collective_timeout_s, rank):
            trainer_type(job).run()
    except DivergenceError as exc:
        if rank == 0:
            print(f"[{section(job)}] ERROR: {exc}", file=sys.stderr, flush=True)
        return 3
    except CollectiveTimeout as exc:  # the rank that waited says so (the others may be the stuck ones)
        print(f"[{section(job)}] ERROR: {exc}", file=sys.stderr, flush=True)
        return 4
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_rank(argv, TrainJob, Trainer, lambda job: job.section)


if __name__ == "__main__":
    sys.exit(main())
