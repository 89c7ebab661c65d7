"""Pretraining entry point: one DeepSpeed rank per process.

Normally started by the `pretrain` stage (tasks/train/pretrain.py), which writes the job file and
uploads what this script leaves in the work directory. By hand, with a job file::

    deepspeed --num_gpus 2 --master_port 29512 model/train.py --job job.json         # 2 local ranks
    torchrun --standalone --nproc_per_node 2 model/train.py --job job.json           # the same
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 model/train.py --job job.json           # on CPUs (gloo)

The job file is a ``TrainJob`` (below): model and pretrain config sections, where the token
shards are, a local work directory and an optional checkpoint to resume from.

Work directory, written by rank 0 (other ranks only add their checkpoint shards)::

    metrics.jsonl                      one JSON object per logged step and per validation
    checkpoints/step-0000050/          DeepSpeed engine state + rng_rankNNNNN.pt per rank
    checkpoints/step-0000050/COMPLETE.json   written last: the checkpoint is whole
    final/model.safetensors, final/model_config.json   fp32 weights at the end
    DONE.json                          summary, written last

Every step all ranks agree on the loss (one small all-reduce), so a NaN/inf stops every rank
with the same clear error and the last complete checkpoint stays the one to resume from.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from lmfoundry.infra import faults
from lmfoundry.infra.config import ModelConfig, PretrainConfig
from lmfoundry.infra.store import StageRef, Store
from lmfoundry.model.losses import IGNORE_INDEX, lm_loss, split_batch
from lmfoundry.model.transformer import Transformer, resolve, save_model

COMPLETE = "COMPLETE.json"
DONE = "DONE.json"
METRICS = "metrics.jsonl"


class TrainJob(BaseModel):
    model: ModelConfig
    pretrain: PretrainConfig
    store_url: str
    storage_options: dict[str, Any] = {}
    tokens: StageRef
    work_dir: str
    resume_tag: str | None = None  # a checkpoint under work_dir/checkpoints to continue from


class DivergenceError(RuntimeError):
    pass


# ---------------------------------------------------------------------- pure pieces


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Learning rate of 0-based optimizer step `step`: linear warmup, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer, cfg: PretrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    # LambdaLR's state is just the step count, which DeepSpeed saves and restores exactly
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.lr)


def batch_split(global_batch: int, world_size: int, micro_batch: int) -> tuple[int, int]:
    """(micro batch per rank, accumulation steps) that make up the global batch exactly."""
    if global_batch % world_size:
        raise ValueError(f"pretrain.global_batch_size {global_batch} is not divisible by {world_size} ranks")
    per_rank = global_batch // world_size
    micro = micro_batch or per_rank
    if per_rank % micro:
        raise ValueError(f"per-rank batch {per_rank} is not a multiple of pretrain.distributed.micro_batch_size {micro}")
    return micro, per_rank // micro


def deepspeed_config(cfg: PretrainConfig, world_size: int) -> dict[str, Any]:
    dist = cfg.distributed
    micro, accumulation = batch_split(cfg.global_batch_size, world_size, dist.micro_batch_size)
    zero: dict[str, Any] = {"stage": dist.zero_stage}
    if dist.offload_optimizer:
        if dist.zero_stage == 0:
            raise ValueError("pretrain.distributed.offload_optimizer needs zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu"}
    if dist.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {
            "type": "AdamW",
            # torch_adam: the fused Adam op would be JIT-compiled (~40 s) on first use
            "params": {"lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.adam_eps, "weight_decay": cfg.weight_decay, "torch_adam": not dist.offload_optimizer},
        },
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Matrices decay, vectors (norm gains) do not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    plain = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_engine(model: Transformer, cfg: PretrainConfig, world_size: int):
    """The DeepSpeed engine: AdamW (matrices decayed), warmup + cosine schedule, ZeRO, precision, clipping."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.weight_decay),
        config=deepspeed_config(cfg, world_size),
        lr_scheduler=partial(make_scheduler, cfg=cfg),
    )
    return engine


