"""Benchmark: near-duplicate removal, ours vs datatrove's MinHash pipeline vs plain datasketch.

    lmf bench dedup [--data /work/shared/data] [--files llvm15.warc.gz llvm16.warc.gz] [--pages-per-file N]
                    [--rounds 3] [--bands B --rows R] [--recall-target 0.99] [--skip-datatrove] [--skip-memory]

Corpus: the HTML pages of the WARC files (by default LLVM 15 and LLVM 16 documentation: two
releases of the same pages, so real near-duplicates), reduced to their main text with
resiliparse inside this benchmark. Every method sees the same texts in the same order.

The three sides: ours is the whole ``near_dedup`` stage through the stage runner (read the input
shards; signatures, band buckets, band groups, components, verified clusters; filtered output
and side artifacts written and committed to a local store; one worker). datatrove runs its 4
MinHash steps (signatures, buckets, clusters, filter with a JSONL writer) with
LocalPipelineExecutor in a temporary directory, one worker (in this process), SHA-1 shingle
hashes (its default xxhash path fails on str input with xxhash 4). datasketch is the plain
loop: shingle sets, ``MinHash.bulk``, then ``MinHashLSH`` query-then-insert in input order (a
document whose query hits a kept document is removed for the earliest hit). All use 128
permutations and word 5-grams, run on the same pinned core, and are timed in CPU seconds of
this process and its waited-for children (``time.process_time`` + ``RUSAGE_CHILDREN``), which other processes on a shared
machine disturb far less than wall time (wall seconds are reported beside).

1. Same layout (the headline): every side with the same LSH bands x rows (--bands/--rows;
   by default the layout our stage chooses for --threshold), --rounds alternating rounds,
   the median round counts. ``ratio`` is ours / datatrove docs/s, ``ratio_vs_datasketch``
   ours / datasketch.
2. Each side at its own best layout for the same recall target (``quality.best_for_recall``):
   every side tries the layouts of LAYOUTS (bands x rows <= 128, fewest bands first) and keeps
   the first whose recall reaches --recall-target: the fewest bands that reach it, which is the
   least LSH work and, for the two methods that do not verify candidates, the fewest false
   positives. Then --rounds alternating rounds of every side at its own layout, median.
3. Quality, against brute-force exact Jaccard of word 5-gram sets (NFKC, lower case,
   whitespace split; computed here with strings and a sparse matrix product, not with any
   method's hashes); a "true pair" has Jaccard >= threshold:
   - recall: true pairs that do not both survive (the output no longer holds the duplicate);
   - same_cluster_recall (stricter, for reference): true pairs whose documents were removed
     one for the other or both for the same keeper;
   - precision: removals whose exact Jaccard with the keeper they were removed for is
     >= threshold;
   - bad removals: removals whose exact Jaccard with their keeper is below 0.7.
4. Memory (ours only): peak memory (Python heap via tracemalloc + Arrow's pool) of our
   band-groups (bucket), components and clusters steps, each re-run in a fresh subprocess, on
   the corpus and on a corpus twice as large with the same kind of data (the pages again with
   their words reversed: same lengths and near-duplicate structure, no match with the
   originals). Input shards of 250 documents (a growing corpus has more shards of the same
   size) and small partition sizes, so the partitioning is exercised. The cluster step holds
   whole components, so its peak follows the partition budget and the largest component
   (here the two LangRef pages, ~1 MB of shingle hashes each), not the corpus size.

The last stdout line is the JSON result; ``settings.<side>`` holds each side's bands and rows
(same layout) and ``settings.<side>.best_for_recall`` its own layout for the recall target.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lmfoundry.bench._common import (
    DEFAULT_DATA,
    alternating_rounds,
    commit_doc_shards,
    median_rate,
    pin_one_core,
    Timing,
    print_result,
    rounds_arg,
    timed,
    warc_paths,
    warc_texts,
)
from lmfoundry.infra.config import NearDedupConfig, PipelineConfig
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.infra.store import StageDir, StageRef, Store
from lmfoundry.tasks.dedup.minhash import choose_bands

SPEC = StageSpec("near_dedup", "lmfoundry.tasks.dedup.near_dedup:run_near_dedup", section="near_dedup")
BAD_REMOVAL = 0.7
NGRAM = 5
MEMORY_SHARD_DOCS = 250
NUM_PERM = 128
# the layouts each side tries for the recall target, fewest bands first: bands x (128 // bands) rows
LAYOUTS = [(b, NUM_PERM // b) for b in (4, 6, 8, 9, 10, 12, 14, 16, 20, 25, 32)]


# ---------------------------------------------------------------- corpus


def reference_shingles(text: str) -> set[str]:
    words = unicodedata.normalize("NFKC", text).lower().split()
    return {" ".join(words[i : i + NGRAM]) for i in range(max(1, len(words) - NGRAM + 1))} if words else set()


class ExactJaccard:
    """Brute-force exact Jaccard of every document pair with a shared shingle (sparse product)."""

    def __init__(self, texts: list[str]):
        import scipy.sparse as sp

        vocab: dict[str, int] = {}
        rows, cols = [], []
        for i, text in enumerate(texts):
            ids = [vocab.setdefault(s, len(vocab)) for s in reference_shingles(text)]
            rows.extend([i] * len(ids))
            cols.extend(ids)
        matrix = sp.csr_matrix((np.ones(len(rows), np.int32), (rows, cols)), shape=(len(texts), max(len(vocab), 1)))
        self.n = len(texts)
        self.sizes = np.asarray(matrix.sum(axis=1)).ravel()
        inter = (matrix @ matrix.T).tocoo()
        upper = inter.row < inter.col
        a, b, shared = inter.row[upper].astype(np.int64), inter.col[upper].astype(np.int64), inter.data[upper]
        order = np.argsort(a * self.n + b)
        self.keys = (a * self.n + b)[order]
        self.values = (shared / (self.sizes[a] + self.sizes[b] - shared))[order]

    def __call__(self, i: int, j: int) -> float:
        if i == j:
            return 1.0
        key = min(i, j) * self.n + max(i, j)
        at = np.searchsorted(self.keys, key)
        return float(self.values[at]) if at < len(self.keys) and self.keys[at] == key else 0.0

    def pairs_at_least(self, threshold: float) -> np.ndarray:
        keys = self.keys[self.values >= threshold]
        return np.stack(np.divmod(keys, self.n), axis=1)


def score(removed: dict[int, int], truth: ExactJaccard, threshold: float) -> dict[str, Any]:
    """removed: document -> the kept document it was removed for."""
    pairs = truth.pairs_at_least(threshold)
    gone = np.zeros(truth.n, bool)
    gone[list(removed)] = True
    caught = int((gone[pairs[:, 0]] | gone[pairs[:, 1]]).sum())
    cluster = np.arange(truth.n)
    cluster[list(removed)] = list(removed.values())
    same_cluster = int((cluster[pairs[:, 0]] == cluster[pairs[:, 1]]).sum())
    with_keeper = np.array([truth(d, k) for d, k in removed.items()])
    return {
        "removed": len(removed),
        "recall": round(caught / max(len(pairs), 1), 4),
        "precision": round(float((with_keeper >= threshold).mean()) if len(removed) else 1.0, 4),
        "bad_removals": int((with_keeper < BAD_REMOVAL).sum()),
        "same_cluster_recall": round(same_cluster / max(len(pairs), 1), 4),
        "true_pairs": int(len(pairs)),
        "true_pairs_both_kept": int(len(pairs) - caught),
    }


# ---------------------------------------------------------------- ours


def commit_input(store: Store, texts: list[str], shards: int) -> StageRef:
    per = -(-len(texts) // shards)
    ranges = (range(s * per, min(len(texts), (s + 1) * per)) for s in range(shards))
    return commit_doc_shards(store, ([{"id": str(i), "text": texts[i], "source": "bench"} for i in r] for r in ranges))


def removed_by_ours(store: Store, ref: StageRef) -> dict[int, int]:
    reader = store.reader(ref)
    removed = {}
    for path in reader.files("removed/", ".parquet"):
        table = reader.read_table(path, columns=["id", "keeper_id"])
        removed.update({int(d): int(k) for d, k in zip(table.column("id").to_pylist(), table.column("keeper_id").to_pylist())})
    return removed


def run_ours(texts: list[str], bands: int, rows: int, args: argparse.Namespace, workdir: str) -> tuple[Timing, dict[int, int], dict]:
    """Our stage at this layout; the input shards are written before the clock starts."""
    cfg = NearDedupConfig(threshold=args.threshold, num_perm=NUM_PERM, bands=bands, rows=rows)
    root = os.path.join(workdir, f"ours-{time.monotonic_ns()}")
    store = Store(root)
    ref = commit_input(store, texts, args.shards)
    pipeline = PipelineConfig(near_dedup=cfg, compute={"workers": 1, "progress": False})
    SPEC.module()  # imported before the clock starts
    outcome, timing = timed(run_stage, store, SPEC, pipeline, [ref])
    removed = removed_by_ours(store, outcome.ref)
    shutil.rmtree(root, ignore_errors=True)
    return timing, removed, outcome.stats


# ---------------------------------------------------------------- baselines


def datasketch_dedup(texts: list[str], bands: int, rows: int) -> dict[int, int]:
    from datasketch import MinHash, MinHashLSH

    sets = [{s.encode("utf-8") for s in reference_shingles(t)} for t in texts]
    minhashes = MinHash.bulk(sets, num_perm=NUM_PERM)
    lsh = MinHashLSH(num_perm=NUM_PERM, params=(bands, rows))
    removed = {}
    for i, (shingles, minhash) in enumerate(zip(sets, minhashes)):
        if not shingles:
            continue  # an empty set matches every other empty set; nobody's duplicate
        hits = lsh.query(minhash)
        if hits:
            removed[i] = min(hits)
        else:
            lsh.insert(i, minhash)
    return removed


def run_datasketch(texts: list[str], bands: int, rows: int, args: argparse.Namespace, workdir: str) -> tuple[Timing, dict[int, int], dict]:
    import datasketch  # noqa: F401  (imported before the clock starts)

    removed, timing = timed(datasketch_dedup, texts, bands, rows)
    return timing, removed, {}


def run_datatrove(texts: list[str], bands: int, rows: int, args: argparse.Namespace, workdir: str) -> tuple[Timing, dict[int, int], dict]:
    import logging

    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.logging import logger

    logger.remove()  # its per-step logging to stderr would dominate the output
    logging.getLogger("datatrove").setLevel(logging.ERROR)
    # a fresh folder every run: the executor skips tasks whose completion marker it finds
    base = os.path.join(workdir, f"datatrove-{time.monotonic_ns()}")
    # its default xxhash shingle hash fails on str input with xxhash 4 (TypeError), so SHA-1 like ours
    config = MinhashConfig(n_grams=NGRAM, num_buckets=bands, hashes_per_bucket=rows, hash_config=HashConfig(precision=64, hash_fc="sha1"))
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]

    def executor(name: str, pipeline: list, tasks: int = 1) -> LocalPipelineExecutor:
        return LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=f"{base}/logs/{name}")

    steps = [
        executor("signatures", [docs, MinhashDedupSignature(output_folder=f"{base}/sigs", config=config)]),
        executor("buckets", [MinhashDedupBuckets(input_folder=f"{base}/sigs", output_folder=f"{base}/buckets", config=config)], tasks=bands),
        executor("clusters", [MinhashDedupCluster(input_folder=f"{base}/buckets", output_folder=f"{base}/remove", config=config, save_cluster_id=True)]),
        executor(
            "filter",
            [
                docs,
                MinhashDedupFilter(input_folder=f"{base}/remove", exclusion_writer=JsonlWriter(f"{base}/removed", compression=None), load_cluster_ids=True),
                JsonlWriter(f"{base}/kept", compression=None),
            ],
        ),
    ]
    _, timing = timed(lambda: [step.run() for step in steps])
    removed = _datatrove_removals(base)
    shutil.rmtree(base, ignore_errors=True)
    return timing, removed, {}


SIDES: dict[str, Callable[..., tuple[Timing, dict[int, int], dict]]] = {"ours": run_ours, "datasketch": run_datasketch, "datatrove": run_datatrove}


def _datatrove_removals(base: str) -> dict[int, int]:
    """Removed document -> the kept document of its cluster (datatrove keeps one per cluster)."""

    def read(folder: str) -> list[dict]:
        rows = []
        for path in sorted(Path(folder).glob("*.jsonl")):
            rows.extend(json.loads(line) for line in path.read_text().splitlines() if line)
        return rows

    keeper_of_cluster = {}
    for doc in read(f"{base}/kept"):
        cluster = doc["metadata"].get("minhash_cluster_id", -1)
        if cluster != -1:
            keeper_of_cluster[cluster] = int(doc["id"])
    return {int(d["id"]): keeper_of_cluster[d["metadata"]["minhash_cluster_id"]] for d in read(f"{base}/removed")}


# ---------------------------------------------------------------- memory


def memory_profile(sizes: list[tuple[str, list[str]]], workdir: str) -> dict[str, Any]:
    """Peak memory of the band-groups, components and clusters steps at each corpus size."""
    from lmfoundry.tasks.dedup.near_dedup import run_near_dedup

    knobs = {"bucket_partition_rows": 5_000, "cluster_partition_bytes": 2**18}
    cfg = NearDedupConfig(**knobs)
    result: dict[str, Any] = {"config": {**knobs, "docs_per_input_shard": MEMORY_SHARD_DOCS}, "sizes": []}
    for name, texts in sizes:
        store = Store(os.path.join(workdir, f"memory-{name}"))
        # a growing corpus has more shards of the same size, as an ingest stage would write it
        ref = commit_input(store, texts, -(-len(texts) // MEMORY_SHARD_DOCS))
        out = store.open_for_write("near_dedup", "memory")
        stats = run_near_dedup(cfg, [ref], out)
        row: dict[str, Any] = {"corpus": name, "docs": len(texts), "partitions": stats.partitions}
        for step in ("groups", "components", "clusters"):
            spec = {"store": store.url, "version": "memory", "input": ref.model_dump(), "config": cfg.model_dump(), "step": step}
            child = subprocess.run(
                [sys.executable, "-m", "lmfoundry.bench.dedup", "--memory-child", json.dumps(spec)],
                capture_output=True,
                text=True,
                cwd=Path(__file__).resolve().parent.parent,
                check=True,
            )
            row[f"{step}_peak_mib"] = round(json.loads(child.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20, 2)
        result["sizes"].append(row)
    return result


def memory_child(spec: dict[str, Any]) -> None:
    """Re-run one step of a finished (uncommitted) stage directory and print its peak memory."""
    import tracemalloc

    import pyarrow as pa

    from lmfoundry.tasks.dedup import lsh_clusters as lc
    from lmfoundry.tasks.dedup import near_dedup as nd

    cfg = NearDedupConfig(**spec["config"])
    store = Store(spec["store"])
    out = StageDir(store, "near_dedup", spec["version"])
    plan = nd.make_plan(cfg, out, [StageRef(**spec["input"])])
    index = lc.find_components(cfg, out, plan)
    pool = pa.default_memory_pool()
    tracemalloc.start()
    if spec["step"] == "groups":
        for p in range(plan["bucket_partitions"]):
            lc.groups_partition(out, plan, p)
    elif spec["step"] == "components":
        lc.compute_components(cfg, out, plan)
    else:
        for q in range(index["partitions"]):
            lc.cluster_partition(cfg, out, plan, q)
    peak = tracemalloc.get_traced_memory()[1] + pool.max_memory()
    print(json.dumps({"peak_bytes": peak}))


# ---------------------------------------------------------------- the two comparisons


def timed_rounds(texts: list[str], layouts: dict[str, tuple[int, int]], args: argparse.Namespace, workdir: str) -> dict[str, dict[str, Any]]:
    """--rounds alternating rounds of every side at its layout. Per side: docs/s at the median
    CPU seconds, every round's CPU and wall seconds, and the last round's removals and stats."""

    def side(name: str) -> Callable[[int], tuple[Timing, dict[int, int], dict]]:
        return lambda _: SIDES[name](texts, *layouts[name], args, workdir)

    runs = alternating_rounds({name: side(name) for name in layouts}, args.rounds)
    result = {}
    for name, rounds in runs.items():
        cpu, wall = [t.cpu_s for t, _, _ in rounds], [t.wall_s for t, _, _ in rounds]
        print(f"{name} at {layouts[name][0]}x{layouts[name][1]}: cpu seconds per round {[round(x, 2) for x in cpu]}", file=sys.stderr)
        result[name] = {
            "docs_per_s": median_rate(len(texts), cpu),
            "cpu_s": [round(x, 3) for x in cpu],
            "wall_s": [round(x, 3) for x in wall],
            "removed_by": rounds[-1][1],
            "stats": rounds[-1][2],
        }
    return result


def best_layout(name: str, texts: list[str], truth: ExactJaccard, args: argparse.Namespace, workdir: str, known: dict[tuple[int, int], float]) -> dict[str, Any]:
    """The first layout of LAYOUTS (fewest bands first) whose recall reaches --recall-target
    for this side; `known` holds recalls measured already. None reaching it: the best recall."""
    tried = []
    for bands, rows in LAYOUTS:
        recall = known.get((bands, rows))
        if recall is None:
            _, removed, _ = SIDES[name](texts, bands, rows, args, workdir)
            recall = score(removed, truth, args.threshold)["recall"]
        tried.append({"bands": bands, "rows": rows, "recall": recall})
        if recall >= args.recall_target:
            return {"bands": bands, "rows": rows, "target_met": True, "tried": tried}
    best = max(tried, key=lambda t: t["recall"])
    return {"bands": best["bands"], "rows": best["rows"], "target_met": False, "tried": tried}


def side_report(run: dict[str, Any], truth: ExactJaccard, threshold: float) -> dict[str, Any]:
    return {"docs_per_s": round(run["docs_per_s"], 1), "cpu_s": run["cpu_s"], "wall_s": run["wall_s"], **score(run["removed_by"], truth, threshold)}


def load_texts(args: argparse.Namespace) -> list[str]:
    """The pages of every file, in file order (the first --pages-per-file of each, when given)."""
    paths = warc_paths(args.data, args.files)
    return [t for path in paths for t in warc_texts([path], args.pages_per_file)]


# ---------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmf bench dedup", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--files", nargs="+", default=["llvm15.warc.gz", "llvm16.warc.gz"])
    parser.add_argument("--pages-per-file", type=int, default=None, help="the first N pages of each file (default: all)")
    parser.add_argument("--rounds", type=rounds_arg, default=3, help="alternating rounds per side (at least 3; the median counts)")
    parser.add_argument("--shards", type=int, default=1, help="input shards for our stage")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--bands", type=int, help="the layout every side uses in the same-layout comparison (with --rows; default: the one our stage chooses)")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--recall-target", type=float, default=0.99, help="recall each side's own best layout must reach")
    parser.add_argument("--skip-datatrove", action="store_true")
    parser.add_argument("--skip-best", action="store_true", help="skip the own-best-layout comparison")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return 0
    if (args.bands is None) != (args.rows is None) or (args.bands and args.bands * args.rows > NUM_PERM):
        parser.error(f"give --bands and --rows together, with bands x rows <= {NUM_PERM}")

    core = pin_one_core()  # every side, and the memory children, on the same core
    texts = load_texts(args)
    print(f"{len(texts)} pages from {', '.join(args.files)}, pinned to CPU {core}", file=sys.stderr)
    truth = ExactJaccard(texts)
    if args.bands is None:
        chosen = NearDedupConfig(threshold=args.threshold, num_perm=NUM_PERM)
        args.bands, args.rows = choose_bands(args.threshold, NUM_PERM, chosen.false_positive_weight, chosen.false_negative_weight)
    sides = ["ours", "datasketch"] + ([] if args.skip_datatrove else ["datatrove"])
    same = (args.bands, args.rows)

    with tempfile.TemporaryDirectory(prefix="lmf-bench-dedup-") as workdir:
        runs = timed_rounds(texts, {name: same for name in sides}, args, workdir)
        same_report = {name: side_report(runs[name], truth, args.threshold) for name in sides}
        stats = runs["ours"]["stats"]
        quality: dict[str, Any] = {"threshold": args.threshold, "true_pairs": same_report["ours"]["true_pairs"], "same_layout": {"bands": same[0], "rows": same[1], **same_report}}
        best: dict[str, dict[str, Any]] = {}
        if not args.skip_best:
            best = {name: best_layout(name, texts, truth, args, workdir, {same: same_report[name]["recall"]}) for name in sides}
            layouts = {name: (best[name]["bands"], best[name]["rows"]) for name in sides}
            best_runs = runs if all(layout == same for layout in layouts.values()) else timed_rounds(texts, layouts, args, workdir)
            report = {name: {**best[name], **side_report(best_runs[name], truth, args.threshold)} for name in sides}
            quality["best_for_recall"] = {
                "recall_target": args.recall_target,
                "rule": "fewest bands (bands x 128//bands rows) whose recall reaches the target",
                **report,
                "ratio": round(report["ours"]["docs_per_s"] / report["datatrove"]["docs_per_s"], 2) if "datatrove" in report else None,
                "ratio_vs_datasketch": round(report["ours"]["docs_per_s"] / report["datasketch"]["docs_per_s"], 2),
            }
        quality["lsh"] = stats["lsh"]
        quality["ours_stats"] = {k: stats[k] for k in ("band_groups", "candidate_docs", "components", "largest_component", "comparisons", "exact_comparisons", "rejected", "clusters", "largest_cluster")}
        if not args.skip_memory:
            # twice the corpus with the same kind of data: the pages again with their words
            # reversed (same lengths and near-duplicate structure, no match with the originals)
            mirrored = [" ".join(reversed(t.split())) for t in texts]
            quality["memory"] = memory_profile([("corpus", texts), ("corpus x2", texts + mirrored)], workdir)

    common = {"threshold": args.threshold, "num_perm": NUM_PERM, "ngram": NGRAM, "rounds": args.rounds, "statistic": "median",
              "clock": "CPU seconds (process_time + waited-for children)", "workers": 1, "cores": [core]}
    extra = {
        "ours": {"verify": True, "input_shards": args.shards, "shingle_hash": "sha1 (datasketch affine32 permutations)"},
        "datasketch": {"loop": "MinHash.bulk, MinHashLSH query-then-insert", "shingle_hash": "sha1"},
        "datatrove": {"executor": "LocalPipelineExecutor, 4 steps, JSONL writer", "shingle_hash": "sha1"},
    }
    settings = {
        name: {"bands": same[0], "rows": same[1], **common, **extra[name], **({"best_for_recall": {k: best[name][k] for k in ("bands", "rows", "target_met")}} if best else {})}
        for name in sides
    }
    ours_rate, ds_rate = runs["ours"]["docs_per_s"], runs["datasketch"]["docs_per_s"]
    print_result(
        "dedup", "docs_per_s", ours_rate, "datatrove", runs["datatrove"]["docs_per_s"] if "datatrove" in runs else None,
        n=len(texts), quality=quality, settings=settings, ratio_digits=2, ratio_vs_datasketch=round(ours_rate / ds_rate, 2),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
