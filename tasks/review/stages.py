"""Stages `annotate_docs`, `review_docs`, `annotate_pairs`, `review_pairs` (see tasks/review/__init__.py).

    lmf run --set review_docs.enabled=true --until review_docs     # pauses for a reviewer
    lmf run --set review_pairs.enabled=true --until review_pairs

annotate_*: inputs the data (documents; or preference pairs + the tokenizer to decode them).
Writes ``annotations.parquet`` (id, content_hash, risk, labels and signals as JSON, every item)
and ``sample.json`` ({"kind", "population", "items": [{n, item_id, content_hash, share, risk,
why, labels, signals, preview}]}).

review_*: inputs the data and the annotate stage. Applies the decision log's latest decision for
every item it holds (by content hash); writes the data in its input's format plus
``decisions.json`` ({"kind", "gate": [the batches this version's gate wrote], "applied":
[decision + batch, source, created_at per item]}).
"""
from __future__ import annotations

import io
import json
from collections import Counter
from typing import Any

import pyarrow as pa
from pydantic import BaseModel

from lmfoundry.infra.config import ComputeConfig
from lmfoundry.infra.config_review import ReviewConfig
from lmfoundry.infra.docs import iter_doc_shards, shard_name, docs_table
from lmfoundry.infra.store import StageDir, StageRef, Store
from lmfoundry.model.token_format import INDEX_FILE, SPLITS
from lmfoundry.tasks.chat import common
from lmfoundry.tasks.chat.preference_data import EncodedPair, write_split
from lmfoundry.tasks.review import labels as L
from lmfoundry.tasks.review.decisions import Decision, latest_decisions, read_batches, review_stats
from lmfoundry.tasks.tokens.train_tokenizer import STAGE_NAME as TOKENIZER_STAGE

CODE_VERSION = "1"
ANNOTATE = {L.DOCS: "annotate_docs", L.PAIRS: "annotate_pairs"}
SAMPLE_FILE, ANNOTATIONS_FILE, DECISIONS_FILE = "sample.json", "annotations.parquet", "decisions.json"


class AnnotateStats(BaseModel):
    items: int
    sampled_risk: int
    sampled_random: int
    risk_mean: float
    risk_max: float
    labels: dict[str, dict[str, int]]  # label -> value -> items


class ReviewStats(BaseModel):
    items_in: int
    items_out: int
    docs_out: int | None = None  # documents only: the report's funnel reads it
    rejected: int
    relabelled: int
    approved: int
    review: dict[str, Any]  # decisions.review_stats on the sample: agreement, remainder error rate


def _meta(value: str | None) -> dict[str, Any]:
    try:
        meta = json.loads(value) if value else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


# ------------------------------------------------------------------ reading the items


def _data_refs(inputs: list[StageRef], kind: str) -> list[StageRef]:
    return [r for r in inputs if r.stage not in (ANNOTATE[kind], TOKENIZER_STAGE)]


def read_pairs(store: Store, ref: StageRef) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """index.json and every pair row per split of a preference stage."""
    reader = store.reader(ref)
    index = reader.read_json(INDEX_FILE)
    if index.get("format") != "preference":
        raise ValueError(f"review_pairs reads preference pairs; {ref.stage}/{ref.version}/{INDEX_FILE} has format {index.get('format')!r}")
    rows = {}
    for split in SPLITS:
        rows[split] = []
        for entry in index["splits"].get(split, []):
            table = pa.ipc.open_file(io.BytesIO(reader.read_bytes(entry["path"]))).read_all()
            rows[split] += table.to_pylist()
    return index, rows


def _reply(row: dict[str, Any], side: str) -> list[int]:
    return [t for t, m in zip(row[side], row[f"{side}_mask"]) if m]


def doc_items(store: Store, refs: list[StageRef], preview: int) -> list[dict[str, Any]]:
    items = []
    for _, _, table in iter_doc_shards(store, refs):
        for row in table.to_pylist():
            meta = _meta(row["meta"])
            signals = L.doc_signals(row["text"] or "", meta)
            risk, why = L.doc_risk(signals)
            text = row["text"] or ""
            items.append({
                "item_id": row["id"], "content_hash": L.text_hash(text), "risk": risk, "why": why,
                "labels": L.doc_labels(meta, signals), "signals": signals,
                "preview": {"url": row["url"] or "", "text": text[:preview] + ("…" if len(text) > preview else "")},
            })
    return items


