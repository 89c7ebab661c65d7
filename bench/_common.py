"""What the benchmarks in bench/ share: the result line, WARC text, document shards, core
pinning and the alternating-rounds loop.

Not a benchmark itself: the leading underscore keeps it out of `make bench` and `lmf bench`.
Each benchmark prints, as its LAST stdout line, the object ``result_line`` builds (the format of
the "Benchmarks" section of /work/shared/DESIGN.md):

    {"bench", "metric", "ours", "baseline_name", "baseline", "ratio", "n", "quality", "settings", ...}

    from lmfoundry.bench._common import print_result
    print_result("store", "commit_seconds", ours_s, "raw fsspec", raw_s, n=32, quality={...},
                 settings={"ours": {...}, "baseline": {...}}, digits=4)
"""
from __future__ import annotations

import json
import os
import sys
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

T = TypeVar("T")
DEFAULT_DATA = Path("/work/shared/data")  # the shared machines' WARC files; every bench takes --data


# ---------------------------------------------------------------- the result line


def result_line(
    bench: str,
    metric: str,
    ours: float,
    baseline_name: str,
    baseline: float | None,
    *,
    n: Any,
    quality: dict[str, Any],
    settings: Mapping[str, Any],
    ratio: float | None = None,
    digits: int = 1,
    ratio_digits: int = 3,
    **extra: Any,
) -> dict[str, Any]:
    """The result object: `ours` and `baseline` rounded to `digits`; `ratio` is ours / baseline
    of the unrounded values unless given (a bench with its own statistic), rounded to
    `ratio_digits`, None without a baseline. `settings` says what each side ran with
    ({"ours": {...}, "<baseline>": {...}}); `extra` keys follow the standard ones."""
    if not settings or "ours" not in settings:
        raise ValueError(f"bench '{bench}': settings must say what each side ran with, starting with 'ours' (got {dict(settings)})")
    if ratio is None and baseline:
        ratio = ours / baseline
    return {
        "bench": bench,
        "metric": metric,
        "ours": round(ours, digits),
        "baseline_name": baseline_name,
        "baseline": round(baseline, digits) if baseline is not None else None,
        "ratio": round(ratio, ratio_digits) if ratio is not None else None,
        "n": n,
        "quality": quality,
        "settings": dict(settings),
        **extra,
    }


def print_result(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Print ``result_line(...)`` as one JSON line (flushed) and return it."""
    result = result_line(*args, **kwargs)
    print(json.dumps(result), flush=True)
    return result


# ---------------------------------------------------------------- input text


def warc_paths(data: str | Path, names: Iterable[str] | None = None) -> list[Path]:
    """`names` in the folder `data`, or (no names) every *.warc.gz in it, or `data` itself when
    it is a file. Missing files end the benchmark with exit code 2 and what to pass instead."""
    data = Path(data)
    if names is None and data.is_file():
        return [data]
    paths = [data / name for name in names] if names is not None else sorted(data.glob("*.warc.gz"))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        what = f"missing WARC files: {', '.join(missing)}" if missing else f"no *.warc.gz in {data}"
        print(f"{what}; pass --data with a folder of WARC files or one .warc.gz file (see --help)", file=sys.stderr)
        raise SystemExit(2)
    return paths


def warc_documents(paths: Iterable[str | Path]) -> Iterator[dict[str, str]]:
    """{url, source (the file name), text} of every HTML response, in file order, reduced to its
    main text with resiliparse (inside the bench, so it depends on no other stage); an empty
    text is yielded too."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    for path in map(Path, paths):
        with open(path, "rb") as stream:
            for record in ArchiveIterator(stream, record_types=WarcRecordType.response, parse_http=True):
                if "html" not in (record.http_headers.get("Content-Type") or ""):
                    continue
                body = record.reader.read()
                text = extract_plain_text(bytes_to_str(body, detect_encoding(body)), main_content=True)
                yield {"url": record.headers.get("WARC-Target-URI") or "", "source": path.name, "text": text}


def warc_texts(paths: Iterable[str | Path], limit: int | None = None, skip_empty: bool = False) -> list[str]:
    """The first `limit` (all when None) texts of ``warc_documents``."""
    texts = (d["text"] for d in warc_documents(paths))
    return list(islice((t for t in texts if t.strip()) if skip_empty else texts, limit))


def commit_doc_shards(store: Any, shards: Iterable[Iterable[dict[str, Any]]], stage: str = "bench_docs") -> Any:
    """Rows ({id, text, ...}) as the document shards of a committed stage; returns its StageRef."""
    from lmfoundry.infra.docs import docs_table, shard_name

    out = store.open_for_write(stage, "v1")
    for i, rows in enumerate(shards):
        out.write_table(shard_name(i), docs_table(list(rows)))
    return store.commit(out, {"stats": {}})


# ---------------------------------------------------------------- timing


def pin_one_core() -> int | None:
    """Pin this process (and what it forks later) to its lowest allowed CPU; None where the OS
    cannot. Both sides then share one core, whatever else the machine runs."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def alternating_rounds(
    sides: Mapping[str, Callable[[int], T]], rounds: int, before: Callable[[], Any] | None = None
) -> dict[str, list[T]]:
    """Run every side once per round, in turn, for `rounds` rounds, so drifting load on a shared
    machine hits all sides alike; each side gets the round number. `before` runs before every
    side's run (e.g. os.sync). Returns each side's results in round order."""
    results: dict[str, list[T]] = {name: [] for name in sides}
    for r in range(rounds):
        for name, side in sides.items():
            if before is not None:
                before()
            results[name].append(side(r))
    return results
