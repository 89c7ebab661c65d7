"""Stages `train_quality_classifier` and `quality_filter`: a fastText model of "looks like
the reference documents", trained and versioned by the pipeline, then used to filter.

Training (`run_train_quality_classifier`)
    Positives: pieces (about `example_chars` characters, cut at paragraph breaks) of the
    reference documents named by `quality.positive` (text, JSONL or Parquet files, read like
    `ingest` reads them). Negatives: pieces of this stage's input documents. Both are sampled
    by a seeded hash, so the same inputs and seed give the same examples in any order; a
    seeded hash also splits off `validation_fraction` for validation. The model is trained in
    a fresh subprocess (thread=1, seed): fasttext-numpy2 is deterministic in a fresh process
    but a second training in the same process can diverge or differ. Outputs: `model.bin`,
    `classifier.json` (labels, threshold, metrics), `validation.parquet` (the validation
    examples with the scores the freshly trained model gave them). Stats: example counts,
    precision / recall / F1 on validation at the threshold that maximises F1.

    With `quality.model_path` set, nothing is trained: the stage records that the given
    model is used, and `quality_filter` loads that file.

Filtering (`run_quality_filter`)
    Finds the classifier among its inputs by `ref.stage == "train_quality_classifier"`
    (the other inputs are documents), scores every document in batches (probability of
    `positive_label`, stored as `quality_score` in meta), and keeps scores >= the threshold
    (`quality.threshold`, else the one chosen on validation, else 0.5) or, with
    `keep_top_fraction`, the best-scored fraction (ties at the cut are all kept). Dropped
    documents go to `removed/` with their reason.

Enable in a preset::

    quality:
      enabled: true
      positive: {name: pydoc, paths: ["{stdlib}/pydoc_data/topics.py"]}
      keep_top_fraction: 0.5

then ``lmf run --until quality_filter``. Score a text by hand:
``python -m lmfoundry.tasks.filter.quality score MODEL.bin < page.txt``.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
import subprocess
import sys
import tempfile
import threading
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from lmfoundry.infra.files import InputError
from lmfoundry.infra.config import REPO_ROOT, ComputeConfig, QualityClassifierConfig, expand_path
from lmfoundry.infra.docs import DATA_PREFIX, DOC_SCHEMA, shard_name, doc_shards
from lmfoundry.infra.parallel import map_pending
from lmfoundry.infra.store import StageDir, StageRef
from lmfoundry.tasks.filter.words import split_words

CODE_VERSION = "1"
log = logging.getLogger("lmfoundry.quality")

CLASSIFIER_STAGE = "train_quality_classifier"
NEGATIVE_LABEL = "__label__other"
DROP_REASON = "low_quality_score"
REMOVED_SCHEMA = DOC_SCHEMA.append(pa.field("reason", pa.string()))


class QualityError(InputError):
    """The classifier cannot be trained or loaded; the message says what to change."""


class TrainQualityStats(BaseModel):
    trained: bool
    note: str
    positive_examples: int = 0
    negative_examples: int = 0
    train_examples: int = 0
    validation_examples: int = 0
    threshold: float = 0.5
    precision: float = 0.0
    recall: float = 0.0
    f1: float = 0.0
    model_bytes: int = 0
    warnings: list[str] = []


class QualityFilterStats(BaseModel):
    model: str
    mode: str  # "threshold" or "top_fraction"
    threshold: float
    docs_in: int
    docs_out: int
    kept_fraction: float
    dropped: dict[str, int]
    score_quantiles: dict[str, float]  # p10, p50, p90 of all scores
    above_trained_threshold: float | None = None  # share of documents the classifier itself calls good
    warnings: list[str] = []


# --------------------------------------------------------------------------- text


def normalize(text: str) -> str:
    """One lowercase line of space-separated words and punctuation: what fastText sees."""
    return " ".join(split_words(text.lower()))


def pieces(text: str, size: int) -> list[str]:
    """The text cut into pieces of about `size` characters at paragraph breaks (a longer
    paragraph at word breaks); a piece is never empty."""
    out: list[str] = []
    current = ""
    for block in _blocks(text, size):
        if current and len(current) + len(block) > size:
            out.append(current)
            current = ""
        current = f"{current}\n\n{block}" if current else block
    if current.strip():
        out.append(current)
    return [p for p in out if p.strip()]


def _blocks(text: str, size: int) -> Iterator[str]:
    for paragraph in text.split("\n\n"):
        if len(paragraph) <= size:
            yield paragraph
            continue
        words = paragraph.split()
        per_block = max(size // 8, 1)  # about 8 characters per word and space
        for start in range(0, len(words), per_block):
            yield " ".join(words[start : start + per_block])


def input_fingerprint(cfg: QualityClassifierConfig) -> str:
    """Changes when a positive file or the model file changes (size + mtime), like make."""
    from lmfoundry.tasks.acquire.ingest import list_source_files

    lines = []
    if cfg.positive is not None:
        lines += [f"{f.url}\t{f.size}\t{f.stamp}" for f in list_source_files(cfg.positive)]
    if cfg.model_path is not None:
        path = Path(expand_path(cfg.model_path))
        if not path.is_file():
            raise QualityError(f"quality.model_path '{cfg.model_path}' is not a file; point it at a fastText .bin/.ftz model")
        stat = path.stat()
        lines.append(f"{path}\t{stat.st_size}\t{stat.st_mtime}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest() if lines else ""


# --------------------------------------------------------------------------- sampling


def _sample_key(seed: int, *parts: Any) -> int:
    digest = hashlib.blake2b("\x00".join(map(str, (seed, *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def sample_examples(examples: Iterable[tuple[str, str]], limit: int, seed: int) -> list[str]:
    """The `limit` (key, text) examples with the smallest seeded hashes, in hash order:
    the same set whatever order the examples arrive in, with memory bounded by `limit`."""
    heap: list[tuple[int, str, str]] = []  # max-heap by negated hash
    for key, text in examples:
        h = _sample_key(seed, key)
        if len(heap) < limit:
            heapq.heappush(heap, (-h, key, text))
        elif -heap[0][0] > h:
            heapq.heapreplace(heap, (-h, key, text))
    return [text for _, _, text in sorted(heap, key=lambda item: (-item[0], item[1]))]


def positive_examples(cfg: QualityClassifierConfig) -> Iterator[tuple[str, str]]:
    from lmfoundry.tasks.acquire.ingest import list_source_files, read_file

    for f in list_source_files(cfg.positive):
        for doc, reason in read_file(f):
            if reason or not doc["text"].strip():
                continue
            for piece in pieces(doc["text"], cfg.example_chars):
                yield piece, piece  # keyed by content: the sample does not depend on where the files live


def negative_examples(out: StageDir, refs: list[StageRef], cfg: QualityClassifierConfig) -> Iterator[tuple[str, str]]:
    for ref in refs:
        reader = out.store.reader(ref)
        for path in reader.files(DATA_PREFIX, ".parquet"):
            table = reader.read_table(path, columns=["id", "text"])
            for doc_id, text in zip(table["id"].to_pylist(), table["text"].to_pylist()):
                if not isinstance(text, str) or not text.strip():
                    continue
                for i, piece in enumerate(pieces(text, cfg.example_chars)):
                    yield f"{doc_id}\x00{i}", piece


def split_validation(texts: list[str], fraction: float, seed: int, label: str) -> tuple[list[str], list[str]]:
    """Seeded split; each side keeps at least one example."""
    held = [_sample_key(seed, "validation", label, i, t) / 2**64 < fraction for i, t in enumerate(texts)]
    if all(held) or not any(held):
        held = [i % max(round(1 / fraction), 2) == 0 for i in range(len(texts))]
    train = [t for t, h in zip(texts, held) if not h]
    valid = [t for t, h in zip(texts, held) if h]
    return train, valid


# --------------------------------------------------------------------------- fastText


def fasttext_params(cfg: QualityClassifierConfig) -> dict[str, Any]:
    return {
        "epoch": cfg.epochs,
        "lr": cfg.lr,
        "dim": cfg.dim,
        "wordNgrams": cfg.word_ngrams,
        "bucket": cfg.bucket,
        "minCount": cfg.min_count,
        "seed": cfg.seed,
        "thread": 1,
        "verbose": 0,
    }


def train_in_subprocess(train_file: Path, model_file: Path, validation_file: Path, scores_file: Path, params: dict, positive_label: str) -> None:
    """Train (and score the validation lines) in a fresh Python process; see the module docstring."""
    job = {
        "train": str(train_file),
        "model": str(model_file),
        "validation": str(validation_file),
        "scores": str(scores_file),
        "params": params,
        "positive_label": positive_label,
    }
    done = subprocess.run(
        [sys.executable, "-m", "lmfoundry.tasks.filter.quality", "train", json.dumps(job)], cwd=REPO_ROOT, capture_output=True, text=True
    )
    if done.returncode != 0:
        detail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
        hint = " (training diverged: lower quality.lr)" if "NaN" in done.stderr else ""
        raise QualityError(f"fastText training failed: {detail}{hint}")


def _train_child(job: dict) -> None:
    import fasttext

    model = fasttext.train_supervised(input=job["train"], **job["params"])
    model.save_model(job["model"])
    lines = Path(job["validation"]).read_text(encoding="utf-8").splitlines()
    scores = positive_scores(model, lines, job["positive_label"])
    Path(job["scores"]).write_text(json.dumps(scores))


def positive_scores(model: Any, lines: list[str], positive_label: str) -> list[float]:
    """Probability of `positive_label` for each normalised line (0 when the model lacks it)."""
    if not lines:
        return []
    labels, probs = model.predict(lines, k=-1)
    return [float(dict(zip(ls, ps)).get(positive_label, 0.0)) for ls, ps in zip(labels, probs)]


_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.Lock()


def load_model(path: str) -> Any:
    """A fastText model, loaded once per process (prediction is read-only)."""
    with _MODELS_LOCK:
        if path not in _MODELS:
            import fasttext

            try:
                _MODELS[path] = fasttext.load_model(path)
            except ValueError as exc:
                raise QualityError(f"cannot load fastText model '{path}': {exc}") from exc
        return _MODELS[path]


# --------------------------------------------------------------------------- metrics


def best_threshold(scores: list[float], labels: list[bool]) -> dict[str, float]:
    """The threshold (keep scores >= it) with the highest F1 on these examples, and its
    precision, recall and F1; on a tie, the highest such threshold."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ranked = np.asarray(scores, dtype=np.float64)[order]
    truth = np.asarray(labels, dtype=bool)[order]
    positives = int(truth.sum())
    if positives == 0 or len(scores) == 0:
        return {"threshold": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    true_pos = np.cumsum(truth)
    kept = np.arange(1, len(ranked) + 1)
    last_of_tie = np.append(ranked[1:] != ranked[:-1], True)  # a cut can only fall between different scores
    precision = true_pos / kept
    recall = true_pos / positives
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    f1 = np.where(last_of_tie, f1, -1.0)
    best = int(np.argmax(f1))
    return {"threshold": float(ranked[best]), "precision": float(precision[best]), "recall": float(recall[best]), "f1": float(f1[best])}


# --------------------------------------------------------------------------- stage: train


def run_train_quality_classifier(cfg: QualityClassifierConfig, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> TrainQualityStats:
    if cfg.model_path is not None:
        note = f"quality.model_path is set: using {cfg.model_path}, nothing trained"
        out.write_json("classifier.json", {"model_path": cfg.model_path, "positive_label": cfg.positive_label, "trained": False})
        return TrainQualityStats(trained=False, note=note)
    if cfg.positive is None:
        raise QualityError("train_quality_classifier needs quality.positive (reference documents) or quality.model_path")
    documents = [ref for ref in inputs if ref.stage != CLASSIFIER_STAGE]
    if not documents:
        raise QualityError("train_quality_classifier has no document input to sample negatives from; run it after a document stage")

    positives = sample_examples(positive_examples(cfg), cfg.max_examples_per_class, cfg.seed)
    wanted = max(1, round(len(positives) * cfg.negative_ratio))
    negatives = sample_examples(negative_examples(out, documents, cfg), wanted, cfg.seed)
    if len(positives) < 10 or len(negatives) < 10:
        raise QualityError(
            f"too few training examples ({len(positives)} positive, {len(negatives)} negative pieces; need 10 of each): "
            "point quality.positive at more reference text, lower quality.example_chars, or feed more documents"
        )
    pos_train, pos_valid = split_validation(positives, cfg.validation_fraction, cfg.seed, "positive")
    neg_train, neg_valid = split_validation(negatives, cfg.validation_fraction, cfg.seed, "negative")
    train_lines = [f"{cfg.positive_label} {normalize(t)}" for t in pos_train] + [f"{NEGATIVE_LABEL} {normalize(t)}" for t in neg_train]
    # a seeded shuffle: fastText learns online, so example order matters for the result
    train_lines.sort(key=lambda line: _sample_key(cfg.seed, "order", line))
    valid_texts = [normalize(t) for t in pos_valid + neg_valid]
    valid_labels = [True] * len(pos_valid) + [False] * len(neg_valid)

    with tempfile.TemporaryDirectory(prefix="lmf-quality-") as tmp:
        tmp_dir = Path(tmp)
        (tmp_dir / "train.txt").write_text("\n".join(train_lines) + "\n", encoding="utf-8")
        (tmp_dir / "valid.txt").write_text("\n".join(valid_texts) + "\n", encoding="utf-8")
        train_in_subprocess(
            tmp_dir / "train.txt", tmp_dir / "model.bin", tmp_dir / "valid.txt", tmp_dir / "scores.json", fasttext_params(cfg), cfg.positive_label
        )
        scores = json.loads((tmp_dir / "scores.json").read_text())
        out.put_file(tmp_dir / "model.bin", "model.bin")
        model_bytes = (tmp_dir / "model.bin").stat().st_size

    metrics = best_threshold(scores, valid_labels)
    out.write_table(
        "validation.parquet",
        pa.table({"text": valid_texts, "positive": valid_labels, "score": pa.array(scores, pa.float64())}),
    )
    out.write_json(
        "classifier.json",
        {"trained": True, "positive_label": cfg.positive_label, "negative_label": NEGATIVE_LABEL, "normalize": "lowercase, lmfoundry.tasks.filter.words.split_words, joined by spaces", **metrics},
    )
    stats = TrainQualityStats(
        trained=True,
        note=f"trained on {len(train_lines)} examples; threshold maximises validation F1",
        positive_examples=len(positives),
        negative_examples=len(negatives),
        train_examples=len(train_lines),
        validation_examples=len(valid_texts),
        model_bytes=model_bytes,
        warnings=[TRIVIAL_SEPARATION] if metrics["f1"] >= 0.999 else [],
        **{k: round(v, 6) for k, v in metrics.items()},
    )
    log.info("quality classifier: %s", stats.model_dump())
    for warning in stats.warnings:
        log.warning("train_quality_classifier: %s", warning)
    return stats


TRIVIAL_SEPARATION = (
    "validation F1 is 1.0: the reference and the sampled negatives are trivially separable (another format, "
    "topic or language?), so the score may measure that difference rather than quality; use a reference set that "
    "looks like the documents you want to keep"
)


def degenerate_scores(scores: np.ndarray, trained_threshold: float | None) -> tuple[float | None, list[str]]:
    """The share of documents at or above the classifier's own validated threshold, and a warning
    when it is tiny: the classifier then rejects (nearly) all of the data, and its ranking inside
    the data, which a top-fraction filter relies on, carries little signal."""
    if trained_threshold is None or not len(scores):
        return None, []
    above = float(np.mean(scores >= trained_threshold))
    if len(scores) >= 20 and above < 0.05:
        return above, [
            f"only {above:.1%} of the documents reach the classifier's validated threshold {trained_threshold:.3f}: "
            "it tells the reference apart from nearly all of your data, so which of them it keeps is close to arbitrary; "
            "use a reference set closer to what you want to keep"
        ]
    return above, []


# --------------------------------------------------------------------------- stage: filter


def classifier_model(cfg: QualityClassifierConfig, out: StageDir, inputs: list[StageRef]) -> tuple[str, str, float]:
    """(local model path, a name for the manifest, the threshold it was trained with)."""
    refs = [ref for ref in inputs if ref.stage == CLASSIFIER_STAGE]
    if cfg.model_path is not None:
        path = expand_path(cfg.model_path)
        if not Path(path).is_file():
            raise QualityError(f"quality.model_path '{cfg.model_path}' is not a file; point it at a fastText .bin/.ftz model")
        return path, path, 0.5
    if not refs:
        raise QualityError("quality_filter needs the train_quality_classifier stage among its inputs, or quality.model_path")
    reader = out.store.reader(refs[0])
    info = reader.read_json("classifier.json")
    if "model.bin" not in reader.manifest["files"]:
        raise QualityError(f"classifier {refs[0].stage}/{refs[0].version} has no model.bin (trained with model_path?); set quality.model_path again")
    return reader.local_path("model.bin"), f"{refs[0].stage}/{refs[0].version}", float(info["threshold"])


def score_shard(cfg: QualityClassifierConfig, out: StageDir, model_path: str, shards: list[tuple[StageRef, str]], index: int) -> None:
    ref, path = shards[index]
    texts = out.store.reader(ref).read_table(path, columns=["text"])["text"].to_pylist()
    model = load_model(model_path)
    scores: list[float | None] = [None] * len(texts)
    valid = [i for i, t in enumerate(texts) if isinstance(t, str)]
    for start in range(0, len(valid), cfg.batch_size):
        batch = valid[start : start + cfg.batch_size]
        for i, score in zip(batch, positive_scores(model, [normalize(texts[i]) for i in batch], cfg.positive_label)):
            scores[i] = score
    out.write_table(shard_name(index, "scores/"), pa.table({"score": pa.array(scores, pa.float64())}))


def cutoff(cfg: QualityClassifierConfig, all_scores: np.ndarray, trained_threshold: float) -> tuple[str, float]:
    if cfg.keep_top_fraction is not None:
        if len(all_scores) == 0:
            return "top_fraction", 1.0
        rank = max(1, math.ceil(cfg.keep_top_fraction * len(all_scores)))
        return "top_fraction", float(np.sort(all_scores)[::-1][rank - 1])
    return "threshold", cfg.threshold if cfg.threshold is not None else trained_threshold


def write_shard(out: StageDir, shards: list[tuple[StageRef, str]], threshold: float, index: int) -> None:
    ref, path = shards[index]
    docs = out.store.reader(ref).read_table(path)
    scores = out.read_table(shard_name(index, "scores/"))["score"].to_pylist()
    keep, reasons, metas = [], [], []
    for meta, score in zip(docs["meta"].to_pylist(), scores):
        fields = _meta_dict(meta)
        if score is not None:
            fields["quality_score"] = round(score, 6)
        metas.append(json.dumps(fields, sort_keys=True, ensure_ascii=False))
        kept = score is not None and score >= threshold
        keep.append(kept)
        if not kept:
            reasons.append("no_text" if score is None else DROP_REASON)
    docs = docs.set_column(docs.schema.get_field_index("meta"), "meta", pa.array(metas, pa.string()))
    mask = pa.array(keep, pa.bool_())
    removed = docs.filter(pc.invert(mask)).select(DOC_SCHEMA.names).append_column("reason", pa.array(reasons, pa.string()))
    out.write_table(shard_name(index, "removed/"), removed.cast(REMOVED_SCHEMA))
    out.write_table(shard_name(index), docs.filter(mask).cast(DOC_SCHEMA), counts={"dropped": _count(reasons)})


def _meta_dict(meta: str | None) -> dict[str, Any]:
    try:
        value = json.loads(meta) if meta else {}
    except json.JSONDecodeError:
        return {"meta_unparsed": meta}
    return value if isinstance(value, dict) else {"meta": value}


def _count(items: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def run_quality_filter(cfg: QualityClassifierConfig, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> QualityFilterStats:
    model_path, model_name, trained_threshold = classifier_model(cfg, out, inputs)
    documents = [ref for ref in inputs if ref.stage != CLASSIFIER_STAGE]
    shards = doc_shards(out.store, documents)
    map_pending(partial(score_shard, cfg, out, model_path, shards), len(shards), lambda i: shard_name(i, "scores/"), out, compute, "score")
    all_scores = [out.read_table(shard_name(i, "scores/"))["score"] for i in range(len(shards))]
    scores = np.array([s for column in all_scores for s in column.to_pylist() if s is not None], dtype=np.float64)
    mode, threshold = cutoff(cfg, scores, trained_threshold)
    map_pending(partial(write_shard, out, shards, threshold), len(shards), shard_name, out, compute, "filter")
    docs_in = sum(len(column) for column in all_scores)
    docs_out = sum(out.marker(shard_name(i))["rows"] for i in range(len(shards)))
    dropped: dict[str, int] = {}
    for i in range(len(shards)):
        for reason, n in out.marker(shard_name(i))["counts"]["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
    quantiles = {f"p{q}": round(float(np.percentile(scores, q)), 6) for q in (10, 50, 90)} if len(scores) else {}
    above, warnings = degenerate_scores(scores, trained_threshold)
    for warning in warnings:
        log.warning("quality_filter: %s", warning)
    return QualityFilterStats(
        model=model_name,
        mode=mode,
        threshold=round(threshold, 6),
        docs_in=docs_in,
        docs_out=docs_out,
        kept_fraction=round(docs_out / docs_in, 4) if docs_in else 0.0,
        dropped=dropped,
        score_quantiles=quantiles,
        above_trained_threshold=None if above is None else round(above, 4),
        warnings=warnings,
    )


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "train":
        _train_child(json.loads(argv[1]))
        return 0
    if len(argv) == 2 and argv[0] == "score":
        model = load_model(argv[1])
        print(json.dumps({"score": positive_scores(model, [normalize(sys.stdin.read())], QualityClassifierConfig().positive_label)[0]}))
        return 0
    print("usage: python -m lmfoundry.tasks.filter.quality score MODEL.bin < text   (or: train JOB_JSON, used internally)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
