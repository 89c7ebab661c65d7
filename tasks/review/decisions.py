"""The decision log in the store, and what the decisions say about the machine labels.

A batch is one answer: a reviewer's form in the Prefect UI, a Label Studio import, or a gate's
timeout. Batches are append-only files ``reviews/<docs|pairs>/<time>-<batch>.json``:

    {"batch", "kind", "source": "prefect-ui" | "label-studio" | "timeout", "reviewer",
     "created_at", "stage", "version", "flow_run_id", "policy", "unanswered": [content hash...],
     "decisions": [{"item_id", "content_hash", "decision": "approve" | "reject" | "relabel",
                    "labels": {label: value}, "reason", "reviewer"}]}

The latest decision per content hash wins (a timeout batch decides nothing: it only records
which items went unanswered, and under which policy the run went on).
"""
from __future__ import annotations

import json
import math
import posixpath
import uuid
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, Field

from lmfoundry.infra.store import Store, utc_now
from lmfoundry.tasks.review.labels import LABELS

DECISIONS = ("approve", "reject", "relabel")


class Decision(BaseModel):
    item_id: str
    content_hash: str
    decision: Literal["approve", "reject", "relabel"]
    labels: dict[str, str] = Field(default_factory=dict)  # relabel: the corrected labels
    reason: str = ""
    reviewer: str


class Batch(BaseModel):
    batch: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    kind: Literal["docs", "pairs"]
    source: str
    reviewer: str
    created_at: str = Field(default_factory=utc_now)
    stage: str | None = None
    version: str | None = None
    flow_run_id: str | None = None
    policy: str | None = None
    unanswered: list[str] = Field(default_factory=list)
    decisions: list[Decision] = Field(default_factory=list)


def check_decision(d: Decision, kind: str, where: str) -> None:
    """A relabel names labels of this kind; approve and reject carry none."""
    if d.decision == "relabel" and not d.labels:
        raise ValueError(f"{where}: relabel needs the corrected labels, e.g. {next(iter(LABELS[kind]))}=VALUE")
    if d.decision != "relabel" and d.labels:
        raise ValueError(f"{where}: labels are given only with relabel (got decision {d.decision})")
    for name, value in d.labels.items():
        allowed = LABELS[kind].get(name, ())
        if name not in LABELS[kind] or (allowed is not None and value not in allowed):
            raise ValueError(f"{where}: {name}={value} is not a {kind} label; labels: {LABELS[kind]}")


def log_dir(store: Store, kind: str) -> str:
    return store.path("reviews", kind)


def write_batch(store: Store, batch: Batch) -> str:
    for i, d in enumerate(batch.decisions):
        check_decision(d, batch.kind, f"batch {batch.batch} decision {i} (item {d.item_id})")
    # microseconds in the name: two batches written in the same second keep their order
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = posixpath.join(log_dir(store, batch.kind), f"{stamp}-{batch.batch}.json")
    store.write_bytes_atomic(path, json.dumps(batch.model_dump(mode="json"), indent=1, sort_keys=True).encode(), durable=True)
    return path


def read_batches(store: Store, kind: str) -> list[Batch]:
    """Every batch of this kind, in the order they were written (file names start with the time)."""
    try:
        paths = sorted(p for p in store.fs.ls(log_dir(store, kind), detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        return []
    return [Batch.model_validate(store.read_json(p)) for p in paths]


def latest_decisions(batches: list[Batch]) -> dict[str, tuple[Decision, Batch]]:
    """content hash -> (its latest decision, the batch it came in)."""
    out: dict[str, tuple[Decision, Batch]] = {}
    for batch in batches:
        for d in batch.decisions:
            out[d.content_hash] = (d, batch)
    return out


# ------------------------------------------------------------------ what the decisions say


def wilson(errors: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion (sound at 0 or n errors, unlike the normal one)."""
    if n == 0:
        return None
    p = errors / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return round(max(0.0, centre - half), 6), round(min(1.0, centre + half), 6)


def rm_preference(margin: float) -> str | None:
    """The side the reward model prefers, as a `preference` label; a tie prefers neither."""
    return "as_given" if margin > 0 else "swapped" if margin < 0 else None


def review_stats(sampled: list[dict[str, Any]], decided: dict[str, Decision], population: int, kind: str) -> dict[str, Any]:
    """Agreement of machine labels with reviewers, and the remainder's estimated error rate.

    Per label: the share of reviewed items whose label the reviewer kept (approve, or a relabel
    that leaves this label as it was); `keep`: the share not rejected. An item is an error when
    the reviewer rejected or relabelled it; the random share is a uniform sample of the items
    outside the top-risk set, so its error rate estimates that of the unreviewed remainder.
    Pairs with a reward-model margin add `reward_model`: the share of reviewed, not rejected pairs
    whose preferred side (positive margin: as given) is the one the reviewer kept or swapped to.
    """
    reviewed = [(it, decided[it["content_hash"]]) for it in sampled if it["content_hash"] in decided]
    agreement: dict[str, float | None] = {}
    for label in ("keep", *LABELS[kind]):
        if label == "keep":
            agree = [d.decision != "reject" for _, d in reviewed]
        else:  # a rejected item says nothing about its other labels
            agree = [d.labels.get(label, it["labels"].get(label)) == it["labels"].get(label) for it, d in reviewed if d.decision != "reject"]
        agreement[label] = round(sum(agree) / len(agree), 6) if agree else None
    scored = [(it, d) for it, d in reviewed if d.decision != "reject" and "rm_margin" in it.get("signals", {})]
    if scored:  # pairs annotated with review_pairs.reward_model: does the model agree with the reviewed preference?
        agree = [rm_preference(it["signals"]["rm_margin"]) == d.labels.get("preference", it["labels"]["preference"]) for it, d in scored]
        agreement["reward_model"] = round(sum(agree) / len(agree), 6)
    randoms = [d for it, d in reviewed if it.get("share") == "random"]
    errors = sum(d.decision != "approve" for d in randoms)
    return {
        "sampled": len(sampled),
        "reviewed": len(reviewed),
        "decisions": {name: sum(d.decision == name for _, d in reviewed) for name in DECISIONS},
        "agreement": agreement,
        "random_reviewed": len(randoms),
        "random_errors": errors,
        "remainder_items": population - len(reviewed),
        "remainder_error_rate": round(errors / len(randoms), 6) if randoms else None,
        "remainder_error_ci95": list(wilson(errors, len(randoms)) or []),
    }
