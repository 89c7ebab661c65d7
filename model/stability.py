"""Training stability monitor: a loss or gradient-norm spike caught while the values are still finite.

A NaN/inf is caught by the run loop itself (model/train.py); this catches the slower failure where a
too-high learning rate makes the loss climb and the gradient norm explode with finite numbers. Each
watched metric is compared with the mean + k standard deviations of its last `window` values::

    monitor = StabilityMonitor(window=50, sigmas=8.0, warmup_steps=20, min_history=10, min_ratio=3.0)
    spike = monitor.observe(step, {"loss": 3.2, "grad_norm": 0.8})   # None, or a Spike
    client_state["stability"] = monitor.state_dict()                  # saved with each checkpoint

A value that spikes does not enter the history (the reference stays the healthy run); steps up to
`warmup_steps` are ignored entirely (early training is steep and noisy by nature), and a metric
needs `min_history` values before it can spike. `min_ratio` additionally requires the value to be
that many times the mean, so a very flat history (tiny sigma) does not make routine noise a spike.
Pure Python: no torch, no distributed state; every rank feeds it the same all-reduced numbers.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

WATCHED = ("loss", "grad_norm")


@dataclass(frozen=True)
class Spike:
    step: int
    metric: str
    value: float
    threshold: float
    mean: float
    std: float

    def describe(self) -> str:
        return (
            f"{self.metric} {self.value:.6g} at step {self.step} is above its threshold {self.threshold:.6g} "
            f"(rolling mean {self.mean:.6g} + std {self.std:.6g})"
        )


def mean_std(values) -> tuple[float, float]:
    """Mean and population standard deviation of a non-empty sequence."""
    n = len(values)
    mean = math.fsum(values) / n
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / n)


class StabilityMonitor:
    def __init__(self, window: int = 50, sigmas: float = 8.0, warmup_steps: int = 20, min_history: int = 10, min_ratio: float = 3.0, metrics: tuple[str, ...] = WATCHED):
        if window < 2 or min_history < 2 or min_history > window:
            raise ValueError(f"stability: need 2 <= min_history ({min_history}) <= window ({window})")
        self.window, self.sigmas, self.warmup_steps, self.min_history, self.min_ratio = window, sigmas, warmup_steps, min_history, min_ratio
        self.history: dict[str, deque[float]] = {name: deque(maxlen=window) for name in metrics}

    def threshold(self, metric: str) -> tuple[float, float, float] | None:
        """(threshold, mean, std) of a metric, or None while its history is too short."""
        values = self.history[metric]
        if len(values) < self.min_history:
            return None
        mean, std = mean_std(values)
        return max(mean + self.sigmas * std, mean * self.min_ratio), mean, std

    def observe(self, step: int, metrics: dict[str, Any]) -> Spike | None:
        """Check this step's values (missing or non-finite ones are skipped); the first spike or None.

        Values are added to the history only when no watched metric spiked at this step."""
        if step <= self.warmup_steps:
            return None
        seen: dict[str, float] = {}
        for name in self.history:
            value = metrics.get(name)
            if value is None or not math.isfinite(value):
                continue
            limit = self.threshold(name)
            if limit is not None and value > limit[0]:
                return Spike(step, name, float(value), *limit)
            seen[name] = float(value)
        for name, value in seen.items():
            self.history[name].append(value)
        return None

    def state_dict(self) -> dict[str, list[float]]:
        return {name: list(values) for name, values in self.history.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        for name in self.history:
            self.history[name] = deque(state.get(name, []), maxlen=self.window)