def engine_step(engine, batches, pad_id: int | None, cfg: PretrainConfig, aux_weight: float, record_activations: bool = False, measure_grad_norm=None) -> dict[str, float | None]:
    """One optimizer step over this rank's micro batches ([B, T + 1] each); this rank's mean losses.

    DeepSpeed scales each backward by 1 / accumulation and steps the optimizer (and the
    schedule) on the last micro batch only."""
    device = engine.device
    sums, count, measured = [0.0, 0.0, 0.0], 0, None  # objective, ce, aux
    for batch in batches:
        count += 1
        boundary = engine.is_gradient_accumulation_boundary()
        engine.module.record_activations = record_activations and boundary
        inputs, targets = split_batch(batch.to(device), pad_id)
        logits, aux = engine(inputs)
        loss = lm_loss(logits, targets, cfg.label_smoothing, aux, aux_weight)
        engine.backward(loss.total)
        if boundary and record_activations and measure_grad_norm is not None:
            measured = measure_grad_norm()
        engine.step()
        sums = [s + v.item() for s, v in zip(sums, (loss.total.detach(), loss.ce, loss.aux))]
    reported = _float(engine.get_global_grad_norm())
    objective, ce, aux = (s / count for s in sums)
    return {"loss": objective, "ce": ce, "aux": aux, "grad_norm": reported if reported is not None else measured}


def init_single_process(backend: str = "gloo") -> None:
    """A world of one rank in this process (benchmarks, notebooks): what a launcher would set up."""
    import deepspeed

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    deepspeed.init_distributed(dist_backend=backend)


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


def unigram_log_probs(blocks: list[np.ndarray], vocab_size: int, pad_id: int | None, max_tokens: int = 50_000_000) -> torch.Tensor:
    """log p(token) from training-token frequencies (add-one smoothed): the context-free baseline."""
    counts = np.ones(vocab_size, dtype=np.float64)
    seen = 0
    for block in blocks:
        if seen >= max_tokens:
            break
        flat = np.asarray(block).ravel()[: max_tokens - seen]
        counts += np.bincount(flat, minlength=vocab_size)[:vocab_size]
        seen += flat.size
    if pad_id is not None and pad_id < vocab_size:
        counts[pad_id] = 1.0
    return torch.from_numpy(np.log(counts / counts.sum()))


