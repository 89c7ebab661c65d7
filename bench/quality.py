"""Benchmark: heuristic quality filtering, documents per second on one core, ours vs datatrove.

    lmf bench quality [--data DIR] [--files python311.warc.gz llvm16.warc.gz] [--limit N] [--rounds 3] [--no-classifier] [--fineweb]

Documents: every HTML page of the given WARC files turned into text here with resiliparse
(main content), so the benchmark depends on no other stage. Both sides judge the same texts
with the same thresholds (the published defaults):

- ours: lmfoundry.tasks.filter.rules with the Gopher repetition, Gopher quality and C4 rule sets (FineWeb off);
- datatrove: GopherRepetitionFilter -> GopherQualityFilter -> C4QualityFilter, calling each
  filter's `filter()` directly (no pipeline overhead charged to it).

Time is CPU time of this process, pinned to one core. The sides alternate for --rounds rounds
and the median round counts; every round of either side starts cold: its word-splitting caches
(our chunk table and every functools cache in lmfoundry.tasks.filter; datatrove's functools
caches in datatrove.utils and a fresh spaCy tokenizer) are emptied and its filters rebuilt
outside the clock, then warmed with one short sentence (regular expressions compiled, spaCy
loaded). `quality.agreement` is the share of
documents both sides keep or both drop; `quality.reason_agreement` the share where the first
failing rule is also the same; every disagreement is listed with both verdicts. Known, by
design, sources of difference: our word splitter imitates spaCy's English tokenizer (which
datatrove uses) with regular expressions, "symbol-only" words are defined by Unicode category
rather than datatrove's character list, and repeated n-grams are compared as word sequences
where datatrove compares the words glued together ("ab c" == "a bc").

Also measured, with the same rounds and median: the stage end to end (`ours_stage_docs_per_s`:
Parquet in and out through the store, one worker, cold caches) and fastText classifier scoring
(`classifier`): a model trained by
train_quality_classifier (positives: the python311 pages; negatives: all pages), scoring
every page in batches (`scoring_docs_per_s`), alternating with one raw `predict` per document as
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

from lmfoundry.bench._common import (
    DEFAULT_DATA,
    alternating_rounds,
    clear_lru_caches,
    commit_doc_shards,
    median_rate,
    pin_one_core,
    print_result,
    rounds_arg,
    timed,
    warc_documents,
    warc_paths,
)

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
    """Our verdicts and CPU seconds, from cold caches."""
    from lmfoundry.tasks.filter import rules

    steps = rules.build_steps(rules_config())
    rules.judge("warm up the regular expressions.", steps)
    clear_our_caches()
    verdicts, timing = timed(lambda: [rules.judge(t, steps) for t in texts])
    return verdicts, timing.cpu_s


def clear_our_caches() -> None:
    from lmfoundry.tasks.filter import words

    words._SPLITS.clear()  # the chunk -> tokens table shared by all documents of a process
    clear_lru_caches(["lmfoundry.tasks.filter"])


def run_datatrove(texts: list[str]) -> tuple[list[str | None], float]:
    """datatrove's verdicts and CPU seconds, from cold caches and a fresh spaCy tokenizer."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

    clear_lru_caches(["datatrove.utils"])  # its tokenizer registry (a new spaCy pipeline) and text splits
    chain = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter()]
    for f in chain:  # loads spaCy's English tokenizer outside the timed part
        f.filter(Document(text="Warm up the tokenizer. It loads once.", id="warmup"))

    def judge_all() -> list[str | None]:
        verdicts: list[str | None] = []
        for i, text in enumerate(texts):
            doc = Document(text=text, id=str(i))
            reason = None
            for f in chain:
                result = f.filter(doc)
                if result is not True:
                    reason = result[1] if isinstance(result, tuple) else f.name
                    break
            verdicts.append(reason)
        return verdicts

    verdicts, timing = timed(judge_all)
    return verdicts, timing.cpu_s


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


def stage_seconds(store, ref, salt: str) -> float:
    """CPU seconds of one fresh version of the heuristic_filter stage (one worker, cold caches)."""
    from lmfoundry.infra.config import ComputeConfig, PipelineConfig
    from lmfoundry.infra.stage import StageSpec, run_stage

    root = PipelineConfig(heuristic_filter=rules_config(), compute=ComputeConfig(workers=1, progress=False))
    spec = StageSpec("heuristic_filter", "lmfoundry.tasks.filter.heuristic_filter:run_heuristic_filter", section="heuristic_filter")
    spec.module()  # imported before the clock starts
    clear_our_caches()
    _, timing = timed(run_stage, store, spec, root, [ref], salt=salt)
    return timing.cpu_s


