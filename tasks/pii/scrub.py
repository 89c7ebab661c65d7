"""Stage `pii_scrub`: replace e-mails, phone numbers, IPs, cards, IBANs, SSNs and secrets in every document.

Run alone: ``lmf run --until pii_scrub``. Measure the detectors on labelled text:
``lmf eval pii FILE`` (tasks/pii/evaluate.py); the detectors themselves live in tasks/pii/detectors.py,
the replacement in tasks/pii/replace.py.

Per input shard i (output shard i mirrors it, documents in the same order):

    data/part-i.parquet   the documents with `text` and `url` scrubbed; a document that had
                          PII gets meta["pii"] = {TYPE: count}
    audit/part-i.jsonl    up to pii.audit_per_shard found values for a reviewer: type, detector,
                          the value masked (first and last character and length), the
                          replacement and the scrubbed text around it

The completion marker of each data shard carries that shard's counts per entity type, so the
manifest lists them per shard (files -> data/part-i.parquet -> pii) next to the totals in
stats. Documents without text are dropped and counted (missing_text).

A scrubbed text is scanned again until nothing is found (a replacement can expose a value that
an overlapping, higher-priority span hid); a document still not clean after three rounds is
dropped and counted (pii_not_removable), so no detectable value reaches later stages.

Pseudonym mode (pii.replacement=pseudonym) reads its HMAC key from the environment variable
pii.key_env. The key is never written anywhere; the stage version includes an HMAC-derived
fingerprint of it (input_fingerprint), so a new key gives a new version instead of reusing
pseudonyms made with the old one.
"""
from __future__ import annotations

import hashlib
import heapq
import json
from collections import Counter
from functools import partial
from typing import Any

import pyarrow as pa
from pydantic import BaseModel

from lmfoundry.infra.config import ComputeConfig, PiiConfig
from lmfoundry.infra.docs import DOC_SCHEMA, shard_name, doc_shards
from lmfoundry.infra.parallel import map_pending
from lmfoundry.infra.store import StageDir, StageRef
from lmfoundry.tasks.pii.detectors import PiiSpan, scanner_for
from lmfoundry.tasks.pii.replace import Replacer, key_fingerprint, mask_value, replace_spans

CODE_VERSION = "2"  # 2: bracketed phones, 4-4-4-3 cards, IPv6 after a label, no phones in card-like digits
MAX_ROUNDS = 3
CONTEXT_CHARS = 40


class PiiScrubStats(BaseModel):
    shards: int
    docs_in: int
    docs_out: int
    docs_with_pii: int
    entities: dict[str, int]  # replaced values per entity type, all shards
    detectors: dict[str, int]  # the same by finer detector, e.g. "SECRET/aws_access_key"
    skipped: dict[str, int]  # dropped documents by reason
    replacement: str
    audit_samples: int


def input_fingerprint(cfg: PiiConfig) -> str:
    """What the output depends on beyond config and inputs: the pseudonym key and the NER model."""
    parts = []
    if cfg.replacement == "pseudonym":
        parts.append(f"pseudonym-key:{key_fingerprint(cfg)}")
    if cfg.ner_model:
        parts.append(f"ner-model:{_model_version(cfg.ner_model)}")
    return ";".join(parts)


def _model_version(model: str) -> str:
    from importlib import metadata
    from pathlib import Path

    meta = Path(model) / "meta.json"
    if meta.exists():
        return hashlib.sha256(meta.read_bytes()).hexdigest()[:16]
    try:
        return f"{model}=={metadata.version(model)}"
    except metadata.PackageNotFoundError:
        return model  # not installed: the stage itself fails with instructions


def audit_name(index: int) -> str:
    return f"audit/part-{index:05d}.jsonl"


class _Audit:
    """A deterministic sample of found values: the `size` whose (doc id, position) hash is lowest."""

    def __init__(self, size: int):
        self.size = size
        self.heap: list[tuple[int, int, dict[str, Any]]] = []  # (-rank, arrival, entry): largest rank on top
        self.arrivals = 0

    def offer(self, doc_id: str, span: PiiSpan, original: str, scrubbed: str, placed: tuple[int, int]) -> None:
        rank = int.from_bytes(hashlib.blake2b(f"{doc_id}\x00{span.start}".encode(), digest_size=8).digest(), "big")
        if self.size == 0 or (len(self.heap) == self.size and rank >= -self.heap[0][0]):
            return
        entry = {
            "doc_id": doc_id,
            "entity_type": span.entity_type,
            "detector": span.detector,
            "masked_value": mask_value(original[span.start:span.end], span.entity_type),
            "replacement": scrubbed[placed[0]:placed[1]],
            "context": scrubbed[max(0, placed[0] - CONTEXT_CHARS):placed[1] + CONTEXT_CHARS],
        }
        self.arrivals += 1
        item = (-rank, self.arrivals, entry)
        if len(self.heap) < self.size:
            heapq.heappush(self.heap, item)
        else:
            heapq.heapreplace(self.heap, item)

    def entries(self) -> list[dict[str, Any]]:
        return [entry for _, _, entry in sorted(self.heap, key=lambda item: (-item[0], item[1]))]


