"""infra/heartbeat.py without a launcher: planted heartbeat times, a stop callback that records."""
from __future__ import annotations

import os
import time

import pytest

from lmfoundry.infra.heartbeat import HEARTBEAT, StallWatch, beat, read_beat


class Stalled(RuntimeError):
    pass


def age(path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_beat_writes_step_and_phase(tmp_path):
    beat(tmp_path, 7, "eval")
    seen = read_beat(tmp_path)
    assert (seen["step"], seen["phase"]) == (7, "eval") and abs(seen["time"] - time.time()) < 5
    assert read_beat(tmp_path / "missing") == {}


def test_a_fresh_heartbeat_is_progress_and_an_old_one_stops_the_run(tmp_path):
    watch = StallWatch(tmp_path, 10, "sft", Stalled)
    watch.started -= 60  # launched a minute ago
    beat(tmp_path, 3, "train")
    stops = []
    watch.check(lambda: stops.append(1), ["step-0000002"])  # beat just now: fine
    assert stops == []
    age(tmp_path / HEARTBEAT, 30)
    with pytest.raises(Stalled) as caught:
        watch.check(lambda: stops.append(1), ["step-0000002"])
    assert stops == [1]  # every rank stopped before the error
    message = str(caught.value)
    assert "sft training stalled: no progress for 30s (> sft.distributed.stall_timeout_s=10)" in message, message
    assert "the last progress seen was step 3 (train)" in message and "committed checkpoint step-0000002 is kept" in message


def test_metrics_lines_count_as_progress(tmp_path):
    watch = StallWatch(tmp_path, 10, "pretrain", Stalled)
    watch.started -= 60
    beat(tmp_path, 1)
    age(tmp_path / HEARTBEAT, 30)
    (tmp_path / "metrics.jsonl").write_text("{}\n")  # a trainer without heartbeats still logs
    assert watch.stalled_for() is None


def test_before_the_first_beat_output_lines_count_then_silence_stops(tmp_path):
    watch = StallWatch(tmp_path, 10, "pretrain", Stalled, start_grace_s=20)
    watch.started -= 60
    tail = ["starting"]
    assert watch.stalled_for(tail) is None  # a new line: alive
    watch.last_output = time.time() - 30  # that line was 30 s ago and nothing new came
    quiet = watch.stalled_for(tail)
    assert quiet is not None and quiet > 25
    tail.append("engine built")
    assert watch.stalled_for(tail) is None
    with pytest.raises(Stalled, match="at least 20s before the first step.*no step \\(it never reported one\\).*no checkpoint was committed yet"):
        watch.last_output = time.time() - 30
        watch.check(lambda: None, [], tail)


def test_a_heartbeat_of_an_earlier_attempt_is_not_progress_and_zero_is_off(tmp_path):
    beat(tmp_path, 9)
    age(tmp_path / HEARTBEAT, 300)
    watch = StallWatch(tmp_path, 10, "pretrain", Stalled, start_grace_s=30)
    watch.started -= 60
    assert watch.stalled_for() is not None  # older than the launch: not this attempt's progress
    assert StallWatch(tmp_path, 10, "pretrain").stalled_for() is None  # a fresh start has its grace
    assert StallWatch(tmp_path, 0, "pretrain").stalled_for() is None


def test_the_start_gets_its_grace_then_steps_the_timeout(tmp_path):
    watch = StallWatch(tmp_path, 10, "pretrain", Stalled, start_grace_s=120)
    watch.started -= 60  # a minute of silent start (imports, a JIT build): within the grace
    assert watch.stalled_for() is None
    beat(tmp_path, 1)
    age(tmp_path / HEARTBEAT, 30)  # but once stepping, 30 s without a step is a stall
    assert watch.stalled_for() is not None
