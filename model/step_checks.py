"""Step metrics that stay on the device until a check step reads them all at once.

A GPU runs ahead of Python only while Python never waits for it: every ``.item()`` in the step
would stall the host until the queued kernels finish. So the run loop (model/train.py) packs each
step's all-reduced metrics into one float64 device vector, queues it, and reads the queue with
one ``.tolist()`` on check steps: every ``divergence_check_every`` steps and before every log
line, validation pass and checkpoint::

    queue = StepQueue(names=("loss", "ce", "aux"), world=8)
    queue.push(step, queue.pack(local, device, save_due=False), loader.state_dict(), lr)  # no host read
    for step in queue.read(precision, section):      # one host read; raises DivergenceError on NaN/inf
        spike = monitor.observe(step.number, step.metrics)

A NaN/inf is therefore caught at most ``divergence_check_every`` steps late, and never after a
checkpoint was written: a checkpoint step is always a check step, so the last checkpoint on disk
is always one taken before the bad step. Each queued step keeps its loader position, so a spike
found late still rolls back to exactly the batches after the spiking step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

EXTRA = ("tokens", "grad_norm", "has_grad_norm", "save_due")  # packed after the objective's metrics


class DivergenceError(RuntimeError):
    pass


def check_every(configured: int, accelerator: str) -> int:
    """Steps between host reads of the queued metrics: the configured number, or when 0 the default
    (10 on cuda, where each read stalls the GPU queue; 1 on cpu, where it costs nothing)."""
    if configured:
        return configured
    return 10 if accelerator == "cuda" else 1


def device_scalar(value: Any, device: torch.device) -> torch.Tensor:
    """A 0-d float64 tensor on `device` without a host read: tensors are converted on the device, Python
    numbers are written by a fill kernel (torch.full), not copied from host memory (a synchronous copy)."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).to(device=device, dtype=torch.float64)
    return torch.full((), float(value), dtype=torch.float64, device=device)


@dataclass
class QueuedStep:
    number: int  # the step it completes (1-based, like Trainer.step after it)
    values: torch.Tensor  # [len(names) + len(EXTRA)] float64 on the device, already averaged over ranks
    loader_state: dict[str, Any]  # the loader position after this step (where a rollback skips to)
    lr: float
    metrics: dict[str, Any] = field(default_factory=dict)  # filled by StepQueue.read
    save_due: bool = False  # some rank's checkpoint_every_s clock had run out (the same on every rank)


class StepQueue:
    def __init__(self, names: tuple[str, ...], world: int):
        self.names, self.world = names, world
        self.pending: list[QueuedStep] = []

    def pack(self, local: dict[str, Any], device: torch.device, save_due: bool) -> list[torch.Tensor]:
        """This rank's step values (device_micro_steps' output) as device scalars, in the packed order."""
        grad_norm = local.get("grad_norm")
        extra = [local["tokens"], 0.0 if grad_norm is None else grad_norm, float(grad_norm is not None), float(save_due)]
        return [device_scalar(local[name], device) for name in self.names] + [device_scalar(v, device) for v in extra]

    def push(self, number: int, values: torch.Tensor, loader_state: dict[str, Any], lr: float) -> None:
        self.pending.append(QueuedStep(number, values, loader_state, lr))

    def __len__(self) -> int:
        return len(self.pending)

    def clear(self) -> None:
        self.pending = []

    def read(self, precision: str, section: str) -> list[QueuedStep]:
        """Every queued step with its metrics as Python numbers (one host read for all), oldest first;
        the queue is emptied. Raises DivergenceError at the first step with a non-finite metric."""
        steps, self.pending = self.pending, []
        if not steps:
            return []
        rows = torch.stack([s.values for s in steps]).tolist()
        n = len(self.names)
        for step, row in zip(steps, rows):
            tokens, grad_norm, has_norm, due = row[n:]
            step.metrics = {**dict(zip(self.names, row[:n])), "grad_norm": grad_norm if has_norm > 0 else None, "tokens": round(tokens * self.world)}
            step.save_due = due > 0
            check_finite(step.number, step.metrics, precision, section)
        return steps


def check_finite(number: int, metrics: dict[str, Any], precision: str, section: str) -> None:
    """Every rank reads the same all-reduced values, so all of them stop together. With fp16 an
    inf gradient norm is routine (the loss scaler skips that step)."""
    grad_norm = metrics.get("grad_norm")
    bad_norm = grad_norm is not None and not math.isfinite(grad_norm) and precision != "fp16"
    values = [v for k, v in metrics.items() if k not in ("grad_norm", "tokens")]
    if all(math.isfinite(v) for v in values) and not bad_norm:
        return
    loss = metrics.get("loss", float("nan"))
    what = f"loss became {loss}" if not math.isfinite(loss) else (f"gradient norm became {grad_norm}" if bad_norm else f"a metric became non-finite {metrics}")
    raise DivergenceError(
        f"{what} at step {number}: training diverged. The last good checkpoint is kept; "
        f"lower {section}.lr, raise warmup_steps or use fp32/bf16 instead of fp16, then run again."
    )


def activation_summary(stats: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, float]]:
    """Per-layer (mean, std) device scalars of a logging step -> [{"mean", "std"}], in one host read."""
    if not stats:
        return []
    values = torch.stack([torch.stack([m.float(), s.float()]) for m, s in stats]).tolist()
    return [{"mean": m, "std": s} for m, s in values]
