"""Fault hooks for tests: make a stage pause, fail or die at a chosen point.

Set ``LMF_FAULT="<stage>:<event>:<n>:<action>"``, e.g. ``exact_dedup:after_file:2:sleep``
(after the stage's 2nd marked file, sleep until killed) or ``ingest:before_commit:0:fail``.
Actions: ``sleep`` (block for an hour), ``fail`` (raise), ``kill`` (SIGKILL this process).
Unset in normal use; it exists so resume and retry paths can be proven.
"""
from __future__ import annotations

import os
import signal
import time


class InjectedFault(RuntimeError):
    pass


def hit(stage: str, event: str, count: int = 0) -> None:
    spec = os.environ.get("LMF_FAULT", "")
    if not spec:
        return
    want_stage, want_event, want_count, action = spec.split(":")
    if (want_stage, want_event) != (stage, event) or int(want_count) != count:
        return
    if action == "sleep":
        time.sleep(3600)
    elif action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        raise InjectedFault(f"injected fault at {stage}:{event}:{count} (LMF_FAULT is set)")
