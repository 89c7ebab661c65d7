"""The one document schema that data stages pass between each other, and helpers to read it.

Document shards are Parquet files under ``data/`` of a stage version, with columns:
id (stable string), text, url (may be empty), source (the configured source name) and
meta (a JSON object serialised as a string, so stages can add fields freely).
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

import pyarrow as pa

from lmfoundry.infra.store import StageRef, Store

DOC_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("url", pa.string()),
        ("source", pa.string()),
        ("meta", pa.string()),
    ]
)

DATA_PREFIX = "data/"


def shard_name(index: int, prefix: str = DATA_PREFIX) -> str:
    return f"{prefix}part-{index:05d}.parquet"


def docs_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Rows with id/text/url/source and meta as a dict (or JSON string) -> a DOC_SCHEMA table."""
    columns: dict[str, list] = {name: [] for name in DOC_SCHEMA.names}
    for row in rows:
        columns["id"].append(row["id"])
        columns["text"].append(row["text"])
        columns["url"].append(row.get("url") or "")
        columns["source"].append(row.get("source") or "")
        meta = row.get("meta") or {}
        columns["meta"].append(meta if isinstance(meta, str) else json.dumps(meta, sort_keys=True, ensure_ascii=False))
    return pa.table(columns, schema=DOC_SCHEMA)


def doc_shards(store: Store, refs: list[StageRef]) -> list[tuple[StageRef, str]]:
    """Every document shard of the given stages as (ref, path), in a fixed order.

    Stages that map shard to shard write output shard i for input shard i of this list.
    """
    return [(ref, path) for ref in refs for path in store.reader(ref).files(DATA_PREFIX, ".parquet")]


def iter_doc_shards(store: Store, refs: list[StageRef]) -> Iterator[tuple[StageRef, str, pa.Table]]:
    """Every document shard of the given stages, in a deterministic order."""
    for ref in refs:
        reader = store.reader(ref)
        for relpath in reader.files(DATA_PREFIX, ".parquet"):
            yield ref, relpath, reader.read_table(relpath)


def iter_docs(store: Store, refs: list[StageRef]) -> Iterator[dict[str, Any]]:
    for _, _, table in iter_doc_shards(store, refs):
        yield from table.to_pylist()
