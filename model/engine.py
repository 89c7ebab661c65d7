"""The DeepSpeed engine every training loop uses: optimizer groups, the warmup + cosine schedule,
the engine config (ZeRO, precision, clipping, accumulation), one optimizer step over micro-batches,
and the single-process setup for tests and benchmarks. model/train.py and model/ppo_train.py run on it."""
from __future__ import annotations

import math
import os
from functools import partial
from typing import Any

import torch

from lmfoundry.infra.config_train import TrainRecipe
from lmfoundry.model.objectives import lm_batch_loss, loss_chunk
from lmfoundry.model.parallel import tensor_parallel_config
from lmfoundry.model.shm import release_at_exit


def lr_at(step: int, cfg: TrainRecipe) -> float:
    """Learning rate of 0-based optimizer step `step`: linear warmup, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer, cfg: TrainRecipe) -> torch.optim.lr_scheduler.LambdaLR:
    # LambdaLR's state is just the step count, which DeepSpeed saves and restores exactly
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.lr)


def batch_split(global_batch: int, world_size: int, micro_batch: int, section: str = "pretrain") -> tuple[int, int]:
    """(micro batch per rank, accumulation steps) that make up the global batch exactly."""
    if global_batch % world_size:
        raise ValueError(f"{section}.global_batch_size {global_batch} is not divisible by {world_size} ranks")
    per_rank = global_batch // world_size
    micro = micro_batch or per_rank
    if per_rank % micro:
        raise ValueError(f"per-rank batch {per_rank} is not a multiple of {section}.distributed.micro_batch_size {micro}")
    return micro, per_rank // micro


def deepspeed_config(cfg: TrainRecipe, world_size: int, section: str = "pretrain") -> dict[str, Any]:
    dist = cfg.distributed
    micro, accumulation = batch_split(cfg.global_batch_size, world_size, dist.micro_batch_size, section)
    zero: dict[str, Any] = {"stage": dist.zero_stage}
    if dist.offload_optimizer:
        if dist.zero_stage == 0:
            raise ValueError(f"{section}.distributed.offload_optimizer needs zero_stage >= 1")
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


def build_engine(model: torch.nn.Module, cfg: TrainRecipe, world_size: int, section: str = "pretrain", mpu=None):
    """The DeepSpeed engine: AdamW (matrices decayed), warmup + cosine schedule, ZeRO, precision, clipping.

    world_size: the data-parallel ranks; distributed.tp > 1 adds AutoTP, and mpu (sequence
    parallelism's groups) goes to DeepSpeed as is (model/parallel.py)."""
    import deepspeed

    config = deepspeed_config(cfg, world_size, section)
    if cfg.distributed.tp > 1:
        config.update(tensor_parallel_config(cfg.distributed.tp))
        # DeepSpeed checks train_batch_size against the whole world before AutoTP forms its groups
        # (runtime/config.py: no mpu yet, so world_size = every rank); micro x accumulation says it all
        del config["train_batch_size"]
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.weight_decay),
        config=config,
        lr_scheduler=partial(make_scheduler, cfg=cfg),
        mpu=mpu,
    )
    return engine


def device_micro_steps(engine, batches, loss_fn, record_activations: bool = False, measure_grad_norm=None) -> dict[str, Any]:
    """One optimizer step over this rank's micro batches; loss_fn(engine, batch) -> (total, metrics).

    Returns this rank's metrics averaged over the micro batches as 0-d float64 tensors on the
    engine's device (nothing is read back to the host, so a GPU never waits for Python), numbers
    that were plain Python values ("tokens", summed) as Python numbers, and "grad_norm": DeepSpeed's
    (a tensor or float), else measure_grad_norm()'s on logging steps, else None. DeepSpeed scales
    each backward by 1 / accumulation and steps the optimizer (and schedule) on the last micro batch."""
    sums: dict[str, Any] = {}
    count, measured = 0, None
    for batch in batches:
        count += 1
        boundary = engine.is_gradient_accumulation_boundary()
        engine.module.record_activations = record_activations and boundary
        total, metrics = loss_fn(engine, batch)
        engine.backward(total)
        if boundary and record_activations and measure_grad_norm is not None:
            measured = measure_grad_norm()
        engine.step()
        for name, value in metrics.items():
            value = value.detach().to(torch.float64) if isinstance(value, torch.Tensor) else float(value)
            sums[name] = value if name not in sums else sums[name] + value
    out = {name: value if name == "tokens" else value / count for name, value in sums.items()}
    reported = engine.get_global_grad_norm()
    out["grad_norm"] = reported if reported is not None else measured
    return out


def micro_steps(engine, batches, loss_fn, record_activations: bool = False, measure_grad_norm=None) -> dict[str, float | None]:
    """device_micro_steps() with every number read back as a Python float (PPO, benchmarks): one
    host read for all of them."""
    out = device_micro_steps(engine, batches, loss_fn, record_activations, measure_grad_norm)
    names = [name for name, value in out.items() if isinstance(value, torch.Tensor)]
    if names:
        values = torch.stack([out[name].reshape(()).to(torch.float64) for name in names]).tolist()
        out.update(zip(names, values))
    return {name: _float(value) if name != "tokens" else value for name, value in out.items()}


def engine_step(engine, batches, pad_id: int | None, cfg: TrainRecipe, aux_weight: float, record_activations: bool = False, measure_grad_norm=None) -> dict[str, float | None]:
    """One pretraining step over this rank's token micro batches ([B, T + 1] each); this rank's mean losses."""
    loss_fn = partial(lm_batch_loss, pad_id=pad_id, label_smoothing=cfg.label_smoothing, aux_weight=aux_weight, chunk=loss_chunk(cfg))
    local = micro_steps(engine, batches, loss_fn, record_activations, measure_grad_norm)
    return {"loss": local["loss"], "ce": local["ce"], "aux": local["aux"], "grad_norm": local["grad_norm"]}


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
    release_at_exit()  # DeepSpeed would leave this rank's CPU allreduce buffer in /dev/shm


def _float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)
