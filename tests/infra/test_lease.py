"""One writer at a time (issue 16 item 3): a holder that is paused past its lease while another
writer takes over must neither renew nor release the taker's lease, nor write another file.

The holder is a real process stopped with SIGSTOP; the taker runs in this process. Both on a
local directory and on a real S3 API (moto on loopback; conditional writes with If-Match).

    .venv/bin/pytest -q tests/infra/test_lease.py
"""
from __future__ import annotations

import json
import os
import posixpath
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.lease import LeaseLost
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.infra.store import StageDir, StageRef, Store

CODE_VERSION = "1"
SHARDS = [f"data/part-{i:05d}.parquet" for i in range(3)]
TTL = 2.0
ROOT = Path(__file__).resolve().parents[2]


def run_gated(cfg, inputs: list[StageRef], out: StageDir, compute=None) -> dict:
    """Writes shard 0, then waits for the file $LMF_TEST_GATE before the other shards; logs
    every file it writes (with its pid) to $LMF_TEST_LOG."""
    gate, written_log = Path(os.environ["LMF_TEST_GATE"]), Path(os.environ["LMF_TEST_LOG"])
    for i, name in enumerate(SHARDS):
        if out.done(name):
            continue
        if i > 0:
            (gate.parent / f"{gate.name}.waiting").touch()
            while not gate.exists():
                time.sleep(0.05)
        out.write_table(name, pa.table({"n": [i]}))
        with written_log.open("a") as f:
            f.write(f"{os.getpid()} {name}\n")
    return {}


SPEC = StageSpec("gated", f"{__name__}:run_gated", section="exact_dedup")

HOLDER = """
import sys
from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.stage import run_stage
from lmfoundry.infra.store import Store
from tests.infra.test_lease import SPEC, TTL
import json
url, options = sys.argv[1], json.loads(sys.argv[2])
run_stage(Store(url, options, lease_ttl_s=TTL), SPEC, PipelineConfig(), [])
"""


@pytest.fixture(params=["local", "s3"])
def any_store(request):
    base = request.getfixturevalue("store" if request.param == "local" else "s3_store")
    return Store(base.url, base.storage_options, lease_ttl_s=TTL)


def lease_body(store: Store, version: str) -> dict | None:
    path = posixpath.join(store.version_path("gated", version), "_lease.json")
    store.fs.invalidate_cache(path)
    return store.read_json(path)


def wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def test_a_paused_holder_loses_the_lease_to_a_taker_and_writes_nothing_more(any_store, tmp_path, monkeypatch):
    written = tmp_path / "written.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LMF_TEST_GATE": str(tmp_path / "holder-go"), "LMF_TEST_LOG": str(written)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, any_store.url, json.dumps(any_store.storage_options)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: (tmp_path / "holder-go.waiting").exists() or holder.poll() is not None, "the holder to write its first shard")
        assert holder.poll() is None, holder.communicate()
        version = SPEC.version(PipelineConfig(), [])
        assert lease_body(any_store, version)["pid"] == holder.pid

        holder.send_signal(signal.SIGSTOP)  # paused past its lease: it renews nothing
        time.sleep(TTL * 1.5)

        monkeypatch.setenv("LMF_TEST_GATE", str(tmp_path / "taker-go"))
        monkeypatch.setenv("LMF_TEST_LOG", str(written))
        outcome = []
        taker = threading.Thread(target=lambda: outcome.append(run_stage(any_store, SPEC, PipelineConfig(), [])))
        taker.start()
        wait_for(lambda: (tmp_path / "taker-go.waiting").exists(), "the taker to take over and resume")
        assert lease_body(any_store, version)["pid"] == os.getpid()

        holder.send_signal(signal.SIGCONT)
        (tmp_path / "holder-go").touch()  # the holder's stage tries to write its next shard now
        _, err = holder.communicate(timeout=120)
        assert holder.returncode != 0 and LeaseLost.__name__ in err and "is now held by" in err
        # the holder neither renewed nor released the taker's lease
        assert lease_body(any_store, version)["pid"] == os.getpid()

        (tmp_path / "taker-go").touch()
        taker.join(timeout=120)
    finally:
        if holder.poll() is None:
            holder.send_signal(signal.SIGCONT)
            holder.kill()
            holder.wait()
    writers = [line.split() for line in written.read_text().splitlines()]
    # one writer at a time: the holder wrote shard 0 before its pause, the taker everything after
    assert writers == [[str(holder.pid), SHARDS[0]], [str(os.getpid()), SHARDS[1]], [str(os.getpid()), SHARDS[2]]]
    assert outcome and outcome[0].status == "ran"
    assert sorted(any_store.manifest("gated", version)["files"]) == SHARDS
    assert lease_body(any_store, version) is None  # the taker released its own lease


def test_release_leaves_a_lease_that_is_no_longer_ours(any_store):
    version = "v1"
    with any_store.lease("gated", version) as held:
        path = posixpath.join(any_store.version_path("gated", version), "_lease.json")
        someone_else = {"owner": "other:1", "host": "other", "pid": 1, "token": "theirs", "expires_at": time.time() + 60}
        any_store.write_bytes_atomic(path, json.dumps(someone_else).encode())  # a takeover behind our back
        with pytest.raises(LeaseLost, match="is now held by other:1"):
            held.renew()
        with pytest.raises(LeaseLost):
            held.check()
    assert lease_body(any_store, version)["token"] == "theirs"


def test_s3_renewal_and_release_are_conditional_on_the_etag_read(s3_store):
    """The If-Match requests behind renew/takeover/release: a write or delete based on a stale
    read of the lease is refused by the server (the window a token compare alone leaves)."""
    from lmfoundry.infra.lease import S3Leases

    leases, path = S3Leases(s3_store), s3_store.path("stages", "gated", "v2", "_lease.json")
    assert leases.create(path, b'{"token": "first"}') and not leases.create(path, b'{"token": "second"}')
    _, stale = leases.read(path)
    assert leases.replace(path, b'{"token": "taker"}', stale)  # a takeover based on the current ETag
    assert not leases.replace(path, b'{"token": "first"}', stale)  # the old holder's renewal: 412
    assert not leases.delete(path, stale)  # the old holder's release: 412
    assert leases.read(path)[0] == {"token": "taker"}


def test_shard_threads_renewing_at_once_do_not_lose_the_lease(any_store):
    """Worker threads call check() (and so renew) together; on S3 two renewals from one process
    must not 412 each other into a false LeaseLost."""
    with any_store.lease("gated", "v3") as held:
        errors = []

        def renew():
            try:
                held.renew()
            except LeaseLost as exc:
                errors.append(exc)

        threads = [threading.Thread(target=renew) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and not held.lost.is_set()
        held.check()
