"""Benchmark: WARC -> text documents per second on one core, ours vs datatrove.

    lmf bench extract [--data FILE_OR_DIR] [--pages 150] [--rounds 3] [--extractor resiliparse]

Ours is the extract stage's own code path: lmfoundry.tasks.acquire.ingest_warc reads the WARC
records and lmfoundry.tasks.acquire.extract extracts main content in its time-limited worker
and labels the language. The baseline is datatrove's WarcReader + Trafilatura extractor (its
defaults: favour precision, 1 s per-document timeout) on the same file. The process is pinned
to one CPU, so both sides (and their forked workers) share one core.

Both sides extract the same pages, counted the same way: the first --pages documents that both
readers take, chosen in an untimed pass (datatrove's WarcReader keeps 4xx error pages, which
our ingest skips, and decides what is HTML by sniffing the payload with libmagic where ours
reads the Content-Type header, so their documents can differ). In its timed run each side
reads the file in order, keeps exactly those URLs and stops when it has them all, so both pay
for reading the records in between.
``quality.same_pages`` says whether the two sides extracted exactly the same URLs;
``quality.pages_only_ours_reads`` / ``pages_only_datatrove_reads`` count the documents in that
stretch of the file that only one reader takes. The sides alternate for --rounds rounds; the
median round (CPU seconds of the process and its waited-for workers) counts, wall seconds are
reported beside. Ours over the whole file (one run, not compared) is reported beside too.

Quality: for every page both sides saw, the token-overlap F1 (bag of lowercase word tokens)
of our text against trafilatura's text, averaged over pages where trafilatura produced text;
plus how many pages came out empty on each side. The last stdout line is the JSON result.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import Counter
from pathlib import Path
from statistics import mean

from lmfoundry.bench._common import DEFAULT_DATA, Timing, alternating_rounds, median_rate, pin_one_core, print_result, rounds_arg, timed, warc_paths

WORD = re.compile(r"\w+")


def token_f1(ours: str, reference: str) -> float:
    a, b = Counter(WORD.findall(ours.lower())), Counter(WORD.findall(reference.lower()))
    overlap = sum((a & b).values())
    if not overlap:
        return 1.0 if not a and not b else 0.0
    precision, recall = overlap / sum(a.values()), overlap / sum(b.values())
    return 2 * precision * recall / (precision + recall)


def run_ours(path: Path, extractor: str, urls: list[str] | None = None) -> tuple[Timing, list[str], dict[str, str], dict]:
    """Our stage's path over the HTML documents with these URLs (all when None)."""
    from lmfoundry.infra.config import ExtractConfig, IngestWarcConfig
    from lmfoundry.tasks.acquire.extract import language_id

    cfg = ExtractConfig(extractor=extractor, min_text_chars=0)
    language_id(cfg.lid_model_path)  # model loading is a once-per-process cost, not per document
    (rows, (docs, skipped, languages)), timing = timed(_ours_work, path, cfg, IngestWarcConfig(), urls)
    texts = {row["url"]: "" for row in rows}
    texts.update({doc["url"]: doc["text"] for doc in docs})
    return timing, [row["url"] for row in rows], texts, {"skipped": dict(skipped), "languages": dict(languages)}


def _ours_work(path: Path, cfg, ingest_cfg, urls: list[str] | None):
    """Read HTML rows (all, or those with `urls`, stopping once all are found), then extract."""
    from lmfoundry.tasks.acquire.extract import extract_records
    from lmfoundry.tasks.acquire.ingest_warc import iter_records

    wanted = set(urls) if urls is not None else None
    rows = []
    with open(path, "rb") as fh:
        for row, _, _ in iter_records(fh, ingest_cfg, "bench", str(path)):
            if not row:  # not an HTML response
                continue
            if wanted is not None and row["url"] not in wanted:
                continue
            rows.append(row)
            if wanted is not None and len(rows) == len(wanted):
                break
    return rows, extract_records(cfg, rows)


def common_pages(path: Path, pages: int) -> tuple[list[str], dict[str, int]]:
    """The URLs of the first `pages` documents both readers take, and how many documents before
    the last of them only one reader takes (untimed)."""
    from datatrove.pipeline.readers import WarcReader

    from lmfoundry.infra.config import IngestWarcConfig
    from lmfoundry.tasks.acquire.ingest_warc import iter_records

    with open(path, "rb") as fh:
        ours = [row["url"] for row, _, _ in iter_records(fh, IngestWarcConfig(), "bench", str(path)) if row]
    theirs = [doc.metadata.get("url") for doc in WarcReader(str(path.parent), glob_pattern=path.name).run(None, 0, 1)]
    both = set(ours) & set(theirs)
    chosen = [url for url in theirs if url in both][:pages]
    last_ours = ours.index(chosen[-1]) if chosen else -1
    last_theirs = theirs.index(chosen[-1]) if chosen else -1
    only = {
        "pages_only_ours_reads": sum(url not in both for url in ours[: last_ours + 1]),
        "pages_only_datatrove_reads": sum(url not in both for url in theirs[: last_theirs + 1]),
    }
    return chosen, only


