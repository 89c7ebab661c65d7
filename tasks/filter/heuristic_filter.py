"""Stage `heuristic_filter`: drop documents that fail the Gopher, C4 or FineWeb rules.

The rules and their thresholds are in tasks/filter/rules.py and the `heuristic_filter` config
section; a null threshold switches one check off, `<set>.enabled: false` a whole rule set.
Output shard i mirrors input shard i:

- ``data/part-NNNNN.parquet``: the kept documents, unchanged;
- ``removed/part-NNNNN.parquet``: the dropped documents, whole, with a `reason` column,
  so a threshold can be judged by reading what it removed.

Stats: documents in and out, drops counted by reason, and a few dropped documents per
reason (id, url, the start of the text) for a quick look in the manifest or Prefect UI.

Run alone: ``lmf run --until heuristic_filter``; tune e.g. with
``--set heuristic_filter.gopher_quality.min_words=30``.
"""
from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from lmfoundry.infra.config import ComputeConfig, HeuristicFilterConfig
from lmfoundry.infra.docs import DOC_SCHEMA, shard_name, doc_shards
from lmfoundry.infra.parallel import map_pending
from lmfoundry.infra.store import StageDir, StageRef
from lmfoundry.tasks.filter.rules import build_steps, judge

CODE_VERSION = "1"

REMOVED_SCHEMA = DOC_SCHEMA.append(pa.field("reason", pa.string()))


class HeuristicFilterStats(BaseModel):
    docs_in: int
    docs_out: int
    kept_fraction: float
    dropped: dict[str, int]  # reason -> documents
    samples: dict[str, list[dict[str, str]]]  # reason -> a few dropped documents (id, url, text start)


def sample_of(row: dict[str, Any], chars: int) -> dict[str, str]:
    text = row["text"] or ""
    return {"id": row["id"], "url": row["url"] or "", "text": text[:chars] + ("…" if len(text) > chars else "")}


def filter_shard(cfg: HeuristicFilterConfig, out: StageDir, shards: list[tuple[StageRef, str]], index: int) -> None:
    """Judge every document of one input shard; write kept and removed shards with their counts."""
    ref, path = shards[index]
    table = out.store.reader(ref).read_table(path)
    steps = build_steps(cfg)
    keep_mask: list[bool] = []
    reasons: list[str] = []
    dropped: Counter[str] = Counter()
    samples: dict[str, list[dict[str, str]]] = {}
    for row in table.to_pylist():
        # a null or non-string text is a malformed record: dropped and counted, never fatal
        reason = judge(row["text"], steps) if isinstance(row.get("text"), str) else "no_text"
        keep_mask.append(reason is None)
        if reason is None:
            continue
        reasons.append(reason)
        dropped[reason] += 1
        if len(samples.setdefault(reason, [])) < cfg.samples_per_reason:
            samples[reason].append(sample_of(row, cfg.sample_chars))
    mask = pa.array(keep_mask, pa.bool_())
    removed = table.filter(pc.invert(mask)).select(DOC_SCHEMA.names)
    removed = removed.append_column("reason", pa.array(reasons, pa.string()))
    counts = {"docs_in": table.num_rows, "dropped": dict(dropped), "samples": samples}
    out.write_table(shard_name(index, "removed/"), removed.cast(REMOVED_SCHEMA))
    out.write_table(shard_name(index), table.filter(mask), counts=counts)


def run_heuristic_filter(cfg: HeuristicFilterConfig, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> HeuristicFilterStats:
    shards = doc_shards(out.store, inputs)
    map_pending(partial(filter_shard, cfg, out, shards), len(shards), shard_name, out, compute, "shards")
    docs_in = docs_out = 0
    dropped: Counter[str] = Counter()
    samples: dict[str, list[dict[str, str]]] = {}
    for i in range(len(shards)):
        marker = out.marker(shard_name(i))
        docs_in += marker["counts"]["docs_in"]
        docs_out += marker["rows"]
        dropped.update(marker["counts"]["dropped"])
        for reason, docs in marker["counts"]["samples"].items():
            kept = samples.setdefault(reason, [])
            kept.extend(docs[: cfg.samples_per_reason - len(kept)])
    return HeuristicFilterStats(
        docs_in=docs_in,
        docs_out=docs_out,
        kept_fraction=round(docs_out / docs_in, 4) if docs_in else 0.0,
        dropped=dict(dropped.most_common()),
        samples=dict(sorted(samples.items())),
    )
