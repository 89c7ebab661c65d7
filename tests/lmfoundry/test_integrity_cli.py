"""`lmf verify`, `lmf status` on a damaged store, input checks before anything runs, and the
committed rerun answered without Prefect (issue 16 items 1, 2, 6, 7 and 8 at the command line).

Stages are committed here with the plain stage runner (no Prefect); only the flow-start test
uses the Prefect test harness.

    .venv/bin/pytest -q tests/lmfoundry/test_integrity_cli.py
"""
from __future__ import annotations

import os
import posixpath
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmfoundry.cli import main
from lmfoundry.flows.pipeline import stages_until
from lmfoundry.infra.config import load_config
from lmfoundry.infra.files import InputError
from lmfoundry.infra.stage import run_stage
from lmfoundry.infra.store import Store
from tests.infra.test_integrity import CFG, NUMBERS, SHARDS, flip_middle_byte, fresh_numbers, raw_path

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, **sections) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(f"Document {i} is about the number {i}.\n" * 30)
    cfg = {
        "store": {"url": str(tmp_path / "store"), "pipeline": "t"},
        "compute": {"workers": 1, "progress": False},
        "ingest": {"sources": [{"name": "corpus", "paths": [str(corpus)]}], "target_shard_bytes": 2048},
        **sections,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def commit_until(config: Path, until: str) -> Store:
    """Run the pipeline's stages up to `until` with the plain stage runner (what `lmf run` commits)."""
    cfg = load_config(config)
    store, refs = Store.from_config(cfg.store), {}
    for spec in stages_until(until):
        if not spec.enabled(cfg):
            refs[spec.name] = refs.get(spec.inputs[0]) if spec.inputs else None
            continue
        refs[spec.name] = run_stage(store, spec, cfg, [refs[n] for n in spec.inputs if refs.get(n) is not None]).ref
    return store


def status_rows(capsys, config: Path) -> dict[str, str]:
    """`lmf status` as {stage: the rest of its table line}."""
    assert main(["status", "--config", str(config)]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) > 3 and cells[0]:
            rows[cells[0]] = " ".join(cells[1:])
    return rows


# ------------------------------------------------------------------ lmf verify (item 1)


def test_lmf_verify_names_damaged_files_exits_1_and_the_next_run_repairs_them(store, capsys):
    numbers = fresh_numbers(store)
    at = ["--set", f"store.url={store.url}"]
    assert main(["verify", *at]) == 0
    assert "checked 3 files" in capsys.readouterr().out

    flip_middle_byte(store, raw_path(store, numbers, SHARDS[1]))
    assert main(["verify", "numbers", "--report-only", *at]) == 1
    assert f"DAMAGED {store.url}/stages/numbers/{numbers.version}/data/part-00001.parquet: contents changed" in capsys.readouterr().out
    assert store.is_committed("numbers", numbers.version)  # --report-only touches nothing

    assert main(["verify", *at]) == 1
    out = capsys.readouterr().out
    assert "1 damaged in 1 versions" in out and "is no longer committed; `lmf run` recomputes only these files" in out
    assert run_stage(store, NUMBERS, CFG, []).ref == numbers
    assert main(["verify", *at]) == 0
    assert main(["verify", "nosuchstage", *at]) == 2


# ------------------------------------------------------------------ lmf status on a damaged store (items 1, 2, 8)


def test_status_says_damaged_and_not_committed_instead_of_fresh_or_stale(tmp_path, capsys):
    config = write_config(tmp_path)
    store = commit_until(config, "ingest")
    assert status_rows(capsys, config)["ingest"].split()[2] == "fresh"

    version = store.get_ref("t", "ingest")
    shard = sorted(p for p in store.manifest("ingest", version)["files"] if p.startswith("data/"))[0]
    path = posixpath.join(store.version_path("ingest", version), shard)
    Path(path).write_bytes(Path(path).read_bytes()[:50])
    assert "damaged: data/" in status_rows(capsys, config)["ingest"]

    commit_until(config, "ingest")  # the rerun recomputes that shard
    manifest_path = Path(store.version_path("ingest", version)) / "manifest.json"
    manifest_path.write_text(manifest_path.read_text()[:30])  # torn by a power loss
    row = status_rows(capsys, config)["ingest"]
    assert "not committed" in row and "stale" not in row and "fresh" not in row


# ------------------------------------------------------------------ inputs checked up front (item 6)


def test_lmf_run_checks_every_input_before_anything_runs(tmp_path, capsys):
    config = write_config(tmp_path, crawl={"seeds": ["{demo_site}"], "allow_private_hosts": True, "max_pages": 2})
    absent = tmp_path / "absent"
    code = main([
        "run", "--config", str(config),
        "--set", f"ingest.sources=[{{name: x, paths: ['{absent}/*.txt']}}]",
        "--set", f"ingest_warc.paths=['{absent}/*.warc.gz']",
    ])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("lmf: ") == 1 and "Traceback" not in err
    assert "ingest: source 'x' path" in err and "ingest_warc: ingest_warc.paths[0]" in err
    assert Store(str(tmp_path / "store")).stages() == []  # the crawl (first in the table) did not run


def test_a_flow_checks_every_input_at_its_start(prefect_harness, tmp_path):
    from lmfoundry.flows.data_refresh import data_refresh

    config = write_config(tmp_path, crawl={"seeds": ["{demo_site}"], "allow_private_hosts": True, "max_pages": 2})
    with pytest.raises(InputError, match="ingest_warc.paths\\[0\\]"):
        data_refresh(preset=str(config), overrides=[f"ingest_warc.paths=['{tmp_path}/absent.warc.gz']"])
    assert Store(str(tmp_path / "store")).stages() == []


# ------------------------------------------------------------------ committed rerun without Prefect (item 7)


def test_a_committed_rerun_answers_without_prefect(tmp_path):
    config = write_config(tmp_path)
    store = commit_until(config, "exact_dedup")
    probe = (
        "import sys; from lmfoundry.cli import main; code = main(sys.argv[1:]); "
        "print('prefect imported' if 'prefect' in sys.modules else 'prefect not imported'); sys.exit(code)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    run = subprocess.run(
        [sys.executable, "-c", probe, "run", "--config", str(config), "--until", "exact_dedup"],
        env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "prefect not imported" in run.stdout and "temporary server" not in run.stderr
    committed = [name for name in store.stages()]
    assert run.stderr.count("reused version") == len(committed) and "nothing to run" in run.stderr
    for name in committed:  # the usual summary, one line per stage
        assert any(line.split()[:2] == [name, "skipped"] for line in run.stdout.splitlines()), run.stdout


def test_anything_to_run_goes_through_the_flow(tmp_path):
    from lmfoundry.flows.summary import answer_if_committed

    config = write_config(tmp_path)
    commit_until(config, "ingest")
    assert answer_if_committed(load_config(config), "ingest") is not None
    assert answer_if_committed(load_config(config), "exact_dedup") is None  # exact_dedup never ran
    assert answer_if_committed(load_config(config, ["ingest.max_doc_chars=100"]), "ingest") is None
