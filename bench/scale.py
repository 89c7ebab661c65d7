"""lmf bench scale: does the cost per document stay flat as the corpus grows, and are the cores used?

    lmf bench scale --sizes 20000,100000,400000            # the sizes of the issue (hours on 2 cores)
    lmf bench scale --sizes 20000,100000,200000 --rounds 3 # what a 2-core machine does in ~30 min

For every size a corpus of real text is generated once (not timed): paragraphs of the WARC
pages in --data (reduced to main text with resiliparse), recombined at random into documents
of 3-10 paragraphs, written as JSONL files of --docs-per-file documents. A share of the
documents are planted copies of an earlier original: exact copies (whitespace changed only,
--exact-share) and near-duplicates (about one word in a hundred replaced, shingle Jaccard
~0.9 with the original, --near-share). Then ingest -> exact_dedup -> near_dedup run through
the real stage code (``run_stage``, the default config apart from the --set overrides and
ingest's shard size), into a fresh store per run.

Measured per stage and size: wall seconds, CPU seconds of this process and every process
below it (pool workers, a local Dask cluster: psutil's view of the process tree, sampled at
the start and end of the stage), the peak memory of the tree (PSS, so pages a forked worker
shares with its parent count once; sampled every 0.1 s) and the
planted duplicates found. The sizes take turns within each round (alternating rounds, the
median of at least 3 per size, bench/README.md "How we measure").

The last stdout line (JSON): ``ours`` = CPU microseconds per document at the largest size
(all three stages), ``baseline`` = the same at the smallest size, ``ratio`` = baseline / ours
(1.0: flat; goal >= 0.9), ``quality.cpu_per_wall`` (CPU seconds / wall seconds of the whole
run at the largest size; goal >= 1.8 on 2 cores), ``quality.peak_rss_mb`` per size,
``quality.recall`` per size (planted exact and near duplicates removed by their stage) and
``quality.per_stage`` (per size and stage: us_per_doc, wall_s, cpu_s, cpu_per_wall, peak_rss_mb).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import psutil
import pyarrow.parquet as pq

from lmfoundry.bench._common import DEFAULT_DATA, MIN_ROUNDS, allowed_cores, pin_cores, print_result, rounds_arg, warc_paths, warc_texts
from lmfoundry.flows.pipeline import stage
from lmfoundry.infra.config import PipelineConfig, build_config
from lmfoundry.infra.parallel import close_dask_clients
from lmfoundry.infra.stage import run_stage
from lmfoundry.infra.store import StageRef, Store

STAGES = ("ingest", "exact_dedup", "near_dedup")
MIN_PARAGRAPH_WORDS = 8
NEAR_MIN_WORDS = 120  # near-duplicates are planted on originals this long, so one edit per 100 words keeps Jaccard ~0.9


# ---------------------------------------------------------------- the corpus


def paragraphs(data: str | Path) -> list[str]:
    """The distinct lines of at least MIN_PARAGRAPH_WORDS words of every WARC page, sorted."""
    found = set()
    for text in warc_texts(warc_paths(data), skip_empty=True):
        for line in text.splitlines():
            line = " ".join(line.split())
            if len(line.split()) >= MIN_PARAGRAPH_WORDS:
                found.add(line)
    if len(found) < 100:
        raise SystemExit(f"bench scale: only {len(found)} paragraphs of {MIN_PARAGRAPH_WORDS}+ words in {data}; pass --data with more WARC pages")
    return sorted(found)


def near_copy(text: str, rng: random.Random) -> str:
    """`text` with about one word in a hundred replaced by a word not in it."""
    words = text.split(" ")
    for _ in range(max(1, len(words) // 100)):
        words[rng.randrange(len(words))] = f"edited{rng.randrange(10**6)}"
    return " ".join(words)


def generate_corpus(folder: Path, size: int, paras: list[str], *, seed: int, near_share: float, exact_share: float, docs_per_file: int) -> dict[str, list[str]]:
    """Write `size` documents as folder/part-NNNNN.jsonl ({"id", "text"}); returns the ids of
    the planted copies: {"exact": [...], "near": [...]}. Seeded: the same arguments give the same files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    originals: list[str] = []  # texts of the original documents so far
    long_originals: list[int] = []
    planted: dict[str, list[str]] = {"exact": [], "near": []}
    fh = None
    for i in range(size):
        if i % docs_per_file == 0:
            if fh:
                fh.close()
            fh = open(folder / f"part-{i // docs_per_file:05d}.jsonl", "w", encoding="utf-8")
        doc_id, roll = f"doc-{i:08d}", rng.random()
        if roll < exact_share and originals:
            text = rng.choice(originals).replace(" ", "  ", 3)  # equal after whitespace normalisation
            planted["exact"].append(doc_id)
        elif roll < exact_share + near_share and long_originals:
            text = near_copy(originals[rng.choice(long_originals)], rng)
            planted["near"].append(doc_id)
        else:
            text = "\n".join(rng.sample(paras, rng.randint(3, 10)))
            if len(text.split()) >= NEAR_MIN_WORDS:
                long_originals.append(len(originals))
            originals.append(text)
        fh.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
    if fh:
        fh.close()
    (folder / "planted.json").write_text(json.dumps(planted))
    return planted


