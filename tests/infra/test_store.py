"""The stage store on a local directory and on a real S3 API server (moto) over loopback."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pyarrow as pa
import pytest

from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.faults import InjectedFault
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.infra.store import StageDir, StageRef, StoreError, stage_version

COUNT = {"calls": 0}


def run_numbers(cfg, inputs: list[StageRef], out: StageDir, compute=None) -> dict:
    """A tiny stage: three shards of numbers, skipping shards already done (resume)."""
    COUNT["calls"] += 1
    written = 0
    for i in range(3):
        name = f"data/part-{i:05d}.parquet"
        if out.done(name):
            continue
        out.write_table(name, pa.table({"n": list(range(i * 10, i * 10 + 10))}))
        written += 1
    return {"written_now": written}


CODE_VERSION = "1"
SPEC = StageSpec("numbers", f"{__name__}:run_numbers", section="exact_dedup")


@pytest.fixture(params=["local", "s3"])
def any_store(request):
    return request.getfixturevalue("store" if request.param == "local" else "s3_store")


def test_commit_then_reuse(any_store):
    first = run_stage(any_store, SPEC, PipelineConfig(), [])
    second = run_stage(any_store, SPEC, PipelineConfig(), [])
    assert (first.status, second.status) == ("ran", "skipped")
    assert first.ref == second.ref
    manifest = any_store.manifest("numbers", first.ref.version)
    assert manifest["rows"] == 30
    assert sorted(manifest["files"]) == [f"data/part-{i:05d}.parquet" for i in range(3)]
    reader = any_store.reader(first.ref)
    assert reader.read_table("data/part-00002.parquet").column("n").to_pylist()[0] == 20
    assert any_store.get_ref("demo", "numbers") == first.ref.version
    assert len(any_store.ref_history("demo", "numbers")) == 2


def test_identity_change_gives_new_version_execution_change_does_not(any_store):
    base = run_stage(any_store, SPEC, PipelineConfig(), []).ref
    knob = PipelineConfig.model_validate({"compute": {"workers": 1}})
    assert run_stage(any_store, SPEC, knob, []).status == "skipped"
    changed = PipelineConfig.model_validate({"exact_dedup": {"normalize": "none"}})
    assert run_stage(any_store, SPEC, changed, []).ref.version != base.version


def test_crash_before_commit_leaves_nothing_committed_and_resumes(any_store, monkeypatch):
    monkeypatch.setenv("LMF_FAULT", "numbers:after_file:1:fail")
    with pytest.raises(InjectedFault):
        run_stage(any_store, SPEC, PipelineConfig(), [])
    version = SPEC.version(PipelineConfig(), [])
    assert not any_store.is_committed("numbers", version)
    with pytest.raises(StoreError, match="not committed"):
        any_store.reader(StageRef(stage="numbers", version=version, store_url=any_store.url, digest=""))
    monkeypatch.delenv("LMF_FAULT")
    outcome = run_stage(any_store, SPEC, PipelineConfig(), [])
    # the first shard was complete and marked before the crash: only the rest is redone
    assert outcome.stats == {"written_now": 2}
    assert any_store.manifest("numbers", version)["resumed_files"] == 1


def test_committed_version_is_never_written_again(any_store):
    ref = run_stage(any_store, SPEC, PipelineConfig(), []).ref
    with pytest.raises(StoreError, match="never be written again"):
        any_store.open_for_write("numbers", ref.version)


class LeaseWaits(logging.Handler):
    """Counts the store's "is being written by ...; waiting" messages (one per waiting writer)
    and sets `both` once `expected` writers are waiting."""

    def __init__(self, expected: int):
        super().__init__(logging.INFO)
        self.expected, self.count, self.both = expected, 0, threading.Event()
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().endswith("; waiting"):
            with self._lock:
                self.count += 1
                if self.count >= self.expected:
                    self.both.set()


def test_two_concurrent_writers_one_computes_the_other_reuses(any_store):
    COUNT["calls"] = 0
    outcomes = []

    def worker():
        outcomes.append(run_stage(any_store, SPEC, PipelineConfig(), []))

    store_log = logging.getLogger("lmfoundry.store")
    waits, level = LeaseWaits(expected=2), store_log.level
    store_log.setLevel(logging.INFO)  # setLevel, not the attribute: it also resets the enabled cache
    store_log.addHandler(waits)
    try:
        # hold the lease so both writers must queue behind it; release once both are waiting
        version = SPEC.version(PipelineConfig(), [])
        with any_store.lease("numbers", version):
            threads = [threading.Thread(target=worker) for _ in range(2)]
            for t in threads:
                t.start()
            assert waits.both.wait(timeout=60), f"only {waits.count} of 2 writers reached the lease"
            assert outcomes == [] and COUNT["calls"] == 0  # both are held at the lease
    finally:
        store_log.removeHandler(waits)
        store_log.setLevel(level)
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert sorted(o.status for o in outcomes) == ["ran", "skipped"]
    assert COUNT["calls"] == 1
    assert outcomes[0].ref == outcomes[1].ref


def test_abandoned_lease_of_dead_process_is_taken_over(store):
    version = SPEC.version(PipelineConfig(), [])
    path = store.version_path("numbers", version) + "/_lease.json"
    dead = {"owner": "gone", "host": socket.gethostname(), "pid": 999_999_999, "expires_at": time.time() + 3600}
    store.write_bytes_atomic(path, json.dumps(dead).encode())
    assert run_stage(store, SPEC, PipelineConfig(), []).status == "ran"


def test_version_hash_depends_on_every_identity_part():
    base = stage_version("s", "1", {"a": 1}, ["d1"])
    assert base == stage_version("s", "1", {"a": 1}, ["d1"])
    assert len({base, stage_version("t", "1", {"a": 1}, ["d1"]), stage_version("s", "2", {"a": 1}, ["d1"]),
                stage_version("s", "1", {"a": 2}, ["d1"]), stage_version("s", "1", {"a": 1}, ["d2"]),
                stage_version("s", "1", {"a": 1}, ["d1"], salt="x")}) == 6
