"""`lmf eval pii FILE`: precision, recall and F1 per entity type of the PII detectors.

    lmf eval pii labelled.jsonl [--set pii.phone_regions='[US, DE]'] [--min-overlap 0.5] [--json]

FILE is JSONL, one labelled text per line, in the span format of Presidio's evaluator::

    {"text": "Mail bob@example.org", "spans": [{"entity_type": "EMAIL_ADDRESS", "start": 5, "end": 20}]}

(``full_text`` / ``start_position`` / ``end_position`` are accepted too, and ``type`` for
``entity_type``). Presidio's entity
names are mapped to ours: EMAIL_ADDRESS->EMAIL, PHONE_NUMBER->PHONE, IP_ADDRESS->IP,
IBAN_CODE->IBAN, ORG->ORGANIZATION, GPE/LOC->LOCATION.

Span matching rule: a predicted span is a true positive when a gold span of the same entity
type overlaps it with intersection-over-union >= ``--min-overlap`` (default 0.5; 0 means any
overlap). Each gold span matches at most one prediction and vice versa, best overlap first;
unmatched predictions are false positives, unmatched gold spans false negatives. Partial
detections therefore count only when they cover most of the value, yet a detector is not
punished for leaving out a trailing "x123" extension the labeller included.

The PII settings come from the pipeline config (``--config``, ``--set pii.x=y``), so the
numbers describe exactly what the ``pii_scrub`` stage would remove. Exit code 0 after
printing the table; 2 when the file is missing or malformed (the message names the line).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from lmfoundry.infra.config import ConfigError, PiiConfig, load_config

ENTITY_ALIASES = {
    "EMAIL_ADDRESS": "EMAIL",
    "PHONE_NUMBER": "PHONE",
    "IP_ADDRESS": "IP",
    "IBAN_CODE": "IBAN",
    "ORG": "ORGANIZATION",
    "GPE": "LOCATION",
    "LOC": "LOCATION",
    "PER": "PERSON",
}


def canonical_type(name: str) -> str:
    return ENTITY_ALIASES.get(name.upper(), name.upper())


@dataclass(frozen=True)
class GoldSpan:
    entity_type: str
    start: int
    end: int


@dataclass(frozen=True)
class LabelledText:
    text: str
    spans: tuple[GoldSpan, ...]


@dataclass
class TypeScore:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"precision": round(self.precision, 4), "recall": round(self.recall, 4), "f1": round(self.f1, 4),
                "tp": self.tp, "fp": self.fp, "fn": self.fn, "support": self.tp + self.fn}


@dataclass
class Scores:
    by_type: dict[str, TypeScore] = field(default_factory=dict)

    def total(self) -> TypeScore:
        t = TypeScore()
        for s in self.by_type.values():
            t.tp, t.fp, t.fn = t.tp + s.tp, t.fp + s.fp, t.fn + s.fn
        return t

    def f1(self) -> dict[str, float]:
        return {name: round(s.f1, 4) for name, s in sorted(self.by_type.items())}

    def as_dict(self) -> dict[str, Any]:
        return {**{name: s.as_dict() for name, s in sorted(self.by_type.items())}, "ALL": self.total().as_dict()}


class LabelError(ValueError):
    """A labelled file that cannot be read; the message names the line."""


def parse_record(obj: Any, where: str) -> LabelledText:
    if not isinstance(obj, dict):
        raise LabelError(f"{where}: expected a JSON object with 'text' and 'spans'")
    text = obj.get("text", obj.get("full_text"))
    if not isinstance(text, str):
        raise LabelError(f"{where}: missing string field 'text'")
    spans = []
    for i, raw in enumerate(obj.get("spans") or []):
        try:
            start = int(raw.get("start", raw.get("start_position")))
            end = int(raw.get("end", raw.get("end_position")))
            kind = raw["entity_type"] if "entity_type" in raw else raw["type"]  # both spellings are common
            span = GoldSpan(canonical_type(str(kind)), start, end)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise LabelError(f"{where}: span {i} needs entity_type (or type), start and end ({exc!r})") from exc
        if not 0 <= start < end <= len(text):
            raise LabelError(f"{where}: span {i} [{start}, {end}) lies outside the text of length {len(text)}")
        spans.append(span)
    return LabelledText(text, tuple(spans))


def load_labelled(path: str | Path) -> list[LabelledText]:
    path = Path(path)
    if not path.exists():
        raise LabelError(f"labelled file '{path}' does not exist")
    records = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LabelError(f"{path}:{n}: not valid JSON ({exc})") from exc
            records.append(parse_record(obj, f"{path}:{n}"))
    return records


def _iou(a: tuple[int, int], b: tuple[int, int]) -> float:
    inter = min(a[1], b[1]) - max(a[0], b[0])
    if inter <= 0:
        return 0.0
    return inter / (max(a[1], b[1]) - min(a[0], b[0]))


def match_text(gold: Iterable[GoldSpan], predicted: Iterable[GoldSpan], min_overlap: float, scores: Scores) -> None:
    """Add one text's true/false positives and false negatives to `scores` (rule: module docstring)."""
    gold, predicted = list(gold), list(predicted)
    pairs = sorted(
        ((_iou((g.start, g.end), (p.start, p.end)), gi, pi)
         for gi, g in enumerate(gold) for pi, p in enumerate(predicted) if g.entity_type == p.entity_type),
        reverse=True,
    )
    used_gold, used_pred = set(), set()
    for overlap, gi, pi in pairs:
        if overlap <= 0 or overlap < min_overlap or gi in used_gold or pi in used_pred:
            continue
        used_gold.add(gi)
        used_pred.add(pi)
        scores.by_type.setdefault(gold[gi].entity_type, TypeScore()).tp += 1
    for gi, g in enumerate(gold):
        if gi not in used_gold:
            scores.by_type.setdefault(g.entity_type, TypeScore()).fn += 1
    for pi, p in enumerate(predicted):
        if pi not in used_pred:
            scores.by_type.setdefault(p.entity_type, TypeScore()).fp += 1


