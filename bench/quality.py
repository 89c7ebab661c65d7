"""Benchmark: heuristic quality filtering, documents per second on one core, ours vs datatrove.

    lmf bench quality [--data DIR] [--files python311.warc.gz llvm16.warc.gz] [--limit N] [--no-classifier] [--fineweb]

Documents: every HTML page of the given WARC files turned into text here with resiliparse
(main content), so the benchmark depends on no other stage. Both sides judge the same texts
with the same thresholds (the published defaults):

- ours: lmfoundry.tasks.filter.rules with the Gopher repetition, Gopher quality and C4 rule sets (FineWeb off);
- datatrove: GopherRepetitionFilter -> GopherQualityFilter -> C4QualityFilter, calling each
  filter's `filter()` directly (no pipeline overhead charged to it).

Time is CPU time of this process, pinned to one core. `quality.agreement` is the share of
documents both sides keep or both drop; `quality.reason_agreement` the share where the first
failing rule is also the same; every disagreement is listed with both verdicts. Known, by
design, sources of difference: our word splitter imitates spaCy's English tokenizer (which
datatrove uses) with regular expressions, "symbol-only" words are defined by Unicode category
rather than datatrove's character list, and repeated n-grams are compared as word sequences
where datatrove compares the words glued together ("ab c" == "a bc").

Also measured: the stage end to end (`ours_stage_docs_per_s`: Parquet in and out through the
store, one worker) and fastText classifier scoring (`classifier`): a model trained by
train_quality_classifier (positives: the python311 pages; negatives: all pages), scoring
every page in batches (`scoring_docs_per_s`), next to one raw `predict` per document as
datatrove's FastTextClassifierFilter calls it (`per_doc_predict_docs_per_s`, no word splitting).
With --fineweb, our FineWeb rule set is also compared with datatrove's FineWebQualityFilter
(untimed; `quality.fineweb_agreement`). The last stdout line is the JSON result.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

from lmfoundry.bench._common import DEFAULT_DATA, commit_doc_shards, pin_one_core, print_result, warc_documents, warc_paths

DEFAULT_FILES = ["python311.warc.gz", "llvm16.warc.gz"]

# datatrove's reason names -> ours
DATATROVE_REASONS = {
    "empty": "empty",
    "dup_para_frac": "gopher_dup_paragraphs",
    "dup_para_char_frac": "gopher_dup_paragraph_chars",
    "dup_line_frac": "gopher_dup_lines",
    "dup_line_char_frac": "gopher_dup_line_chars",
    **{f"top_{n}_gram": f"gopher_top_{n}gram" for n in range(2, 5)},
    **{f"duplicated_{n}_n_grams": f"gopher_dup_{n}gram" for n in range(5, 11)},
    "gopher_short_doc": "gopher_too_few_words",
    "gopher_long_doc": "gopher_too_many_words",
    "gopher_below_avg_threshold": "gopher_short_words",
    "gopher_above_avg_threshold": "gopher_long_words",
    "gopher_too_many_hashes": "gopher_hash_ratio",
    "gopher_too_many_ellipsis": "gopher_ellipsis_ratio",
    "gopher_too_many_bullets": "gopher_bullet_lines",
    "gopher_too_many_end_ellipsis": "gopher_ellipsis_lines",
    "gopher_below_alpha_threshold": "gopher_alpha_words",
    "gopher_enough_stop_words": "gopher_stop_words",
    "lorem_ipsum": "c4_lorem_ipsum",
    "curly_bracket": "c4_curly_bracket",
    "too_few_sentences": "c4_too_few_sentences",
}


def rules_config():
    from lmfoundry.infra.config import HeuristicFilterConfig

    # datatrove counts punctuation tokens as words in the alpha-word ratio: count as it does, to compare like with like
    gopher = HeuristicFilterConfig.GopherQuality(alpha_words_counting="datatrove")
    return HeuristicFilterConfig(gopher_quality=gopher, fineweb=HeuristicFilterConfig.FineWeb(enabled=False))


def run_ours(texts: list[str]) -> tuple[list[str | None], float]:
    from lmfoundry.tasks.filter import rules, words

    steps = rules.build_steps(rules_config())
    rules.judge("warm up the regular expressions.", steps)
    words._SPLITS.clear()  # start cold: no chunk seen before
    words.split_chunk.cache_clear()
    start = time.process_time()
    verdicts = [rules.judge(t, steps) for t in texts]
    return verdicts, time.process_time() - start


def run_datatrove(texts: list[str]) -> tuple[list[str | None], float]:
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

    chain = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter()]
    for f in chain:  # loads spaCy's English tokenizer outside the timed part
        f.filter(Document(text="Warm up the tokenizer. It loads once.", id="warmup"))
    verdicts: list[str | None] = []
    start = time.process_time()
    for i, text in enumerate(texts):
        doc = Document(text=text, id=str(i))
        reason = None
        for f in chain:
            result = f.filter(doc)
            if result is not True:
                reason = result[1] if isinstance(result, tuple) else f.name
                break
        verdicts.append(reason)
    return verdicts, time.process_time() - start


def compare(docs: list[dict], ours: list[str | None], theirs: list[str | None]) -> dict:
    same_decision = sum((a is None) == (b is None) for a, b in zip(ours, theirs))
    same_reason = sum(a == (DATATROVE_REASONS.get(b, b) if b else None) for a, b in zip(ours, theirs))
    differences = [
        {"url": d["url"], "ours": a or "keep", "datatrove": b or "keep"}
        for d, a, b in zip(docs, ours, theirs)
        if (a is None) != (b is None)
    ]
    return {
        "agreement": round(same_decision / len(docs), 4),
        "reason_agreement": round(same_reason / len(docs), 4),
        "kept_ours": sum(a is None for a in ours),
        "kept_datatrove": sum(b is None for b in theirs),
        "differences": differences,
    }


def fineweb_agreement(texts: list[str]) -> dict:
    from datatrove.data import Document
    from datatrove.pipeline.filters import FineWebQualityFilter

    from lmfoundry.infra.config import HeuristicFilterConfig
    from lmfoundry.tasks.filter.rules import build_steps, judge

    off = {"enabled": False}
    steps = build_steps(HeuristicFilterConfig.model_validate({"gopher_repetition": off, "gopher_quality": off, "c4": off}))
    theirs_filter = FineWebQualityFilter()
    texts = [t for t in texts if t.strip()]  # datatrove's list ratio divides by zero on blank texts
    same = sum((judge(t, steps) is None) == (theirs_filter.filter(Document(text=t, id="x")) is True) for t in texts)
    return {"agreement": round(same / len(texts), 4), "n": len(texts)}


def stage_docs_per_s(docs: list[dict]) -> float:
    """The heuristic_filter stage end to end through a local store, one worker, cold caches."""
    from lmfoundry.infra.config import ComputeConfig, PipelineConfig
    from lmfoundry.infra.stage import StageSpec, run_stage
    from lmfoundry.infra.store import Store
    from lmfoundry.tasks.filter import words

    with tempfile.TemporaryDirectory(prefix="lmf-bench-quality-") as tmp:
        store = Store(tmp)
        rows = [{"id": str(i), "text": d["text"], "url": d["url"], "source": d["source"]} for i, d in enumerate(docs)]
        ref = commit_doc_shards(store, (rows[start : start + 500] for start in range(0, len(rows), 500)))
        root = PipelineConfig(heuristic_filter=rules_config(), compute=ComputeConfig(workers=1, progress=False))
        spec = StageSpec("heuristic_filter", "lmfoundry.tasks.filter.heuristic_filter:run_heuristic_filter", section="heuristic_filter")
        words._SPLITS.clear()
        words.split_chunk.cache_clear()
        start = time.process_time()
        run_stage(store, spec, root, [ref])
        return len(docs) / (time.process_time() - start)


def classifier_bench(docs: list[dict]) -> dict:
    """Train a classifier with the pipeline's own stage, then time scoring every page."""
    from lmfoundry.infra.config import ComputeConfig, PipelineConfig, QualityClassifierConfig, SourceConfig
    from lmfoundry.infra.stage import StageSpec, run_stage
    from lmfoundry.infra.store import Store
    from lmfoundry.tasks.filter.quality import load_model, normalize, positive_scores

    with tempfile.TemporaryDirectory(prefix="lmf-bench-classifier-") as tmp:
        reference = Path(tmp) / "reference.jsonl"
        reference.write_text("\n".join(json.dumps({"text": d["text"]}) for d in docs if d["source"].startswith("python")))
        store = Store(str(Path(tmp) / "store"))
        pages = commit_doc_shards(store, [[{"id": str(i), "text": d["text"]} for i, d in enumerate(docs)]])
        cfg = QualityClassifierConfig(enabled=True, positive=SourceConfig(name="python-docs", paths=[str(reference)]))
        root = PipelineConfig(quality=cfg, compute=ComputeConfig(workers=1, progress=False))
        spec = StageSpec("train_quality_classifier", "lmfoundry.tasks.filter.quality:run_train_quality_classifier", section="quality")
        started = time.perf_counter()
        trained = run_stage(store, spec, root, [pages])
        train_s = time.perf_counter() - started
        model = load_model(store.reader(trained.ref).local_path("model.bin"))
        texts = [d["text"] for d in docs]
        start = time.process_time()
        for i in range(0, len(texts), cfg.batch_size):
            positive_scores(model, [normalize(t) for t in texts[i : i + cfg.batch_size]], cfg.positive_label)
        scoring_s = time.process_time() - start
        start = time.process_time()
        for text in texts:
            model.predict(text.strip().replace("\n", " "), k=-1)
        raw_s = time.process_time() - start
        stats = trained.stats
        return {
            "scoring_docs_per_s": round(len(texts) / scoring_s, 1),
            "per_doc_predict_docs_per_s": round(len(texts) / raw_s, 1),
            "train_wall_s": round(train_s, 1),
            "validation": {k: stats[k] for k in ("precision", "recall", "f1", "threshold", "train_examples", "validation_examples")},
        }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmf bench quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder holding the WARC files")
    parser.add_argument("--files", nargs="+", default=DEFAULT_FILES)
    parser.add_argument("--limit", type=int, default=None, help="at most this many pages")
    parser.add_argument("--no-classifier", action="store_true", help="skip the fastText part")
    parser.add_argument("--fineweb", action="store_true", help="also compare the FineWeb rules with datatrove's (untimed)")
    args = parser.parse_args(argv)
    paths = warc_paths(args.data, args.files)
    pin_one_core()
    docs = list(islice(warc_documents(paths), args.limit or None))
    texts = [d["text"] for d in docs]
    print(f"{len(docs)} pages, {sum(map(len, texts)):,} characters", file=sys.stderr)
    ours, ours_s = run_ours(texts)
    theirs, theirs_s = run_datatrove(texts)
    quality = compare(docs, ours, theirs)
    quality["ours_stage_docs_per_s"] = round(stage_docs_per_s(docs), 1)
    if args.fineweb:
        quality["fineweb_agreement"] = fineweb_agreement(texts)
    if not args.no_classifier:
        quality["classifier"] = classifier_bench(docs)
    ours_rate, theirs_rate = len(docs) / ours_s, len(docs) / theirs_s
    print(json.dumps({"ours_s": round(ours_s, 2), "datatrove_s": round(theirs_s, 2)}), file=sys.stderr)
    same = {"thresholds": "published defaults", "cores": 1, "clock": "process_time", "rounds": 1}
    settings = {
        "ours": {"rule_sets": ["gopher_repetition", "gopher_quality", "c4"], "fineweb": False, **same},
        "datatrove": {"filters": ["GopherRepetitionFilter", "GopherQualityFilter", "C4QualityFilter"], "called": "filter() directly", **same},
    }
    print_result(
        "quality", "docs_per_s", ours_rate, "datatrove GopherRepetition->GopherQuality->C4Quality", theirs_rate,
        n=len(docs), quality=quality, settings=settings, ratio_digits=2,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
