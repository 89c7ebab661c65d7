"""Machine labels, risk scores and the review sample: small pure functions (formulas in __init__.py)."""
from __future__ import annotations

import hashlib
import math
import random
from typing import Any

from lmfoundry.infra.config import HeuristicFilterConfig
from lmfoundry.tasks.filter.rules import build_steps, judge

DOCS, PAIRS = "docs", "pairs"
# the labels a reviewer may relabel, and their allowed values (None: any text, e.g. a language code)
LABELS: dict[str, dict[str, tuple[str, ...] | None]] = {
    DOCS: {"language": None, "quality": ("high", "low")},
    PAIRS: {"preference": ("as_given", "swapped")},
}
QUALITY_CUT = 0.5  # quality_score at or above: label "high"
UNKNOWN_SCORE = 0.5  # a score a document does not carry counts as this in the risk
_DEFAULT_RULES = build_steps(HeuristicFilterConfig())


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def _score(meta: dict[str, Any], key: str) -> float | None:
    value = meta.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def doc_signals(text: str, meta: dict[str, Any]) -> dict[str, Any]:
    """What earlier stages found about a document (meta) plus the default heuristic rules' verdict."""
    pii = meta.get("pii") if isinstance(meta.get("pii"), dict) else {}
    return {
        "language_score": _score(meta, "language_score"),
        "quality_score": _score(meta, "quality_score"),
        "pii": {str(k): int(v) for k, v in sorted(pii.items())},
        "heuristic": judge(text, _DEFAULT_RULES) or "pass",
        # a variant made by augment_docs: the reviewer sees which document it was made from
        **({"augmented_from": str(meta["augmented_from"]), "augmentation": str(meta.get("augmentation"))} if meta.get("augmented_from") else {}),
    }


def doc_labels(meta: dict[str, Any], signals: dict[str, Any]) -> dict[str, str]:
    q = signals["quality_score"]
    return {
        "language": str(meta.get("language") or "unknown"),
        "quality": "unknown" if q is None else ("high" if q >= QUALITY_CUT else "low"),
    }


def doc_risk(signals: dict[str, Any]) -> tuple[float, list[str]]:
    """(risk in [0, 1], the reasons that contributed most), see the formula in __init__.py."""
    q = signals["quality_score"]
    ls = signals["language_score"]
    pii = sum(signals["pii"].values())
    terms = {
        f"quality score {UNKNOWN_SCORE if q is None else q:.2f}": 0.35 * (1 - (UNKNOWN_SCORE if q is None else q)),
        f"{pii} PII placeholder(s)": 0.25 * min(1.0, pii / 3),
        f"fails default rule: {signals['heuristic']}": 0.25 * (signals["heuristic"] != "pass"),
        f"language score {UNKNOWN_SCORE if ls is None else ls:.2f}": 0.15 * (1 - (UNKNOWN_SCORE if ls is None else ls)),
    }
    return round(sum(terms.values()), 6), [why for why, value in terms.items() if value >= 0.1]


def pair_signals(chosen_reply: list[int], rejected_reply: list[int]) -> dict[str, Any]:
    return {
        "chosen_tokens": len(chosen_reply),
        "rejected_tokens": len(rejected_reply),
        "length_diff": len(chosen_reply) - len(rejected_reply),
        "same_reply": chosen_reply == rejected_reply,
    }


def pair_risk(signals: dict[str, Any]) -> tuple[float, list[str]]:
    """Without a reward model: the length and same-reply terms only (the formula versions were
    committed with). With one (signals["rm_margin"]): a term for the model preferring the rejected
    side, max(0, tanh(-margin / 2)) = max(0, 2 P_BT(rejected better) - 1) under the Bradley-Terry
    model the reward_model stage trains, so 0 at a margin >= 0, 0.46 at -1, 0.76 at -2."""
    longer = max(signals["chosen_tokens"], signals["rejected_tokens"], 1)
    shorter_by = min(1.0, max(0.0, -signals["length_diff"] / longer))
    length_why, same_why = f"chosen reply {-signals['length_diff']} tokens shorter", "both replies are the same"
    if "rm_margin" not in signals:
        terms = {length_why: 0.7 * shorter_by, same_why: 0.3 * bool(signals["same_reply"])}
    else:
        margin = signals["rm_margin"]
        terms = {
            f"reward model prefers the rejected reply (margin {margin:.2f})": 0.5 * max(0.0, math.tanh(-margin / 2)),
            length_why: 0.35 * shorter_by,
            same_why: 0.15 * bool(signals["same_reply"]),
        }
    return round(sum(terms.values()), 6), [why for why, value in terms.items() if value >= 0.1]


def sample(items: list[dict[str, Any]], top_k: int, random_k: int, seed: int) -> list[dict[str, Any]]:
    """The review batch: the top_k riskiest items (ties by content hash), then random_k drawn
    uniformly from the rest. Depends on the items' contents only, never on their order."""
    ranked = sorted(items, key=lambda it: (-it["risk"], it["content_hash"]))
    top = [dict(it, share="risk") for it in ranked[:top_k]]
    rest = sorted(ranked[top_k:], key=lambda it: it["content_hash"])
    drawn = random.Random(seed).sample(rest, min(random_k, len(rest)))
    picked = top + [dict(it, share="random") for it in sorted(drawn, key=lambda it: it["content_hash"])]
    return [dict(it, n=i + 1) for i, it in enumerate(picked)]


def parse_relabel(text: str, kind: str, where: str) -> dict[str, str]:
    """'language=de, quality=low' -> {"language": "de", "quality": "low"}; an unknown label or
    value raises a ValueError naming `where` (the item) and the allowed ones."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.replace("\n", ",").split(",")):
        if not part:
            continue
        name, sep, value = (s.strip() for s in part.partition("="))
        allowed = LABELS[kind]
        if not sep or not value or name not in allowed:
            raise ValueError(f"{where}: relabel '{part}' is not LABEL=VALUE with LABEL one of {', '.join(allowed)}")
        if allowed[name] is not None and value not in allowed[name]:
            raise ValueError(f"{where}: {name}={value} is not allowed; {name} is one of {', '.join(allowed[name])}")
        out[name] = value
    return out
