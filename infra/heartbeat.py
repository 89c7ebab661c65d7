"""The training heartbeat and the stage watchdog that reads it: a run whose progress stops is
stopped, rather than holding its GPUs (and the pipeline) forever.

Rank 0 of a training run (model/train.py, model/ppo_train.py) calls ``beat(work, step, phase)``
when it starts, after every optimizer step, evaluation and checkpoint; that rewrites
``<work>/heartbeat.json`` = {"step", "phase", "time"}. The stage runner (tasks/train/launch.py)
holds a ``StallWatch`` and calls ``check`` while it polls the launcher: when neither the
heartbeat nor ``metrics.jsonl`` changed for ``distributed.stall_timeout_s`` seconds it kills the
launcher's whole process group and raises naming the stage, the last step and phase seen, the
timeout and the last committed checkpoint, which is kept, so running the stage again resumes.
Until the first heartbeat of an attempt, a new output line of the launcher counts as progress
too, and the allowed silence is at least ``START_GRACE_S``: starting (imports, rendezvous, ops
DeepSpeed JIT-builds on a first launch, a first compiled step) is slow and often silent for
minutes, while a stalled step is best caught sooner.

A hung collective is caught first, inside the ranks, by ``distributed.collective_timeout_s``
(model/cluster.py); the watchdog catches everything else (a stuck data read, a dead node the
launcher does not notice, a deadlock) and a collective timeout that failed to end the ranks.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

HEARTBEAT = "heartbeat.json"
START_GRACE_S = 600.0  # the least silence allowed before the first step (a first launch compiles ops silently)
WATCHED = (HEARTBEAT, "metrics.jsonl")


def beat(work: str | Path, step: int, phase: str = "train") -> None:
    """Record progress (rank 0): atomically, so the watchdog never reads half a file."""
    path = Path(work) / HEARTBEAT
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"step": step, "phase": phase, "time": time.time()}))
    os.replace(tmp, path)


def read_beat(work: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(work) / HEARTBEAT).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


class StallWatch:
    """Stops a launched run whose heartbeat stops: ``check`` once per poll of the launcher."""

    def __init__(self, work: Path, timeout_s: float, section: str, error: type[Exception] = RuntimeError, start_grace_s: float = START_GRACE_S):
        self.work, self.timeout_s, self.section, self.error = Path(work), timeout_s, section, error
        self.start_grace_s = start_grace_s
        self.stepping = False  # a heartbeat or metrics line of this attempt has been seen
        self.started = time.time()  # a heartbeat left by an earlier attempt is older than this
        self.last_line: object = None  # the newest launcher output line seen (by identity)
        self.last_output: float | None = None  # when it appeared

    def last_progress(self, output: Sequence[str] = ()) -> float:
        """Wall-clock time of the newest sign of progress (the launch itself counts as one)."""
        times = [self.started]
        for name in WATCHED:
            try:
                times.append((self.work / name).stat().st_mtime)
            except FileNotFoundError:
                pass
        self.stepping = max(times) > self.started
        if not self.stepping:  # no step yet: the start's output lines show it is alive
            if output and output[-1] is not self.last_line:
                self.last_line, self.last_output = output[-1], time.time()
            times.append(self.last_output or self.started)
        return max(times)

    def stalled_for(self, output: Sequence[str] = ()) -> float | None:
        """Seconds without progress, once past the timeout; None while the run advances (or 0: off)."""
        if not self.timeout_s:
            return None
        quiet = time.time() - self.last_progress(output)
        limit = self.timeout_s if self.stepping else max(self.timeout_s, self.start_grace_s)
        return quiet if quiet > limit else None

    def check(self, stop: Callable[[], None], committed: list[str], output: Sequence[str] = ()) -> None:
        """Raise (after ``stop()``, which must kill every rank) when the run has stalled; ``output``:
        the launcher's recent output lines (newest last), progress until the first heartbeat."""
        quiet = self.stalled_for(output)
        if quiet is None:
            return
        stop()
        seen = read_beat(self.work) if self.stepping else {}
        where = f"step {seen['step']} ({seen.get('phase', 'train')})" if seen else "no step (it never reported one)"
        kept = f"committed checkpoint {committed[-1]} is kept: run the stage again to resume from it" if committed else "no checkpoint was committed yet"
        limit = f"{self.section}.distributed.stall_timeout_s={self.timeout_s:g}" + ("" if self.stepping else f", at least {self.start_grace_s:g}s before the first step")
        raise self.error(
            f"{self.section} training stalled: no progress for {quiet:.0f}s (> {limit}); "
            f"the last progress seen was {where}. Every rank was stopped; {kept}. If steps are legitimately this slow "
            f"(a long compile, a huge evaluation), raise {self.section}.distributed.stall_timeout_s."
        )
