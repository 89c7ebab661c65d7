"""Test helpers: commit small document stages that other stages can read as inputs."""
from __future__ import annotations

import hashlib
from typing import Any

from lmfoundry.infra.docs import docs_table, shard_name
from lmfoundry.infra.store import StageRef, Store


def commit_docs(store: Store, shards: list[list[dict[str, Any]]], stage: str = "fixture_docs", version: str | None = None) -> StageRef:
    """Commit one fake upstream stage whose data/ shards hold the given documents.

    Each document needs at least id and text; url, source and meta default to empty.
    """
    version = version or hashlib.sha256(repr(shards).encode()).hexdigest()[:16]
    out = store.open_for_write(stage, version)
    for i, rows in enumerate(shards):
        out.write_table(shard_name(i), docs_table(rows))
    return store.commit(out, {"stats": {}})


def docs(*texts: str, prefix: str = "d") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "text": t} for i, t in enumerate(texts)]
