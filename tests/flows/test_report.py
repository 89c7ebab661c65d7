"""`lmf report`: a self-contained HTML page built from manifests, tolerant of missing stages."""
from __future__ import annotations

import json
import re

from lmfoundry.flows.pipeline import STAGE_NAMES, stage
from lmfoundry.cli import main
from lmfoundry.infra.report import build_report
from lmfoundry.infra.snapshots import write_snapshot
from lmfoundry.infra.stage import run_stage
from lmfoundry.infra.store import StageRef, Store
from tests.flows.corpus import make_config, make_corpus, write_preset


def commit_fake(store: Store, name: str, inputs: list[StageRef], stats: dict, files: dict[str, bytes] = {}) -> StageRef:
    """A committed stage version with the given stats (stands in for stages of other issues)."""
    out = store.open_for_write(name, f"{name[:4]}-fake")
    for relpath, data in files.items():
        out.write_bytes(relpath, data)
    ref = store.commit(out, {"stats": stats, "inputs": [r.model_dump() for r in inputs]})
    store.set_ref("test", name, ref.version)
    return ref


def images(html: str) -> dict[str, str]:
    return dict(re.findall(r'<img alt="([^"]+)" src="([^"]+)"', html))


def test_report_shows_lineage_funnels_histograms_and_curves(tmp_path):
    cfg = make_config(make_corpus(tmp_path / "corpus"), tmp_path / "store")
    store = Store.from_config(cfg.store)
    ingest = run_stage(store, stage("ingest"), cfg, []).ref
    dedup = run_stage(store, stage("exact_dedup"), cfg, [ingest]).ref
    near = commit_fake(store, "near_dedup", [dedup], {"docs_in": 9, "docs_out": 7, "cluster_sizes": {"2": 1, "3-4": 1}})
    pii = commit_fake(store, "pii_scrub", [near], {"docs_out": 7, "entities": {"EMAIL": 3, "PHONE": 1}})
    tokens = commit_fake(store, "tokenize", [pii], {"tokens": {"train": 900, "val": 100}})
    metrics = "\n".join(json.dumps(r) for r in [{"kind": "train", "step": 1, "loss": 5.0}, {"kind": "train", "step": 2, "loss": 4.0}, {"kind": "val", "step": 2, "val_loss": 4.2}])
    commit_fake(store, "pretrain", [tokens], {"steps": 2}, {"metrics.jsonl": (metrics + "\n{torn").encode()})

    html = build_report(store, "test", STAGE_NAMES)
    assert html.startswith("<!doctype html>") and "<svg" in html
    for name in ("ingest", "exact_dedup", "near_dedup", "pii_scrub", "tokenize", "pretrain"):
        assert f">{name}</text>" in html  # a lineage box
    assert html.count("marker-end=") == 5  # one arrow per input edge
    shown = images(html)
    assert set(shown) == {"documents funnel", "tokens funnel", "cluster sizes", "pii counts", "training curve"}
    assert all(src.startswith("data:image/png;base64,") for src in shown.values())
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing loaded from elsewhere
    assert "docs_by_source.corpus" in html and "duplicates_removed" in html  # stats tables


def test_report_of_a_snapshot_and_of_a_half_built_pipeline(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    preset = write_preset(tmp_path / "preset.yaml", corpus, tmp_path / "store")
    cfg = make_config(corpus, tmp_path / "store")
    store = Store.from_config(cfg.store)
    ingest = run_stage(store, stage("ingest"), cfg, []).ref
    write_snapshot(store, "test", "only-ingest", {"ingest": ingest}, run_id=None)
    out = tmp_path / "report.html"
    assert main(["report", "--config", str(preset), "--snapshot", "only-ingest", "--out", str(out)]) == 0
    html = out.read_text()
    assert "snapshot only-ingest" in html and ">ingest</text>" in html
    assert set(images(html)) == {"documents funnel"}
    assert main(["report", "--config", str(preset), "--snapshot", "nope", "--out", str(out)]) == 2


def test_report_of_an_empty_store_says_what_to_do(tmp_path):
    html = build_report(Store(str(tmp_path / "empty")), "demo", STAGE_NAMES)
    assert "No committed stages yet" in html and "lmf run" in html