def stage_docs_per_s(docs: list[dict], rounds: int) -> tuple[float, list[float]]:
    """The heuristic_filter stage end to end through a local store: docs/s at the median round."""
    from lmfoundry.infra.store import Store

    with tempfile.TemporaryDirectory(prefix="lmf-bench-quality-") as tmp:
        store = Store(tmp)
        rows = [{"id": str(i), "text": d["text"], "url": d["url"], "source": d["source"]} for i, d in enumerate(docs)]
        ref = commit_doc_shards(store, (rows[start : start + 500] for start in range(0, len(rows), 500)))
        seconds = [stage_seconds(store, ref, salt=f"bench-round-{r}") for r in range(rounds)]
    return median_rate(len(docs), seconds), seconds


def classifier_bench(docs: list[dict], rounds: int) -> dict:
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

        def batched() -> float:
            return timed(lambda: [positive_scores(model, [normalize(t) for t in texts[i : i + cfg.batch_size]], cfg.positive_label)
                                  for i in range(0, len(texts), cfg.batch_size)])[1].cpu_s

        def per_doc() -> float:
            return timed(lambda: [model.predict(text.strip().replace("\n", " "), k=-1) for text in texts])[1].cpu_s

        seconds = alternating_rounds({"scoring": lambda _: batched(), "per_doc_predict": lambda _: per_doc()}, rounds)
        stats = trained.stats
        return {
            "scoring_docs_per_s": round(median_rate(len(texts), seconds["scoring"]), 1),
            "per_doc_predict_docs_per_s": round(median_rate(len(texts), seconds["per_doc_predict"]), 1),
            "cpu_s": {name: [round(x, 3) for x in v] for name, v in seconds.items()},
            "train_wall_s": round(train_s, 1),
            "validation": {k: stats[k] for k in ("precision", "recall", "f1", "threshold", "train_examples", "validation_examples")},
        }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmf bench quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder holding the WARC files")
    parser.add_argument("--files", nargs="+", default=DEFAULT_FILES)
    parser.add_argument("--limit", type=int, default=None, help="at most this many pages")
    parser.add_argument("--rounds", type=rounds_arg, default=3, help="alternating rounds per side (at least 3; the median counts)")
    parser.add_argument("--no-classifier", action="store_true", help="skip the fastText part")
    parser.add_argument("--fineweb", action="store_true", help="also compare the FineWeb rules with datatrove's (untimed)")
    args = parser.parse_args(argv)
    paths = warc_paths(args.data, args.files)
    core = pin_one_core()
    docs = list(islice(warc_documents(paths), args.limit or None))
    texts = [d["text"] for d in docs]
    print(f"{len(docs)} pages, {sum(map(len, texts)):,} characters, pinned to CPU {core}", file=sys.stderr)
    runs = alternating_rounds({"ours": lambda _: run_ours(texts), "datatrove": lambda _: run_datatrove(texts)}, args.rounds)
    seconds = {name: [s for _, s in rounds] for name, rounds in runs.items()}
    ours, theirs = runs["ours"][-1][0], runs["datatrove"][-1][0]
    quality = compare(docs, ours, theirs)
    quality["cpu_s"] = {name: [round(x, 3) for x in v] for name, v in seconds.items()}
    stage_rate, stage_s = stage_docs_per_s(docs, args.rounds)
    quality["ours_stage_docs_per_s"] = round(stage_rate, 1)
    quality["ours_stage_cpu_s"] = [round(x, 3) for x in stage_s]
    if args.fineweb:
        quality["fineweb_agreement"] = fineweb_agreement(texts)
    if not args.no_classifier:
        quality["classifier"] = classifier_bench(docs, args.rounds)
    ours_rate, theirs_rate = median_rate(len(docs), seconds["ours"]), median_rate(len(docs), seconds["datatrove"])
    print(json.dumps(quality["cpu_s"]), file=sys.stderr)
    same = {"thresholds": "published defaults", "cores": [core], "clock": "CPU seconds (process_time)", "rounds": args.rounds,
            "statistic": "median", "caches": "emptied before every round"}
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
