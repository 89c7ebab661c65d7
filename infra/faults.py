"""Fault hooks for tests: make a stage pause, fail or die at a chosen point.

Set ``LMF_FAULT="<stage>:<event>:<n>:<action>"``, e.g. ``exact_dedup:after_file:2:sleep``
(after the stage's 2nd marked file, sleep until killed) or ``ingest:before_commit:0:fail``.
Actions: ``sleep`` (block for an hour), ``fail`` (raise), ``kill`` (SIGKILL this process).

An optional fifth field arms the fault with a file: ``exact_dedup:after_file:1:fail:/tmp/arm``
fires only while ``/tmp/arm`` exists and removes it when it fires, so exactly one attempt
fails. A long-lived process (``lmf serve`` in the browser test) keeps the variable set and
the test decides, by creating the file, which run fails; the retry then succeeds.

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
    want_stage, want_event, want_count, action, *armed_by = spec.split(":", 4)
    if (want_stage, want_event) != (stage, event) or int(want_count) != count:
        return
    if armed_by and not _disarm(armed_by[0]):
        return
    if action == "sleep":
        time.sleep(3600)
    elif action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        raise InjectedFault(f"injected fault at {stage}:{event}:{count} (LMF_FAULT is set)")


def _disarm(path: str) -> bool:
    """Remove the arming file; True only for the one caller that removed it."""
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    return True