def corpus_for(work: Path, size: int, paras: list[str], args: argparse.Namespace) -> tuple[Path, dict[str, list[str]]]:
    folder = work / f"corpus-{size}"
    planted = generate_corpus(folder, size, paras, seed=args.seed, near_share=args.near_share, exact_share=args.exact_share, docs_per_file=args.docs_per_file)
    return folder, planted


# ---------------------------------------------------------------- measuring a process tree


def tree() -> list[psutil.Process]:
    me = psutil.Process()
    return [me] + me.children(recursive=True)


def tree_cpu() -> dict[int, float]:
    """CPU seconds per live process of the tree, including the children each has waited for."""
    cpu = {}
    for proc in tree():
        try:
            t = proc.cpu_times()
            cpu[proc.pid] = t.user + t.system + t.children_user + t.children_system
        except psutil.Error:  # ended between listing and reading
            pass
    return cpu


class PeakRss:
    """Samples the summed memory (PSS) of the process tree every `every_s` in a thread; `.peak_mb`."""

    def __init__(self, every_s: float = 0.1):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for proc in tree():
                try:  # PSS: a forked worker's pages shared with its parent count once, not twice
                    total += proc.memory_full_info().pss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.every_s)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def measured_stage(store: Store, cfg: PipelineConfig, name: str, inputs: list[StageRef]) -> tuple[StageRef, dict[str, float]]:
    before, wall = tree_cpu(), time.perf_counter()
    with PeakRss() as rss:
        outcome = run_stage(store, stage(name), cfg, inputs)
    wall, after = time.perf_counter() - wall, tree_cpu()
    cpu = sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())
    return outcome.ref, {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": rss.peak_mb, "docs_in": outcome.stats.get("docs_in", 0)}


# ---------------------------------------------------------------- a real Dask cluster on loopback


@contextmanager
def loopback_dask(workers: int) -> Iterator[str]:
    """A `dask scheduler` and `workers` single-thread `dask worker` processes on 127.0.0.1 (our
    children, so their CPU counts); yields the scheduler address."""
    from distributed import Client

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    dask = str(Path(sys.executable).with_name("dask"))
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], **quiet)]
    try:
        procs += [subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--nworkers", "1", "--no-nanny", "--no-dashboard"], **quiet) for _ in range(workers)]
        with Client(address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=120)
        yield address
    finally:
        close_dask_clients()  # the stages' client, before its scheduler goes
        for proc in reversed(procs):  # the workers first: without a scheduler they keep reconnecting
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------- one run


def stage_config(corpus: Path, store: Path, args: argparse.Namespace, overrides: list[str]) -> PipelineConfig:
    data: dict[str, Any] = {
        "store": {"url": str(store), "pipeline": "bench-scale"},
        "compute": {"workers": args.workers, "progress": False},
        "ingest": {"sources": [{"name": "scale", "paths": [str(corpus / "*.jsonl")], "id_field": "id"}], "target_shard_bytes": args.shard_mb * 2**20},
    }
    return build_config(data, overrides=overrides, origin="lmf bench scale")


def removed_ids(store: Store, ref: StageRef) -> set[str]:
    reader = store.reader(ref)
    ids: set[str] = set()
    for path in reader.files("removed/", ".parquet"):
        ids.update(pq.read_table(reader.local_path(path), columns=["id"]).column("id").to_pylist())
    return ids


def run_once(corpus: Path, planted: dict[str, list[str]], work: Path, args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    store_dir = Path(tempfile.mkdtemp(prefix="store-", dir=work))
    try:
        cfg = stage_config(corpus, store_dir, args, overrides)
        store = Store.from_config(cfg.store)
        stages, inputs, refs = {}, [], {}
        for name in STAGES:
            ref, stages[name] = measured_stage(store, cfg, name, inputs)
            refs[name], inputs = ref, [ref]
        exact_removed, near_removed = removed_ids(store, refs["exact_dedup"]), removed_ids(store, refs["near_dedup"])
        recall = {
            "exact": round(len(exact_removed & set(planted["exact"])) / max(1, len(planted["exact"])), 4),
            "near": round(len(near_removed & set(planted["near"])) / max(1, len(planted["near"])), 4),
            "planted_exact": len(planted["exact"]),
            "planted_near": len(planted["near"]),
            "removed_exact": len(exact_removed),
            "removed_near": len(near_removed),
        }
        return {"stages": stages, "recall": recall, "task_runner": cfg.compute.task_runner}
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)


# ---------------------------------------------------------------- summary


def summarize(size: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over the rounds of one size, per stage and for the whole run."""
    def med(stage_name: str | None, key: str) -> float:
        if stage_name is None:
            return statistics.median(sum(r["stages"][s][key] for s in STAGES) for r in runs)
        return statistics.median(r["stages"][stage_name][key] for r in runs)

    per_stage = {}
    for name in STAGES:
        cpu, wall = med(name, "cpu_s"), med(name, "wall_s")
        per_stage[name] = {
            "us_per_doc": round(cpu / size * 1e6, 1),
            "wall_us_per_doc": round(wall / size * 1e6, 1),
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "cpu_per_wall": round(cpu / wall, 2) if wall else None,
            "peak_rss_mb": round(max(r["stages"][name]["peak_rss_mb"] for r in runs), 1),
        }
    cpu, wall = med(None, "cpu_s"), med(None, "wall_s")
    return {
        "us_per_doc": cpu / size * 1e6,
        "wall_us_per_doc": wall / size * 1e6,
        "cpu_per_wall": cpu / wall if wall else 0.0,
        "peak_rss_mb": round(max(s["peak_rss_mb"] for s in per_stage.values()), 1),
        "per_stage": per_stage,
        "recall": runs[-1]["recall"],
        "rounds_s": [round(sum(r["stages"][s]["wall_s"] for s in STAGES), 2) for r in runs],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lmf bench scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="20000,100000,400000", help="documents per corpus, comma-separated (smallest and largest give the ratio)")
    p.add_argument("--rounds", type=rounds_arg, default=MIN_ROUNDS, help=f"rounds per size, the sizes taking turns (at least {MIN_ROUNDS}; the median counts)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder of WARC files (or one .warc.gz) whose paragraphs make the documents")
    p.add_argument("--work", default=None, help="folder for the corpora and stores (default: a temporary folder, removed at the end)")
    p.add_argument("--workers", type=int, default=2, help="compute.workers")
    p.add_argument("--cores", type=int, default=2, help="pin this process and its workers to this many cores")
    p.add_argument("--shard-mb", type=int, default=8, help="ingest.target_shard_bytes in MiB (small enough that the smallest size has a shard per worker)")
    p.add_argument("--docs-per-file", type=int, default=5000, help="documents per generated JSONL file")
    p.add_argument("--near-share", type=float, default=0.02, help="share of documents planted as near-duplicates of an earlier one")
    p.add_argument("--exact-share", type=float, default=0.01, help="share of documents planted as exact (whitespace-only) copies")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dask", choices=("off", "only", "compare"), default="off",
                   help="run on a real Dask scheduler with --workers single-thread worker processes on loopback: "
                        "only there, or compare (each run also on Dask, in turn; dask_wall_ratio = Dask wall / local wall)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config override, e.g. compute.task_runner=dask (repeatable)")
    args = p.parse_args(argv)
    args.sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if not args.sizes or args.sizes[0] < 100:
        p.error(f"--sizes: give sizes of at least 100 documents (got {args.sizes})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = pin_cores(args.cores)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lmf-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        sides = {"local": list(args.set)}
        if args.dask != "off":
            address = stack.enter_context(loopback_dask(args.workers))
            dask = ["compute.task_runner=dask", f"compute.dask_address={address}"] + args.set
            sides = {"dask": dask} if args.dask == "only" else {"local": list(args.set), "dask": dask}
        return measure(args, sides, work, cores)


def measure(args: argparse.Namespace, sides: dict[str, list[str]], work: Path, cores: list[int] | None) -> int:
    """Every round runs every size, and every side (local runner, Dask) per size, in turn."""
    try:
        paras = paragraphs(args.data)
        corpora = {size: corpus_for(work, size, paras, args) for size in args.sizes}
        runs: dict[str, dict[int, list[dict[str, Any]]]] = {side: {size: [] for size in args.sizes} for side in sides}
        for r in range(args.rounds):
            for size in args.sizes:
                for side, overrides in sides.items():
                    folder, planted = corpora[size]
                    runs[side][size].append(run_once(folder, planted, work, args, overrides))
                    print(f"round {r + 1} size {size} {side}: {json.dumps(runs[side][size][-1]['stages'])}", file=sys.stderr, flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    first = next(iter(sides))
    summary = {size: summarize(size, runs[first][size]) for size in args.sizes}
    small, large = summary[args.sizes[0]], summary[args.sizes[-1]]
    settings = {
        "task_runner": runs[first][args.sizes[0]][0]["task_runner"],
        "workers": args.workers,
        "cores": cores or allowed_cores(),
        "rounds": args.rounds,
        "statistic": "median",
        "clock": "CPU seconds of the process tree (psutil), wall beside; Dask vs local: wall",
        "shard_mb": args.shard_mb,
        "docs_per_file": args.docs_per_file,
        "near_share": args.near_share,
        "exact_share": args.exact_share,
        "overrides": args.set,
        "dask": args.dask,
        "paragraphs": len(paras),
    }
    quality: dict[str, Any] = {
        "cpu_per_wall": round(large["cpu_per_wall"], 3),
        "cpu_per_wall_by_size": {str(s): round(v["cpu_per_wall"], 3) for s, v in summary.items()},
        "wall_ratio": round(small["wall_us_per_doc"] / large["wall_us_per_doc"], 3),
        "peak_rss_mb": {str(s): v["peak_rss_mb"] for s, v in summary.items()},
        "recall": {str(s): v["recall"] for s, v in summary.items()},
        "per_stage": {str(s): v["per_stage"] for s, v in summary.items()},
        "rounds_s": {str(s): v["rounds_s"] for s, v in summary.items()},
    }
    extra = {}
    if len(sides) == 2:
        on_dask = {size: summarize(size, runs["dask"][size]) for size in args.sizes}
        quality["dask"] = {str(s): {"per_stage": v["per_stage"], "rounds_s": v["rounds_s"], "recall": v["recall"]} for s, v in on_dask.items()}
        # wall of the whole run on Dask / on the local runner, per size (medians of the rounds)
        quality["dask_wall_vs_local"] = {str(s): round(on_dask[s]["wall_us_per_doc"] / summary[s]["wall_us_per_doc"], 3) for s in args.sizes}
        quality["dask_cpu_vs_local"] = {str(s): round(on_dask[s]["us_per_doc"] / summary[s]["us_per_doc"], 3) for s in args.sizes}
        extra["dask_wall_ratio"] = quality["dask_wall_vs_local"][str(args.sizes[-1])]
    print_result(
        "scale", "cpu_us_per_doc", large["us_per_doc"], f"{args.sizes[0]} docs", small["us_per_doc"],
        n=args.sizes,
        ratio=small["us_per_doc"] / large["us_per_doc"],
        quality=quality,
        settings={"ours": settings},
        ratio_means="per-document CPU cost at the smallest size / at the largest (1.0 = flat)",
        **extra,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