def scrub_document(text: str, cfg: PiiConfig, replace: Replacer) -> tuple[str | None, list[tuple[PiiSpan, str, str, tuple[int, int]]]]:
    """(scrubbed text or None when it cannot be made clean, [(span, text it was found in, text after, where)])."""
    scanner = scanner_for(cfg)
    found = []
    for _ in range(MAX_ROUNDS):
        spans = scanner.find(text)
        if not spans:
            return text, found
        scrubbed, placed = replace_spans(text, spans, replace)
        found.extend((span, text, scrubbed, where) for span, where in zip(spans, placed))
        text = scrubbed
    return (text, found) if not scanner.find(text) else (None, found)


def url_section(cfg: PiiConfig) -> PiiConfig | None:
    """The detectors applied to the url column: the enabled ones among `url_entities`."""
    entities = [e for e in cfg.entities if e in cfg.url_entities]
    return cfg.model_copy(update={"entities": entities, "ner_model": None}) if entities else None


def _with_pii_meta(meta: str | None, counts: Counter) -> str:
    try:
        obj = json.loads(meta) if meta else {}
    except json.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        return meta  # leave unknown metadata alone rather than lose it
    obj["pii"] = dict(sorted(counts.items()))
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


def scrub_shard(cfg: PiiConfig, out: StageDir, shards: list[tuple[StageRef, str]], index: int) -> None:
    ref, path = shards[index]
    rows = out.store.reader(ref).read_table(path).to_pylist()
    replace = Replacer(cfg)
    url_cfg = url_section(cfg)
    audit = _Audit(cfg.audit_per_shard)
    entities, detectors, skipped = Counter(), Counter(), Counter()
    kept, docs_with_pii = [], 0
    for row in rows:
        if not isinstance(row.get("text"), str):
            skipped["missing_text"] += 1
            continue
        text, found = scrub_document(row["text"], cfg, replace)
        url, url_found = scrub_document(row.get("url") or "", url_cfg, replace) if url_cfg else (row.get("url"), [])
        if text is None or url is None:
            skipped["pii_not_removable"] += 1
            continue
        doc_counts = Counter(span.entity_type for span, *_ in found + url_found)
        if doc_counts:
            docs_with_pii += 1
            entities.update(doc_counts)
            detectors.update(f"{span.entity_type}/{span.detector}" for span, *_ in found + url_found)
            for span, before, after, where in found:
                audit.offer(str(row.get("id")), span, before, after, where)
            row = {**row, "text": text, "url": url, "meta": _with_pii_meta(row.get("meta"), doc_counts)}
        kept.append(row)
    audit_lines = "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in audit.entries())
    out.write_bytes(audit_name(index), audit_lines.encode(), rows=len(audit.heap))
    out.write_table(
        shard_name(index),
        pa.Table.from_pylist(kept, schema=DOC_SCHEMA),
        docs_in=len(rows),
        docs_with_pii=docs_with_pii,
        pii=dict(sorted(entities.items())),
        detectors=dict(sorted(detectors.items())),
        skipped=dict(sorted(skipped.items())),
    )


def run_pii_scrub(cfg: PiiConfig, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> PiiScrubStats:
    shards = doc_shards(out.store, inputs)
    Replacer(cfg)  # a missing pseudonym key fails here, before any shard is touched
    map_pending(partial(scrub_shard, cfg, out, shards), len(shards), shard_name, out, compute, "scrub")
    markers = [out.marker(shard_name(i)) for i in range(len(shards))]
    entities, detectors, skipped = Counter(), Counter(), Counter()
    for m in markers:
        entities.update(m["pii"])
        detectors.update(m["detectors"])
        skipped.update(m["skipped"])
    audit_files = [out.marker(audit_name(i)) for i in range(len(shards))]
    return PiiScrubStats(
        shards=len(shards),
        docs_in=sum(m["docs_in"] for m in markers),
        docs_out=sum(m["rows"] for m in markers),
        docs_with_pii=sum(m["docs_with_pii"] for m in markers),
        entities=dict(sorted(entities.items())),
        detectors=dict(sorted(detectors.items())),
        skipped=dict(sorted(skipped.items())),
        replacement=cfg.replacement,
        audit_samples=sum(a["rows"] or 0 for a in audit_files),
    )
