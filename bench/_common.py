"""What the benchmarks in bench/ share: the result line, WARC text, document shards, core
pinning, the alternating-rounds loop, timing (wall and CPU with children), the median of the
rounds, and emptying caches between rounds. The rules they serve are in bench/README.md
("How we measure").

Not a benchmark itself: the leading underscore keeps it out of `make bench` and `lmf bench`.
Each benchmark prints, as its LAST stdout line, the object ``result_line`` builds (the format of
the "Benchmarks" section of /work/shared/DESIGN.md):

    {"bench", "metric", "ours", "baseline_name", "baseline", "ratio", "n", "quality", "settings", ...}

    from lmfoundry.bench._common import print_result
    print_result("store", "commit_seconds", ours_s, "raw fsspec", raw_s, n=32, quality={...},
                 settings={"ours": {...}, "baseline": {...}}, digits=4)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
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


def pin_cores(count: int = 1) -> list[int] | None:
    """Pin this process (and every process it forks or spawns later) to its `count` lowest
    allowed CPUs and return them; None where the OS cannot. Every side of a benchmark then runs
    on the same cores, whatever else the machine runs. Asking for more cores than are allowed
    pins all of them."""
    if count < 1:
        raise ValueError(f"pin_cores: count must be at least 1 (got {count})")
    if not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))[:count]
    os.sched_setaffinity(0, set(cores))
    return cores


def pin_one_core() -> int | None:
    """Pin this process (and what it forks later) to its lowest allowed CPU; None where the OS
    cannot. Both sides then share one core, whatever else the machine runs."""
    cores = pin_cores(1)
    return cores[0] if cores else None


MIN_ROUNDS = 3  # every side runs at least this many alternating rounds; the median counts


def rounds_arg(text: str) -> int:
    """argparse type of --rounds: an integer of at least MIN_ROUNDS (a median of fewer is noise)."""
    value = int(text)
    if value < MIN_ROUNDS:
        raise argparse.ArgumentTypeError(f"--rounds must be at least {MIN_ROUNDS} (got {value}): the median of fewer rounds is not a measurement")
    return value


@dataclass(frozen=True)
class Timing:
    """One timed run: wall seconds, and CPU seconds of this process plus the child processes
    it waited for during the run (a forked worker's CPU counts too)."""

    wall_s: float
    cpu_s: float


def _children_cpu_s() -> float:
    """CPU seconds of the child processes this process has waited for (microsecond resolution,
    unlike os.times' clock ticks)."""
    try:
        import resource
    except ImportError:  # not on this OS: children are not counted
        return 0.0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, Timing]:
    """(fn(*args, **kwargs), its Timing)."""
    wall, cpu, children = time.perf_counter(), time.process_time(), _children_cpu_s()
    result = fn(*args, **kwargs)
    wall, cpu, children = time.perf_counter() - wall, time.process_time() - cpu, _children_cpu_s() - children
    return result, Timing(wall, cpu + children)


def median_rate(work: float, seconds: Iterable[float]) -> float:
    """`work` per second at the median of the rounds' seconds (e.g. documents / median time)."""
    return work / statistics.median(seconds)


def median_chunk_rate(chunks: Iterable[tuple[int, float]], work_per_step: float) -> float:
    """Training benchmarks alternate the sides in chunks of steps; each chunk of a side is one
    round: (timed steps, seconds). The rate (work per second) of the median round; chunks
    without a timed step (all warm-up) are left out."""
    rates = [steps * work_per_step / seconds for steps, seconds in chunks if steps and seconds > 0]
    if not rates:
        raise ValueError("median_chunk_rate: no chunk with a timed step; raise --steps or lower --warmup")
    return statistics.median(rates)


def allowed_cores() -> list[int] | None:
    """The CPUs this process may run on (None where the OS cannot say)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def clear_lru_caches(module_prefixes: Iterable[str]) -> int:
    """Empty every functools cache (lru_cache / cache) defined at the top level of, or in a
    class of, the imported modules whose names start with one of `module_prefixes`; returns how
    many it emptied. A side's rounds then all start cold, like its first."""
    import inspect

    prefixes = tuple(module_prefixes)
    cleared = 0
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(prefixes):
            continue
        owners = [vars(module)] + [vars(obj) for obj in vars(module).values() if inspect.isclass(obj) and obj.__module__ == name]
        for namespace in owners:
            for obj in list(namespace.values()):
                if callable(getattr(obj, "cache_clear", None)) and hasattr(obj, "cache_info"):
                    obj.cache_clear()
                    cleared += 1
    return cleared


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