def pair_items(store: Store, inputs: list[StageRef], preview: int, reward_model: str | None = None) -> list[dict[str, Any]]:
    """Every pair with its labels and signals; with reward_model (review_pairs.reward_model) also
    rm_chosen, rm_rejected and rm_margin from that model (tasks/review/reward.py)."""
    tok = common.ChatTokenizer.from_inputs(store, inputs, "review_pairs")
    (ref,) = _data_refs(inputs, L.PAIRS)
    index, rows = read_pairs(store, ref)
    margins = iter(_margins(store, reward_model, rows, index["pad_id"])) if reward_model else None

    def text(ids: list[int]) -> str:
        out = tok.tokenizer.decode(ids, skip_special_tokens=False)
        return out[:preview] + ("…" if len(out) > preview else "")

    items = []
    for split in SPLITS:
        for row in rows[split]:
            chosen, rejected = _reply(row, "chosen"), _reply(row, "rejected")
            signals = L.pair_signals(chosen, rejected)
            if margins is not None:
                signals.update(next(margins))
            risk, why = L.pair_risk(signals)
            items.append({
                "item_id": row["id"], "content_hash": row["id"], "risk": risk, "why": why,
                "labels": {"preference": "as_given"}, "signals": dict(signals, split=split),
                "preview": {"prompt": text(row["chosen"][: row["prompt_len"]]), "chosen": text(chosen), "rejected": text(rejected)},
            })
    return items


def _margins(store: Store, reward_model: str, rows: dict[str, list[dict[str, Any]]], pad_id: int) -> list[dict[str, Any]]:
    from lmfoundry.tasks.review import reward

    model, _ = reward.load(store, reward_model)
    return reward.pair_margins(model, [(row["chosen"], row["rejected"]) for split in SPLITS for row in rows[split]], pad_id)


def input_fingerprint(cfg: ReviewConfig) -> str:
    """A reward model given as a directory: its files' hash (a store version is named in the identity)."""
    from lmfoundry.tasks.review.reward import fingerprint

    return fingerprint(cfg.reward_model)


# ------------------------------------------------------------------ annotate


def _annotate(cfg: ReviewConfig, items: list[dict[str, Any]], out: StageDir, kind: str) -> AnnotateStats:
    table = pa.table({
        "id": [it["item_id"] for it in items],
        "content_hash": [it["content_hash"] for it in items],
        "risk": pa.array([it["risk"] for it in items], pa.float64()),
        "labels": [json.dumps(it["labels"], sort_keys=True) for it in items],
        "signals": [json.dumps(it["signals"], sort_keys=True) for it in items],
    })
    out.write_table(ANNOTATIONS_FILE, table)
    batch = L.sample(items, cfg.top_k, cfg.random_k, cfg.seed)
    out.write_json(SAMPLE_FILE, {"kind": kind, "population": len(items), "items": batch})
    counts: dict[str, Counter] = {}
    for it in items:
        for name, value in it["labels"].items():
            counts.setdefault(name, Counter())[value] += 1
    risks = [it["risk"] for it in items]
    return AnnotateStats(
        items=len(items),
        sampled_risk=sum(it["share"] == "risk" for it in batch),
        sampled_random=sum(it["share"] == "random" for it in batch),
        risk_mean=round(sum(risks) / len(risks), 6) if risks else 0.0,
        risk_max=max(risks, default=0.0),
        labels={name: dict(sorted(c.items())) for name, c in sorted(counts.items())},
    )