def score(records: list[LabelledText], predictions: list[list[GoldSpan]], min_overlap: float = 0.5,
          types: set[str] | None = None) -> Scores:
    scores = Scores()
    for record, predicted in zip(records, predictions, strict=True):
        keep = (lambda s: s.entity_type in types) if types else (lambda s: True)
        match_text(filter(keep, record.spans), filter(keep, predicted), min_overlap, scores)
    return scores


def predict(records: list[LabelledText], detect: Callable[[str], Iterable[Any]]) -> list[list[GoldSpan]]:
    """Run a detector returning objects with entity_type/start/end over every text."""
    return [[GoldSpan(canonical_type(s.entity_type), s.start, s.end) for s in detect(r.text)] for r in records]


def evaluate(records: list[LabelledText], cfg: PiiConfig, min_overlap: float = 0.5, types: set[str] | None = None) -> Scores:
    from lmfoundry.tasks.pii.detectors import find_pii

    return score(records, predict(records, lambda text: find_pii(text, cfg)), min_overlap, types)


def format_table(scores: Scores) -> str:
    lines = [f"{'entity':<14}{'precision':>10}{'recall':>10}{'f1':>8}{'tp':>7}{'fp':>7}{'fn':>7}"]
    rows = sorted(scores.by_type.items()) + [("ALL (micro)", scores.total())]
    for name, s in rows:
        lines.append(f"{name:<14}{s.precision:>10.3f}{s.recall:>10.3f}{s.f1:>8.3f}{s.tp:>7}{s.fp:>7}{s.fn:>7}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmf eval pii", description="precision/recall/F1 per entity type on labelled JSONL")
    parser.add_argument("file", help="JSONL with text and spans (Presidio evaluator format)")
    parser.add_argument("--config", help="YAML preset whose pii section is evaluated (default: configs/demo.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. pii.ip_public_only=true")
    parser.add_argument("--min-overlap", type=float, default=0.5, help="IoU a prediction needs with a gold span of its type (0: any overlap)")
    parser.add_argument("--types", help="comma-separated entity types to score (default: all in gold or predicted)")
    parser.add_argument("--json", action="store_true", help="also print the scores as one JSON line")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set).pii
        records = load_labelled(args.file)
    except (ConfigError, LabelError) as exc:
        print(f"lmf eval pii: {exc}", file=sys.stderr)
        return 2
    types = {canonical_type(t) for t in args.types.split(",")} if args.types else None
    scores = evaluate(records, cfg, args.min_overlap, types)
    print(f"{len(records)} texts, {sum(len(r.spans) for r in records)} gold spans, match: same type and IoU >= {args.min_overlap}")
    print(format_table(scores))
    if args.json:
        print(json.dumps(scores.as_dict()))
    return 0
