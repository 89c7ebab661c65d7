"""Named snapshots: a label for the stage versions one data refresh produced.

``snapshots/<pipeline>/<label>.json`` in the store holds ``{"label", "pipeline", "run_id",
"created_at", "stages": {stage: version}}``. Like a git tag, a label names one version of
the data (``lmf report --snapshot LABEL``); writing the same label again moves it.
"""
from __future__ import annotations

import json
import posixpath

from lmfoundry.infra.store import StageRef, Store, utc_now


def snapshot_path(store: Store, pipeline: str, label: str) -> str:
    return store.path("snapshots", pipeline, f"{label}.json")


def write_snapshot(store: Store, pipeline: str, label: str, refs: dict[str, StageRef | None], run_id: str | None) -> dict:
    body = {
        "label": label,
        "pipeline": pipeline,
        "run_id": run_id,
        "created_at": utc_now(),
        "stages": {name: ref.version for name, ref in refs.items() if ref is not None and ref.stage == name},
    }
    store.write_bytes_atomic(snapshot_path(store, pipeline, label), json.dumps(body, indent=2).encode())
    return body


def read_snapshot(store: Store, pipeline: str, label: str) -> dict | None:
    return store.read_json(snapshot_path(store, pipeline, label))


def list_snapshots(store: Store, pipeline: str) -> list[str]:
    try:
        paths = store.fs.ls(store.path("snapshots", pipeline), detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(p)[: -len(".json")] for p in paths if p.endswith(".json"))
