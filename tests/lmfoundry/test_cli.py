"""`lmf` end to end through a real Prefect server: skip, re-run on change, force, resume after SIGKILL.

Every `lmf` here is a separate process, as a user would run it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmfoundry.infra.store import Store

LMF = [sys.executable, "-m", "lmfoundry.cli"]
ROOT = Path(__file__).resolve().parents[2]


def make_corpus(folder: Path, n_files: int = 6) -> None:
    """Text files with some exact duplicates (normalised: case and whitespace differ)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        body = f"Document {i % 4} talks about topic {i % 4}.\n" * 40
        (folder / f"doc{i:02d}.txt").write_text(body.upper() if i >= 4 else body)


def write_config(tmp_path: Path) -> Path:
    make_corpus(tmp_path / "corpus")
    cfg = {
        "store": {"url": str(tmp_path / "store"), "pipeline": "test"},
        "ingest": {"sources": [{"name": "corpus", "paths": [str(tmp_path / "corpus")]}], "target_shard_bytes": 1500},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def lmf(args: list[str], api_url: str, env_extra: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": api_url, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run(LMF + args, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def manifests(store_dir: Path, stage: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((store_dir / "stages" / stage).glob("*/manifest.json"))]


def data_digests(manifest: dict) -> dict:
    return {p: m["checksum"] for p, m in manifest["files"].items() if p.startswith("data/")}


@pytest.fixture
def project(tmp_path, prefect_api_url):
    return write_config(tmp_path), tmp_path / "store", prefect_api_url


def test_second_run_skips_everything_and_config_change_reruns_only_downstream(project):
    config, store_dir, api = project
    first = lmf(["run", "--config", str(config), "--until", "exact_dedup"], api)
    assert first.returncode == 0, first.stderr
    assert "ingest committed" in first.stderr and "exact_dedup committed" in first.stderr
    ran = first.stderr.count("committed version")
    dedup = manifests(store_dir, "exact_dedup")[0]
    assert dedup["stats"]["duplicates_removed"] == 2  # doc04/doc05 repeat doc00/doc01 in upper case

    again = lmf(["run", "--config", str(config), "--until", "exact_dedup"], api)
    assert again.returncode == 0, again.stderr
    assert "committed version" not in again.stderr
    assert again.stderr.count("reused version") == ran

    changed = lmf(["run", "--config", str(config), "--until", "exact_dedup", "--set", "exact_dedup.normalize=none"], api)
    assert changed.returncode == 0, changed.stderr
    assert "ingest reused" in changed.stderr and "exact_dedup committed" in changed.stderr
    assert len(manifests(store_dir, "ingest")) == 1
    assert [m["stats"]["duplicates_removed"] for m in manifests(store_dir, "exact_dedup")].count(0) == 1

    status = lmf(["status", "--config", str(config)], api)
    assert status.returncode == 0
    assert status.stdout.count("fresh") == ran and "stale" not in status.stdout
    stale = lmf(["status", "--config", str(config), "--set", "exact_dedup.normalize=whitespace"], api)
    assert "stale" in stale.stdout

    shown = lmf(["show", "ingest", "--config", str(config)], api)
    assert json.loads(shown.stdout)["stats"]["docs_out"] == 6
    # the ref of exact_dedup points at the normalize=none run; show describes this config's version
    plain = lmf(["show", "exact_dedup", "--config", str(config)], api)
    assert json.loads(plain.stdout)["config"]["normalize"] != "none"


def test_until_and_force(project):
    config, store_dir, api = project
    until = lmf(["run", "--config", str(config), "--until", "ingest"], api)
    assert until.returncode == 0, until.stderr
    assert not (store_dir / "stages" / "exact_dedup").exists()
    assert lmf(["run", "--config", str(config), "--until", "exact_dedup"], api).returncode == 0
    forced = lmf(["run", "--config", str(config), "--until", "exact_dedup", "--force", "ingest"], api)
    assert forced.returncode == 0, forced.stderr
    assert "ingest committed" in forced.stderr and "exact_dedup committed" in forced.stderr
    assert len(manifests(store_dir, "ingest")) == 2 and len(manifests(store_dir, "exact_dedup")) == 2
    # forced re-runs produce the same data under new versions; nothing was overwritten
    assert data_digests(manifests(store_dir, "ingest")[0]) == data_digests(manifests(store_dir, "ingest")[1])


def test_invalid_config_and_missing_input_fail_before_running(project, tmp_path):
    config, store_dir, api = project
    bad = lmf(["run", "--config", str(config), "--set", "near_dedup.threshold=2"], api)
    assert bad.returncode == 2
    assert "near_dedup.threshold" in bad.stderr and not store_dir.exists()
    unknown = lmf(["run", "--config", str(config), "--until", "nosuchstage"], api)
    assert unknown.returncode == 2 and "unknown stage 'nosuchstage'" in unknown.stderr
    missing = lmf(["run", "--config", str(config), "--set", f"ingest.sources=[{{name: x, paths: ['{tmp_path}/absent/*.txt']}}]"], api)
    assert missing.returncode == 2
    assert "source 'x' path" in missing.stderr and "absent" in missing.stderr


def test_sigkill_during_exact_dedup_then_rerun_resumes_byte_identically(project, tmp_path):
    config, store_dir, api = project
    # ingest makes 6 shards -> exact_dedup writes 6 hash files, then data/removed per shard;
    # the fault hook parks the process right after the first output data file (one worker, so
    # nothing else runs on; workers is an execution knob and does not change the version)
    proc = subprocess.Popen(
        LMF + ["run", "--config", str(config), "--until", "exact_dedup", "--set", "compute.workers=1"],
        env={**os.environ, "PREFECT_API_URL": api, "PYTHONPATH": str(ROOT), "LMF_FAULT": "exact_dedup:after_file:7:sleep"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = store_dir / "stages" / "exact_dedup"
    deadline = time.time() + 180
    while not list(marker.glob("*/_markers/data/part-00000.parquet.json")):
        assert proc.poll() is None, "the run ended before reaching the fault point"
        assert time.time() < deadline, "exact_dedup never started writing"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert manifests(store_dir, "exact_dedup") == []  # nothing half-written is committed
    ingest_before = manifests(store_dir, "ingest")

    resumed = lmf(["run", "--config", str(config), "--until", "exact_dedup"], api)
    assert resumed.returncode == 0, resumed.stderr
    assert manifests(store_dir, "ingest") == ingest_before  # ingest was not recomputed
    dedup = manifests(store_dir, "exact_dedup")[0]
    assert dedup["resumed_files"] == 7

    # an uninterrupted run of the same config into another store writes the same bytes
    clean_store = tmp_path / "clean-store"
    assert lmf(["run", "--config", str(config), "--until", "exact_dedup", "--set", f"store.url={clean_store}"], api).returncode == 0
    assert data_digests(manifests(clean_store, "exact_dedup")[0]) == data_digests(dedup)
    assert Store(str(store_dir)).is_committed("exact_dedup", dedup["version"])


def test_bench_and_eval_find_their_modules_by_name(tmp_path, capsys):
    """`lmf bench NAME` and `lmf eval NAME` import lmfoundry.bench.NAME / lmfoundry.tasks.NAME.evaluate."""
    from lmfoundry.cli import main

    assert main(["bench", "nope"]) == 2
    listed = capsys.readouterr().err
    assert "available:" in listed and "dedup" in listed and "_common" not in listed
    assert main(["eval", "nope"]) == 2
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text('{"text": "mail bob@example.org now", "spans": [{"entity_type": "EMAIL_ADDRESS", "start": 5, "end": 20}]}\n')
    assert main(["eval", "pii", str(labelled), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["EMAIL"]["f1"] == 1.0