def run_datatrove(path: Path, urls: list[str]) -> tuple[Timing, list[str], dict[str, str], dict]:
    """datatrove's reader and extractor over the documents with these URLs."""
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.readers import WarcReader

    reader = WarcReader(str(path.parent), glob_pattern=path.name)
    extractor = Trafilatura()
    wanted, seen = set(urls), []

    def remember(docs):
        for doc in docs:
            if doc.metadata.get("url") not in wanted:
                continue
            seen.append(doc.metadata.get("url"))
            yield doc
            if len(seen) == len(wanted):
                return

    out, timing = timed(lambda: list(extractor.run(remember(reader.run(None, 0, 1)), 0, 1)))
    texts = {url: "" for url in seen}
    texts.update({doc.metadata.get("url"): doc.text for doc in out})
    return timing, seen, texts, {"timeouts": int(extractor.stats["timeout"].total)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmf bench extract", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA / "python311.warc.gz"), help="a .warc.gz file, or a folder (its first .warc.gz)")
    parser.add_argument("--pages", type=int, default=150, help="HTML documents each side reads (datatrove is slow)")
    parser.add_argument("--rounds", type=rounds_arg, default=3, help="alternating rounds per side (at least 3; the median counts)")
    parser.add_argument("--extractor", default="resiliparse", choices=["resiliparse", "trafilatura"])
    args = parser.parse_args(argv)
    path = warc_paths(args.data)[0]
    core = pin_one_core()
    print(f"extract bench on {path.name}, pinned to CPU {core}", file=sys.stderr)

    urls, only_one = common_pages(path, args.pages)
    runs = alternating_rounds(
        {"ours": lambda _: run_ours(path, args.extractor, urls), "datatrove": lambda _: run_datatrove(path, urls)},
        args.rounds,
    )
    (_, ours_urls, ours_text, _), (_, base_urls, base_text, base_info) = runs["ours"][-1], runs["datatrove"][-1]
    cpu = {name: [r[0].cpu_s for r in rounds] for name, rounds in runs.items()}
    wall = {name: [r[0].wall_s for r in rounds] for name, rounds in runs.items()}
    ours_rate, base_rate = median_rate(len(ours_urls), cpu["ours"]), median_rate(len(base_urls), cpu["datatrove"])
    for name, n in (("ours", len(ours_urls)), ("datatrove", len(base_urls))):
        print(f"{name}: {n} pages, cpu seconds per round {[round(x, 2) for x in cpu[name]]}", file=sys.stderr)
    full, _, full_text, full_info = run_ours(path, args.extractor)
    full_n = len(full_text)
    print(f"ours, whole file: {full_n} pages in {full.cpu_s:.1f} CPU s = {full_n / full.cpu_s:.1f} docs/s", file=sys.stderr)

    pairs = [(ours_text[url], ref) for url, ref in base_text.items() if url in ours_text and ref.strip()]
    same = {"pages": args.pages, "counted": "the first --pages documents both readers take", "cores": [core], "rounds": args.rounds, "statistic": "median",
            "clock": "CPU seconds (process_time + waited-for workers)"}
    settings = {
        "ours": {"extractor": args.extractor, "language_id": True, "time_limit": "extract.time_limit_s default", **same},
        "datatrove": {"extractor": "Trafilatura (favour precision, timeout 1 s)", "language_id": False, **same},
    }
    print_result(
        "extract",
        "docs_per_s",
        ours_rate,
        "datatrove WarcReader + Trafilatura",
        base_rate,
        digits=2,
        ratio_digits=2,
        n={"ours": len(ours_urls), "baseline": len(base_urls)},
        settings=settings,
        quality={
            "same_pages": ours_urls == base_urls,
            **only_one,
            "token_f1_vs_trafilatura_mean": round(mean(token_f1(a, b) for a, b in pairs), 4) if pairs else None,
            "f1_pages": len(pairs),
            "ours_empty": sum(1 for text in ours_text.values() if not text.strip()),
            "baseline_empty": sum(1 for text in base_text.values() if not text.strip()),
            "baseline_timeouts": base_info["timeouts"],
            "cpu_s": {name: [round(x, 3) for x in v] for name, v in cpu.items()},
            "wall_s": {name: [round(x, 3) for x in v] for name, v in wall.items()},
            "wall_ratio": round((len(ours_urls) / statistics.median(wall["ours"])) / (len(base_urls) / statistics.median(wall["datatrove"])), 2),
        },
        ours_whole_file={
            "n": full_n,
            "docs_per_s": round(full_n / full.cpu_s, 2),
            "runs": 1,
            "empty": sum(1 for text in full_text.values() if not text.strip()),
            "skipped": full_info["skipped"],
            "languages": full_info["languages"],
        },
        extractor=args.extractor,
        data=path.name,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
