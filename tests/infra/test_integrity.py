"""Store integrity (issue 16 items 1, 2 and 8), on a local directory and on a real S3 API (moto):
damaged committed files are caught, named and repaired shard by shard; torn JSON files read as
absent; no `.tmp-` file stays inside a committed version.

    .venv/bin/pytest -q tests/infra/test_integrity.py
"""
from __future__ import annotations

import json
import logging
import os
import posixpath

import pyarrow as pa
import pytest

from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.stage import StageSpec, plan, run_stage
from lmfoundry.infra.store import DamagedFile, StageDir, StageRef
from lmfoundry.infra.verify import verify_store

CODE_VERSION = "1"
SHARDS = [f"data/part-{i:05d}.parquet" for i in range(3)]
WRITTEN: list[str] = []  # the shards run_numbers wrote in this process, in order


def run_numbers(cfg, inputs: list[StageRef], out: StageDir, compute=None) -> dict:
    """Three shards of ten numbers each; a shard already done (marked, right size) is kept."""
    for i, name in enumerate(SHARDS):
        if out.done(name):
            continue
        out.write_table(name, pa.table({"n": list(range(i * 10, i * 10 + 10))}))
        WRITTEN.append(name)
    return {"shards": len(SHARDS)}


def run_total(cfg, inputs: list[StageRef], out: StageDir, compute=None) -> dict:
    """Downstream: the sum of every number upstream (reads each shard through the reader)."""
    reader = out.store.reader(inputs[0])
    total = sum(sum(reader.read_table(path).column("n").to_pylist()) for path in reader.files("data/"))
    out.write_json("total.json", {"total": total})
    return {"total": total}


NUMBERS = StageSpec("numbers", f"{__name__}:run_numbers", section="exact_dedup")
TOTAL = StageSpec("total", f"{__name__}:run_total", section="exact_dedup", inputs=("numbers",))
CFG = PipelineConfig()


@pytest.fixture(params=["local", "s3"])
def any_store(request):
    return request.getfixturevalue("store" if request.param == "local" else "s3_store")


def raw_path(store, ref: StageRef, relpath: str) -> str:
    return posixpath.join(store.version_path(ref.stage, ref.version), relpath)


def overwrite(store, path: str, data: bytes) -> None:
    """Damage a stored file behind the store's back (a disk or a bucket going wrong)."""
    store.fs.pipe_file(path, data)
    store.fs.invalidate_cache(path)


