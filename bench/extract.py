"""Benchmark: WARC -> text documents per second on one core, ours vs datatrove.

    lmf bench extract [--data FILE_OR_DIR] [--baseline-sample 150] [--extractor resiliparse]

Ours is the extract stage's own code path: lmfoundry.tasks.acquire.ingest_warc reads the WARC records and
lmfoundry.tasks.acquire.extract extracts main content in its time-limited worker and labels the language.
The baseline is datatrove's WarcReader + Trafilatura extractor (its defaults: favour
precision, 1 s per-document timeout) on the same file. The process is pinned to one CPU,
so both sides (and our forked worker) share one core. datatrove is slow, so both sides
read only the first --baseline-sample pages (the same pages; `n` gives each side's count),
and ours runs before and after the baseline, the mean counting, so drifting load on a
shared machine hits both sides alike. Ours over the whole file is reported beside.

Quality: for every page both sides saw, the token-overlap F1 (bag of lowercase word tokens)
of our text against trafilatura's text, averaged over pages where trafilatura produced text;
plus how many pages came out empty on each side. The last stdout line is the JSON result.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from pathlib import Path
from statistics import mean

from lmfoundry.bench._common import DEFAULT_DATA, pin_one_core, print_result, warc_paths

WORD = re.compile(r"\w+")


def token_f1(ours: str, reference: str) -> float:
    a, b = Counter(WORD.findall(ours.lower())), Counter(WORD.findall(reference.lower()))
    overlap = sum((a & b).values())
    if not overlap:
        return 1.0 if not a and not b else 0.0
    precision, recall = overlap / sum(a.values()), overlap / sum(b.values())
    return 2 * precision * recall / (precision + recall)


def run_ours(path: Path, extractor: str, limit: int | None = None) -> tuple[float, int, dict[str, str], dict]:
    """Our stage's path over the first `limit` response records (all when None)."""
    from lmfoundry.infra.config import ExtractConfig, IngestWarcConfig
    from lmfoundry.tasks.acquire.extract import extract_records, language_id
    from lmfoundry.tasks.acquire.ingest_warc import iter_records

    cfg = ExtractConfig(extractor=extractor, min_text_chars=0)
    language_id(cfg.lid_model_path)  # model loading is a once-per-process cost, not per document
    started = time.perf_counter()
    rows, responses = [], 0
    with open(path, "rb") as fh:
        for row, _, rec_type in iter_records(fh, IngestWarcConfig(), "bench", str(path)):
            responses += rec_type == "response"
            if limit is not None and responses > limit:
                break
            if row:
                rows.append(row)
    docs, skipped, languages = extract_records(cfg, rows)
    seconds = time.perf_counter() - started
    texts = {row["url"]: "" for row in rows}
    texts.update({doc["url"]: doc["text"] for doc in docs})
    return seconds, min(responses, limit or responses), texts, {"skipped": dict(skipped), "languages": dict(languages)}


def run_datatrove(path: Path, sample: int) -> tuple[float, int, dict[str, str], dict]:
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.readers import WarcReader

    reader = WarcReader(str(path.parent), glob_pattern=path.name, limit=sample)
    extractor = Trafilatura()
    seen: list[str] = []

    def remember(docs):
        for doc in docs:
            seen.append(doc.metadata.get("url"))
            yield doc

    started = time.perf_counter()
    out = list(extractor.run(remember(reader.run(None, 0, 1)), 0, 1))
    seconds = time.perf_counter() - started
    texts = {url: "" for url in seen}
    texts.update({doc.metadata.get("url"): doc.text for doc in out})
    return seconds, len(seen), texts, {"timeouts": int(extractor.stats["timeout"].total)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmf bench extract", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA / "python311.warc.gz"), help="a .warc.gz file, or a folder (its first .warc.gz)")
    parser.add_argument("--baseline-sample", type=int, default=150, help="pages datatrove reads (it is slow)")
    parser.add_argument("--extractor", default="resiliparse", choices=["resiliparse", "trafilatura"])
    args = parser.parse_args(argv)
    path = warc_paths(args.data)[0]
    core = pin_one_core()
    print(f"extract bench on {path.name}, pinned to CPU {core}", file=sys.stderr)

    # the same pages on both sides (the first --baseline-sample); ours runs before and after the
    # baseline, so a change in machine load hits both sides alike
    sample = args.baseline_sample
    before_s, ours_n, ours_text, _ = run_ours(path, args.extractor, sample)
    base_s, base_n, base_text, base_info = run_datatrove(path, sample)
    after_s, _, _, _ = run_ours(path, args.extractor, sample)
    ours_s = (before_s + after_s) / 2
    print(f"ours: {ours_n} pages in {before_s:.1f} s and {after_s:.1f} s = {ours_n / ours_s:.1f} docs/s", file=sys.stderr)
    print(f"datatrove: {base_n} pages in {base_s:.1f} s = {base_n / base_s:.2f} docs/s ({base_info['timeouts']} timeouts)", file=sys.stderr)
    full_s, full_n, full_text, full_info = run_ours(path, args.extractor)
    print(f"ours, whole file: {full_n} pages in {full_s:.1f} s = {full_n / full_s:.1f} docs/s", file=sys.stderr)

    pairs = [(ours_text[url], ref) for url, ref in base_text.items() if url in ours_text and ref.strip()]
    ours_rate, base_rate = ours_n / ours_s, base_n / base_s
    same = {"pages": sample, "cores": 1, "clock": "perf_counter"}
    settings = {
        "ours": {"extractor": args.extractor, "language_id": True, "runs": "before and after the baseline, mean", **same},
        "datatrove": {"extractor": "Trafilatura (favour precision, timeout 1 s)", "runs": 1, **same},
    }
    print_result(
        "extract",
        "docs_per_s",
        ours_rate,
        "datatrove WarcReader + Trafilatura",
        base_rate,
        digits=2,
        ratio_digits=2,
        n={"ours": ours_n, "baseline": base_n},
        settings=settings,
        quality={
            "token_f1_vs_trafilatura_mean": round(mean(token_f1(a, b) for a, b in pairs), 4) if pairs else None,
            "f1_pages": len(pairs),
            "ours_empty": sum(1 for text in ours_text.values() if not text.strip()),
            "baseline_empty": sum(1 for text in base_text.values() if not text.strip()),
            "baseline_timeouts": base_info["timeouts"],
        },
        ours_whole_file={
            "n": full_n,
            "docs_per_s": round(full_n / full_s, 2),
            "empty": sum(1 for text in full_text.values() if not text.strip()),
            "skipped": full_info["skipped"],
            "languages": full_info["languages"],
        },
        ours_runs_s=[round(before_s, 2), round(after_s, 2)],
        extractor=args.extractor,
        data=path.name,
        cores=1,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
