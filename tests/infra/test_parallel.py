"""infra/parallel.py: the default task runner (forked worker processes) runs shards in other
processes, in input order, with the caller's environment and working directory, passes shard
errors on, and recovers when a worker dies.

    .venv/bin/pytest -q tests/infra/test_parallel.py
"""
from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path
from concurrent.futures.process import BrokenProcessPool

import pytest

from lmfoundry.infra.config import ComputeConfig
from lmfoundry.infra.files import InputError
from lmfoundry.infra.parallel import map_shards

PROCESSES = ComputeConfig(workers=2, task_runner="processes", progress=False)


def where(item: int, meeting: str | None = None) -> tuple[int, int]:
    """(item squared, this pid); with `meeting`, the first shards wait there until two processes
    have arrived, so two workers certainly run shards (whatever the machine's load)."""
    if meeting:
        Path(meeting, str(os.getpid())).touch()
        deadline = time.monotonic() + 60
        while len(os.listdir(meeting)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    return item * item, os.getpid()


def caller_context(_: int) -> tuple[str | None, str]:
    return os.environ.get("LMF_PARALLEL_TEST"), os.getcwd()


def fail_on_three(item: int) -> int:
    if item == 3:
        raise InputError(f"shard {item}: bad input")
    return item


def die_on_one(item: int) -> int:
    if item == 1:
        os._exit(3)
    return item


def test_the_default_runner_is_worker_processes():
    assert ComputeConfig().task_runner == "processes"


def test_processes_run_shards_in_two_other_processes_in_input_order(tmp_path):
    results = map_shards(partial(where, meeting=str(tmp_path)), range(6), PROCESSES)
    assert [r for r, _ in results] == [i * i for i in range(6)]
    pids = {pid for _, pid in results}
    assert len(pids) == 2 and os.getpid() not in pids


def test_workers_see_the_callers_environment_and_directory(tmp_path, monkeypatch):
    map_shards(where, range(2), PROCESSES)
    monkeypatch.setenv("LMF_PARALLEL_TEST", "set-later")
    monkeypatch.chdir(tmp_path)
    assert map_shards(caller_context, range(4), PROCESSES) == [("set-later", str(tmp_path))] * 4
    monkeypatch.delenv("LMF_PARALLEL_TEST")
    assert {env for env, _ in map_shards(caller_context, range(4), PROCESSES)} == {None}


def test_a_shard_error_reaches_the_caller_with_its_message():
    with pytest.raises(InputError, match="shard 3: bad input"):
        map_shards(fail_on_three, range(5), PROCESSES)


def test_a_dead_worker_fails_the_map_and_the_next_map_gets_a_new_pool():
    with pytest.raises(BrokenProcessPool):
        map_shards(die_on_one, range(4), PROCESSES)
    assert map_shards(fail_on_three, [0, 1, 2], PROCESSES) == [0, 1, 2]


def test_threads_and_one_worker_stay_in_this_process():
    threads = ComputeConfig(workers=2, task_runner="threads")
    assert {pid for _, pid in map_shards(where, range(4), threads)} == {os.getpid()}
    assert {pid for _, pid in map_shards(where, range(3), ComputeConfig(workers=1))} == {os.getpid()}