def run_annotate_docs(cfg: ReviewConfig, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> AnnotateStats:
    if cfg.reward_model:
        raise ValueError("review_docs.reward_model: a reward model scores preference pairs only; set review_pairs.reward_model instead")
    return _annotate(cfg, doc_items(out.store, _data_refs(inputs, L.DOCS), cfg.preview_chars), out, L.DOCS)


def run_annotate_pairs(cfg: ReviewConfig, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> AnnotateStats:
    return _annotate(cfg, pair_items(out.store, inputs, cfg.preview_chars, cfg.reward_model), out, L.PAIRS)


# ------------------------------------------------------------------ apply


def read_sample(store: Store, inputs: list[StageRef], kind: str) -> dict[str, Any]:
    refs = [r for r in inputs if r.stage == ANNOTATE[kind]]
    if len(refs) != 1:
        raise ValueError(f"review of {kind} needs exactly one '{ANNOTATE[kind]}' input, got {[r.stage for r in inputs]}")
    return store.reader(refs[0]).read_json(SAMPLE_FILE)


def _decisions(out: StageDir, inputs: list[StageRef], kind: str):
    batches = read_batches(out.store, kind)
    return read_sample(out.store, inputs, kind), latest_decisions(batches), [b for b in batches if b.version == out.version]


def _record(out: StageDir, kind: str, applied: list[tuple[str, Decision, Any]], gate: list) -> None:
    out.write_json(DECISIONS_FILE, {
        "kind": kind,
        "gate": [b.model_dump(mode="json", exclude={"decisions"}) | {"decided": len(b.decisions)} for b in gate],
        "applied": [d.model_dump(mode="json") | {"batch": b.batch, "source": b.source, "decided_at": b.created_at} for _, d, b in applied],
    })


def _stats(kind, sample, decided, population, items_in, items_out, applied) -> ReviewStats:
    count = Counter(d.decision for _, d, _ in applied)
    review = review_stats(sample["items"], {h: d for h, (d, _) in decided.items()}, population, kind)
    return ReviewStats(
        items_in=items_in, items_out=items_out, docs_out=items_out if kind == L.DOCS else None,
        rejected=count["reject"], relabelled=count["relabel"], approved=count["approve"], review=review,
    )


def run_review_docs(cfg: ReviewConfig, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> ReviewStats:
    sample, decided, gate = _decisions(out, inputs, L.DOCS)
    applied, items_in, items_out = [], 0, 0
    for i, (_, _, table) in enumerate(iter_doc_shards(out.store, _data_refs(inputs, L.DOCS))):
        rows = []
        for row in table.to_pylist():
            items_in += 1
            hit = decided.get(L.text_hash(row["text"] or ""))
            if hit is None:
                rows.append(row)
                continue
            d, batch = hit
            applied.append((row["id"], d, batch))
            if d.decision == "reject":
                continue
            meta = _meta(row["meta"])
            meta["review"] = {"decision": d.decision, "reviewer": d.reviewer, "reason": d.reason, "batch": batch.batch}
            if d.decision == "relabel":
                meta["labels"] = dict(L.doc_labels(meta, L.doc_signals(row["text"] or "", meta)), **d.labels)
            rows.append(dict(row, meta=meta))
        items_out += len(rows)
        out.write_table(shard_name(i), docs_table(rows))
    _record(out, L.DOCS, applied, gate)
    return _stats(L.DOCS, sample, decided, sample["population"], items_in, items_out, applied)


def run_review_pairs(cfg: ReviewConfig, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> ReviewStats:
    sample, decided, gate = _decisions(out, inputs, L.PAIRS)
    (ref,) = _data_refs(inputs, L.PAIRS)
    index, rows = read_pairs(out.store, ref)
    applied, kept = [], {}
    for split in SPLITS:
        kept[split] = []
        for row in rows[split]:
            hit = decided.get(row["id"])
            sides = ("chosen", "rejected")
            if hit is not None:
                d, batch = hit
                applied.append((row["id"], d, batch))
                if d.decision == "reject":
                    continue
                if d.labels.get("preference") == "swapped":
                    sides = ("rejected", "chosen")
            a, b = sides
            kept[split].append(EncodedPair(row[a], row[f"{a}_mask"], row[b], row[f"{b}_mask"], row["prompt_len"], row["id"], ""))
    index = dict(index, splits={split: write_split(out, split, kept[split]) for split in SPLITS}, pairs=sum(map(len, kept.values())))
    out.write_json(INDEX_FILE, index)
    _record(out, L.PAIRS, applied, gate)
    total = sum(map(len, rows.values()))
    return _stats(L.PAIRS, sample, decided, sample["population"], total, index["pairs"], applied)