def keep_metrics_until(path: Path, step: int) -> None:
    """On resume, drop metric lines written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


# ---------------------------------------------------------------------- the run


class Trainer:
    def __init__(self, job: TrainJob):
        import deepspeed
        import torch.distributed as dist

        self.job, self.cfg, self.dist = job, job.pretrain, dist
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        deepspeed.init_distributed(dist_backend=self.cfg.distributed.backend)
        self.world = dist.get_world_size()
        if self.cfg.distributed.accelerator == "cuda":
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.work = Path(job.work_dir)
        self.checkpoints = self.work / "checkpoints"
        if self.rank == 0:
            self.checkpoints.mkdir(parents=True, exist_ok=True)

        from lmfoundry.model.loader import TokenLoader

        store = Store(job.store_url, job.storage_options)
        self.micro, self.accumulation = batch_split(self.cfg.global_batch_size, self.world, self.cfg.distributed.micro_batch_size)
        self.loader = TokenLoader.from_stage(store, job.tokens, "train", batch_size=self.micro, seed=self.cfg.seed, rank=self.rank, world_size=self.world)
        self.val = TokenLoader.from_stage(store, job.tokens, "val", batch_size=self.micro, rank=self.rank, world_size=self.world, shuffle=False)
        self.pad_id = self.loader.pad_id
        self.seq_len = self.loader.seq_len

        torch.manual_seed(self.cfg.seed)  # the same initial weights on every rank
        self.model_cfg = resolve(job.model, self.loader.index["vocab_size"])
        model = Transformer(self.model_cfg)
        model.activation_checkpointing = self.cfg.distributed.activation_checkpointing
        self.flops_per_token = model.flops_per_token(self.seq_len)
        self.unigram = unigram_log_probs(self.loader.blocks, self.model_cfg.vocab_size, self.pad_id).to(self.device)
        self.n_params = model.num_parameters()
        self.engine = build_engine(model, self.cfg, self.world)
        self.step = 0
        if job.resume_tag:
            self.resume(job.resume_tag)
        self.metrics_path = self.work / METRICS
        if self.rank == 0:
            keep_metrics_until(self.metrics_path, self.step)

    # ------------------------------------------------------------------ checkpoints
    def resume(self, tag: str) -> None:
        marker = json.loads((self.checkpoints / tag / COMPLETE).read_text())
        if (marker["world_size"], marker["zero_stage"]) != (self.world, self.cfg.distributed.zero_stage):
            raise RuntimeError(
                f"checkpoint {tag} was written by {marker['world_size']} ranks with ZeRO stage {marker['zero_stage']}; "
                f"this run has {self.world} ranks and stage {self.cfg.distributed.zero_stage}. "
                "Resume with the same pretrain.distributed.procs and zero_stage, or change the config to start afresh."
            )
        path, client = self.engine.load_checkpoint(str(self.checkpoints), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {tag} under {self.checkpoints}")
        self.step = int(client["step"])
        self.loader.load_state_dict(client["loader"])
        set_rng_state(torch.load(self.checkpoints / tag / f"rng_rank{self.rank:05d}.pt", weights_only=False))
        self.log(f"resumed from {tag} at step {self.step} (sample {client['loader']['sample']})")

    def save(self, loss: float) -> None:
        tag = step_tag(self.step)
        client = {"step": self.step, "loader": self.loader.state_dict()}
        self.engine.save_checkpoint(str(self.checkpoints), tag=tag, client_state=client)
        torch.save(rng_state(), self.checkpoints / tag / f"rng_rank{self.rank:05d}.pt")
        self.dist.barrier()
        if self.rank == 0:
            marker = {"step": self.step, "loss": loss, "world_size": self.world, "zero_stage": self.cfg.distributed.zero_stage, "sample": client["loader"]["sample"]}
            write_json_atomic(self.checkpoints / tag / COMPLETE, marker)
            self.log(f"checkpoint {tag} saved")
            faults.hit("pretrain", "after_checkpoint", self.step)

    # ------------------------------------------------------------------ metrics
    def log(self, text: str) -> None:
        if self.rank == 0:
            print(f"[pretrain] {text}", flush=True)

    def write_metrics(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def all_mean(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(tensor)
        return (tensor / self.world).tolist()

    # ------------------------------------------------------------------ steps
    def train_step(self, record_activations: bool) -> dict[str, float | None]:
        batches = (next(self.loader) for _ in range(self.accumulation))
        local = engine_step(self.engine, batches, self.pad_id, self.cfg, self.job.model.moe_aux_weight, record_activations, self.plain_grad_norm)
        objective, ce, aux = self.all_mean([local["loss"], local["ce"], local["aux"]])
        grad_norm = local["grad_norm"]
        # every rank sees the same averaged loss and global norm, so all of them stop together;
        # with fp16 an inf gradient norm is routine (the loss scaler skips that step)
        bad_norm = grad_norm is not None and not math.isfinite(grad_norm) and self.cfg.precision != "fp16"
        if not (math.isfinite(objective) and math.isfinite(ce)) or bad_norm:
            what = f"loss became {objective}" if not math.isfinite(objective) else f"gradient norm became {grad_norm}"
            raise DivergenceError(
                f"{what} at step {self.step + 1}: training diverged. The last good checkpoint is kept; "
                "lower pretrain.lr, raise warmup_steps or use fp32/bf16 instead of fp16, then run again."
            )
        return {"loss": objective, "ce": ce, "aux": aux, "grad_norm": grad_norm}

    def plain_grad_norm(self) -> float | None:
        """DeepSpeed reports the norm only when an optimizer wrapper (ZeRO, bf16/fp16) computes it;
        plain ZeRO-0 fp32 grads are whole and already averaged over ranks here, so measure them."""
        if self.cfg.distributed.zero_stage or self.cfg.precision != "fp32":
            return None
        norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else None

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted cross-entropy over up to eval_samples validation samples."""
        self.engine.eval()
        total = torch.zeros(3, dtype=torch.float64, device=self.device)  # summed CE, tokens, summed unigram CE
        seen = 0
        for batch in self.val.eval_batches():
            if seen >= self.cfg.eval_samples:
                break  # every rank stops at the same batch: `seen` counts global samples
            seen += self.val.global_batch
            inputs, targets = split_batch(batch.to(self.device), self.pad_id)
            logits, _ = self.engine(inputs)  # runs even on an empty batch: ZeRO-3 gathers need every rank
            if targets.numel():
                flat = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
                )
                scored = targets[targets != IGNORE_INDEX]
                total += torch.stack([flat.double(), torch.tensor(float(scored.numel()), dtype=torch.float64, device=self.device), -self.unigram[scored].sum()])
        self.dist.all_reduce(total)
        self.engine.train()
        val_loss = (total[0] / total[1].clamp(min=1)).item()
        unigram_loss = (total[2] / total[1].clamp(min=1)).item()
        return {
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)),
            "unigram_loss": unigram_loss,
            "unigram_ppl": math.exp(min(unigram_loss, 50.0)),
            "val_tokens": int(total[1].item()),
        }

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.log(
            f"{self.n_params / 1e6:.2f}M parameters, {self.flops_per_token / 1e6:.1f} MFLOP/token, {self.world} rank(s), "
            f"batch {cfg.global_batch_size} = {self.world} x {self.micro} x {self.accumulation} accumulation, seq_len {self.seq_len}, "
            f"train {self.loader.num_samples} samples, val {self.val.num_samples}"
        )
        tokens_per_step = cfg.global_batch_size * self.seq_len
        interval_start, interval_steps = time.perf_counter(), 0
        run_start = time.perf_counter()
        last: dict[str, float] = {}
        last_saved = self.step
        while self.step < cfg.steps:
            log_now = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.steps
            lr = lr_at(self.step, cfg)
            last = self.train_step(record_activations=log_now)
            self.step += 1
            interval_steps += 1
            if log_now:
                elapsed = time.perf_counter() - interval_start
                tokens_per_s = interval_steps * tokens_per_step / elapsed
                record = {
                    "kind": "train",
                    "step": self.step,
                    **last,
                    "lr": lr,
                    "tokens": self.step * tokens_per_step,
                    "tokens_per_s": tokens_per_s,
                    "mfu": self.flops_per_token * tokens_per_s / (cfg.distributed.peak_tflops * 1e12 * self.world),
                    "activations": [{"mean": m.item(), "std": s.item()} for m, s in self.engine.module.activation_stats],
                }
                if self.model_cfg.moe_experts:
                    record["expert_load"] = self.engine.module.expert_load()
                self.write_metrics(record)
                self.log(
                    f"step {self.step}/{cfg.steps} loss {last['loss']:.4f} lr {lr:.2e} grad_norm {record['grad_norm'] or 0:.3f} "
                    f"tokens/s {tokens_per_s:,.0f} mfu {record['mfu']:.2%}"
                )
                interval_start, interval_steps = time.perf_counter(), 0
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                val = self.evaluate()
                self.write_metrics({"kind": "val", "step": self.step, **val})
                self.log(f"step {self.step} val_loss {val['val_loss']:.4f} val_ppl {val['val_ppl']:.2f}")
                interval_start = time.perf_counter()  # validation time is not training throughput
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save(last["loss"])
                last_saved = self.step
                interval_start = time.perf_counter()
        if last_saved != self.step:  # resumed at the final step: nothing left to train
            self.save(last.get("loss", float("nan")))
        return self.finish(time.perf_counter() - run_start)

    def finish(self, seconds: float) -> dict[str, Any]:
        """fp32 weights of the final step in our format, and a summary; rank 0 only writes.

        With ZeRO >= 1 they come from the optimizer's fp32 master copy in the checkpoint; with
        ZeRO-0 from the module itself (so bf16/fp16 training exports its rounded weights)."""
        tag = step_tag(self.step)
        if self.cfg.distributed.zero_stage == 0:
            state = self.engine.module.state_dict() if self.rank == 0 else None
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(self.checkpoints), tag=tag) if self.rank == 0 else None
        summary: dict[str, Any] = {}
        if self.rank == 0:
            save_model({k: v.float() for k, v in state.items()}, self.model_cfg, self.work / "final")
            summary = {
                "steps": self.step,
                "seconds": seconds,
                "parameters": self.n_params,
                "flops_per_token": self.flops_per_token,
                "seq_len": self.seq_len,
                "world_size": self.world,
                "vocab_size": self.model_cfg.vocab_size,
            }
            write_json_atomic(self.work / DONE, summary)
            self.log(f"done: {self.step} steps in {seconds:.1f}s")
        self.dist.barrier()
        return summary


def _float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="DeepSpeed pretraining rank (see module docstring)")
    parser.add_argument("--job", required=True, help="TrainJob JSON file")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    job = TrainJob.model_validate_json(Path(args.job).read_text())
    rank = int(os.environ.get("RANK", "0"))
    # DeepSpeed logs its whole config at INFO on every rank; rank 0's own lines are enough
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    try:
        Trainer(job).run()
    except DivergenceError as exc:
        if rank == 0:
            print(f"[pretrain] ERROR: {exc}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