def flip_middle_byte(store, path: str) -> None:
    data = bytearray(store.fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    overwrite(store, path, bytes(data))


def fresh_numbers(store) -> StageRef:
    WRITTEN.clear()
    outcome = run_stage(store, NUMBERS, CFG, [])
    assert outcome.status == "ran" and WRITTEN == SHARDS
    WRITTEN.clear()
    return outcome.ref


# ------------------------------------------------------------------ item 1: damaged committed files


def test_flipped_bytes_are_caught_named_and_a_rerun_recomputes_only_that_shard(any_store):
    numbers = fresh_numbers(any_store)
    flip_middle_byte(any_store, raw_path(any_store, numbers, SHARDS[1]))  # same size: only the checksum sees it

    with pytest.raises(DamagedFile, match=r"data/part-00001\.parquet: contents changed") as caught:
        run_stage(any_store, TOTAL, CFG, [numbers])
    assert list(caught.value.damaged) == [SHARDS[1]]
    assert not any_store.is_committed("numbers", numbers.version)  # the damaged version is no longer used
    assert [row.reason for row in plan(any_store, [NUMBERS], CFG)][0].startswith("not committed: damaged: data/part-00001.parquet")

    again = run_stage(any_store, NUMBERS, CFG, [])
    assert again.status == "ran" and WRITTEN == [SHARDS[1]]  # just that shard, the two intact ones reused
    manifest = any_store.manifest("numbers", numbers.version)
    assert manifest["repaired_files"] == [SHARDS[1]] and manifest["resumed_files"] == 2
    assert again.ref == numbers  # the recomputed shard is byte-identical: the same digest, the same downstream
    total = run_stage(any_store, TOTAL, CFG, [again.ref])
    assert total.stats == {"total": sum(range(30))}


def test_truncated_shard_is_named_before_parquet_parses_it_and_the_rerun_repairs_it(any_store):
    numbers = fresh_numbers(any_store)
    path = raw_path(any_store, numbers, SHARDS[2])
    overwrite(any_store, path, any_store.fs.cat_file(path)[:100])

    # the plan (`lmf status`) sees the wrong size without reading any data
    row = plan(any_store, [NUMBERS], CFG)[0]
    assert row.action == "run" and row.reason.startswith("damaged: data/part-00002.parquet (truncated: 100 bytes")
    with pytest.raises(DamagedFile, match=r"stages/numbers/.*/data/part-00002\.parquet: truncated"):
        any_store.reader(numbers).read_table(SHARDS[2])

    repaired = run_stage(any_store, NUMBERS, CFG, [])
    assert repaired.status == "ran" and WRITTEN == [SHARDS[2]] and repaired.ref == numbers
    assert any_store.reader(repaired.ref).read_table(SHARDS[2]).column("n").to_pylist() == list(range(20, 30))


def test_a_committed_version_with_a_wrong_size_is_repaired_when_a_run_would_reuse_it(any_store):
    numbers = fresh_numbers(any_store)
    any_store.fs.rm_file(raw_path(any_store, numbers, SHARDS[0]))  # a lost file
    outcome = run_stage(any_store, NUMBERS, CFG, [])
    assert outcome.status == "ran" and WRITTEN == [SHARDS[0]] and outcome.ref == numbers


def test_local_path_checks_the_file_a_tool_will_open(store):
    numbers = fresh_numbers(store)
    flip_middle_byte(store, raw_path(store, numbers, SHARDS[0]))
    with pytest.raises(DamagedFile, match="contents changed"):
        store.reader(numbers).local_path(SHARDS[0])


def test_verify_store_checks_every_file_and_uncommits_damaged_versions(any_store):
    numbers = fresh_numbers(any_store)
    assert [(c.stage, c.files, c.damaged) for c in verify_store(any_store)] == [("numbers", 3, {})]
    flip_middle_byte(any_store, raw_path(any_store, numbers, SHARDS[0]))
    report_only = verify_store(any_store, ["numbers"], repair=False)
    assert list(report_only[0].damaged) == [SHARDS[0]] and any_store.is_committed("numbers", numbers.version)
    repaired = verify_store(any_store)
    assert repaired[0].uncommitted and not any_store.is_committed("numbers", numbers.version)
    assert run_stage(any_store, NUMBERS, CFG, []).ref == numbers and WRITTEN == [SHARDS[0]]


# ------------------------------------------------------------------ item 2: torn JSON files


def test_a_torn_manifest_reads_as_not_committed_with_a_warning_naming_it(any_store, caplog):
    numbers = fresh_numbers(any_store)
    manifest_path = raw_path(any_store, numbers, "manifest.json")
    overwrite(any_store, manifest_path, any_store.fs.cat_file(manifest_path)[:40])
    with caplog.at_level(logging.WARNING, logger="lmfoundry.store"):
        assert not any_store.is_committed("numbers", numbers.version)
        row = plan(any_store, [NUMBERS], CFG)[0]
    assert f"stages/numbers/{numbers.version}/manifest.json is not whole JSON" in caplog.text
    assert row.action == "run" and row.reason.startswith("not committed")
    rerun = run_stage(any_store, NUMBERS, CFG, [])
    assert rerun.status == "ran" and WRITTEN == [] and rerun.ref == numbers  # every shard reused, manifest rewritten
    assert json.loads(any_store.fs.cat_file(manifest_path))["digest"] == numbers.digest


def test_a_torn_lease_is_an_abandoned_lease(any_store, caplog):
    version = NUMBERS.version(CFG, [])
    any_store.write_bytes_atomic(posixpath.join(any_store.version_path("numbers", version), "_lease.json"), b'{"owner": "gone", "tok')
    with caplog.at_level(logging.WARNING, logger="lmfoundry.store"):
        assert run_stage(any_store, NUMBERS, CFG, []).status == "ran"
    assert "is not whole JSON; taking it over" in caplog.text
    assert not any_store.fs.exists(posixpath.join(any_store.version_path("numbers", version), "_lease.json"))


def test_torn_markers_and_refs_read_as_absent(store):
    numbers = fresh_numbers(store)
    store.write_bytes_atomic(store.path("refs", "demo", "numbers", "99999999T999999999999Z-torn.json"), b'{"stage": "num')
    assert store.get_ref("demo", "numbers") == numbers.version  # the torn newest ref is skipped
    out = StageDir(store, "numbers", "resuming")
    out.write_table(SHARDS[0], pa.table({"n": [1]}))
    store.write_bytes_atomic(out._marker_path(SHARDS[0]), b'{"size": 12')
    assert not out.done(SHARDS[0]) and out.marked_files() == {}


def test_the_local_lease_is_on_disk_before_it_is_linked_into_place(store, monkeypatch):
    events = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def link(src, dst):
        events.append(("link", os.path.abspath(src)))
        return real_link(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    assert store.create_exclusive(store.path("stages", "x", "v", "_lease.json"), b'{"token": "t"}')
    linked = [i for i, e in enumerate(events) if e[0] == "link"]
    assert linked and ("fsync", events[linked[0]][1]) in events[: linked[0]]


# ------------------------------------------------------------------ item 8: leftovers and wording


def test_no_tmp_file_stays_inside_a_committed_version(store):
    version = NUMBERS.version(CFG, [])
    root = store.version_path("numbers", version)
    for leftover in ("data/part-00001.parquet.tmp-dead0001", "_markers/data/part-00000.parquet.json.tmp-dead0002"):
        os.makedirs(posixpath.dirname(posixpath.join(root, leftover)), exist_ok=True)
        with open(posixpath.join(root, leftover), "wb") as f:
            f.write(b"half of a file a crashed writer left")
    assert run_stage(store, NUMBERS, CFG, []).status == "ran"
    assert [p for p in store.fs.find(root) if ".tmp-" in p] == []


def test_a_missing_manifest_reads_not_committed_not_stale(store):
    from lmfoundry.cli import state_of

    numbers = fresh_numbers(store)
    store.fs.rm_file(raw_path(store, numbers, "manifest.json"))
    row = plan(store, [NUMBERS], CFG)[0]
    assert row.current == row.version == numbers.version
    assert state_of(row).startswith("not committed") and "stale" not in state_of(row)
    changed = plan(store, [NUMBERS], PipelineConfig.model_validate({"exact_dedup": {"normalize": "none"}}))[0]
    assert state_of(changed).startswith("stale: config, code or inputs changed")


def test_a_damaged_file_of_an_unfinished_version_loses_its_marker(any_store):
    out = StageDir(any_store, "numbers", "unfinished")
    out.write_json("plan.json", {"shards": 3})
    flip_middle_byte(any_store, posixpath.join(out.path, "plan.json"))
    with pytest.raises(DamagedFile, match="plan.json: contents changed.*marker is removed"):
        out.read_bytes("plan.json")
    assert not out.done("plan.json")  # a resuming stage writes it again
