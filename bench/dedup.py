"""Benchmark: near-duplicate removal, ours vs datatrove's MinHash pipeline vs plain datasketch.

    lmf bench dedup [--data /work/shared/data] [--files llvm15.warc.gz llvm16.warc.gz]
                    [--rounds 3] [--shards 1] [--threshold 0.8] [--skip-datatrove] [--skip-memory]

Corpus: the HTML pages of the WARC files (by default LLVM 15 and LLVM 16 documentation: two
releases of the same pages, so real near-duplicates), reduced to their main text with
resiliparse inside this benchmark. Every method sees the same texts in the same order.

1. docs/s: ours is the whole ``near_dedup`` stage through the stage runner (read the input
   shards; signatures, band buckets, band groups, components, clusters; filtered output and
   side artifacts written and committed to a local store; one worker). datatrove runs its 4
   MinHash steps (signatures, buckets, clusters, filter with a JSONL writer) with
   LocalPipelineExecutor in a temporary directory, one worker. datasketch is the plain loop:
   shingle sets, ``MinHash.bulk``, then ``MinHashLSH`` query-then-insert in input order (a
   document whose query hits a kept document is removed for the earliest hit). All three
   get the same threshold: datasketch's MinHashLSH directly, datatrove as the bands x rows
   that datasketch's optimiser picks for it (it has no threshold setting), with SHA-1
   shingle hashes (its default xxhash path fails on str input with xxhash 4). All are
   single-threaded and timed in CPU seconds (``time.process_time``), which other processes
   on a shared machine disturb far less than wall time; ours and datasketch run --rounds
   times, alternating, and the best round counts; datatrove (slow) runs once.
2. Quality, against brute-force exact Jaccard of word 5-gram sets (NFKC, lower case,
   whitespace split; computed here with strings and a sparse matrix product, not with any
   method's hashes); a "true pair" has Jaccard >= threshold:
   - recall: true pairs that do not both survive (the output no longer holds the duplicate);
   - same_cluster_recall (stricter, for reference): true pairs whose documents were removed
     one for the other or both for the same keeper;
   - precision: removals whose exact Jaccard with the keeper they were removed for is
     >= threshold;
   - bad removals: removals whose exact Jaccard with their keeper is below 0.7.
3. Memory: peak memory (Python heap via tracemalloc + Arrow's pool) of our band-groups
   (bucket), components and clusters steps, each re-run in a fresh subprocess, on the corpus
   and on a corpus twice as large with the same kind of data (the pages again with their
   words reversed: same lengths and near-duplicate structure, no match with the
   originals). Input shards of 250 documents (a growing corpus has more shards of the same
   size) and small partition sizes, so the partitioning is exercised. The cluster step holds
   whole components, so its peak follows the partition budget and the largest component
   (here the two LangRef pages, ~1 MB of shingle hashes each), not the corpus size.

The last stdout line is the JSON result; ``ratio`` is ours / datatrove docs/s and
``ratio_vs_datasketch`` ours / datasketch.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from lmfoundry.bench._common import DEFAULT_DATA, alternating_rounds, commit_doc_shards, print_result, warc_paths, warc_texts
from lmfoundry.infra.config import NearDedupConfig, PipelineConfig
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.infra.store import StageDir, StageRef, Store

SPEC = StageSpec("near_dedup", "lmfoundry.tasks.dedup.near_dedup:run_near_dedup", section="near_dedup")
BAD_REMOVAL = 0.7
NGRAM = 5
MEMORY_SHARD_DOCS = 250


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


def run_ours(texts: list[str], cfg: NearDedupConfig, shards: int, workdir: str) -> tuple[float, dict[int, int], dict]:
    store = Store(os.path.join(workdir, f"ours-{time.monotonic_ns()}"))
    ref = commit_input(store, texts, shards)
    root = PipelineConfig(near_dedup=cfg, compute={"workers": 1, "progress": False})
    SPEC.module()  # imported before the clock starts
    start = time.process_time()
    outcome = run_stage(store, SPEC, root, [ref])
    seconds = time.process_time() - start
    return seconds, removed_by_ours(store, outcome.ref), outcome.stats


# ---------------------------------------------------------------- baselines


def run_datasketch(texts: list[str], threshold: float, num_perm: int) -> tuple[float, dict[int, int]]:
    from datasketch import MinHash, MinHashLSH

    start = time.process_time()
    sets = [{s.encode("utf-8") for s in reference_shingles(t)} for t in texts]
    minhashes = MinHash.bulk(sets, num_perm=num_perm)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    removed = {}
    for i, (shingles, minhash) in enumerate(zip(sets, minhashes)):
        if not shingles:
            continue  # an empty set matches every other empty set; nobody's duplicate
        hits = lsh.query(minhash)
        if hits:
            removed[i] = min(hits)
        else:
            lsh.insert(i, minhash)
    return time.process_time() - start, removed


def run_datatrove(texts: list[str], bands: int, rows: int, workdir: str) -> tuple[float, dict[int, int]]:
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
    base = os.path.join(workdir, "datatrove")
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
    start = time.process_time()
    for step in steps:
        step.run()
    seconds = time.process_time() - start
    return seconds, _datatrove_removals(base)


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


# ---------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmf bench dedup", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--files", nargs="+", default=["llvm15.warc.gz", "llvm16.warc.gz"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shards", type=int, default=1, help="input shards for our stage")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--skip-datatrove", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return 0

    texts = warc_texts(warc_paths(args.data, args.files))
    print(f"{len(texts)} pages from {', '.join(args.files)}", file=sys.stderr)
    truth = ExactJaccard(texts)
    cfg = NearDedupConfig(threshold=args.threshold, num_perm=args.num_perm)

    with tempfile.TemporaryDirectory(prefix="lmf-bench-dedup-") as workdir:
        runs = alternating_rounds(
            {"ours": lambda _: run_ours(texts, cfg, args.shards, workdir), "datasketch": lambda _: run_datasketch(texts, args.threshold, args.num_perm)},
            args.rounds,
        )
        ours_s, ds_s = [run[0] for run in runs["ours"]], [run[0] for run in runs["datasketch"]]
        _, ours_removed, stats = runs["ours"][-1]
        _, ds_removed = runs["datasketch"][-1]
        print(f"cpu seconds per round: ours {[round(x, 2) for x in ours_s]}, datasketch {[round(x, 2) for x in ds_s]}", file=sys.stderr)
        ours_rate, ds_rate = len(texts) / min(ours_s), len(texts) / min(ds_s)
        quality = score(ours_removed, truth, args.threshold)
        quality["datasketch"] = {"docs_per_s": round(ds_rate, 1), **score(ds_removed, truth, args.threshold)}
        from lmfoundry.tasks.dedup.minhash import choose_bands

        bands, rows = choose_bands(args.threshold, args.num_perm, 0.5, 0.5)
        dt_rate = None
        if not args.skip_datatrove:
            seconds, dt_removed = run_datatrove(texts, bands, rows, workdir)
            dt_rate = len(texts) / seconds
            quality["datatrove"] = {"docs_per_s": round(dt_rate, 1), "bands": bands, "rows": rows, **score(dt_removed, truth, args.threshold)}
        quality["lsh"] = stats["lsh"]
        quality["ours_stats"] = {k: stats[k] for k in ("band_groups", "candidate_docs", "components", "largest_component", "comparisons", "exact_comparisons", "rejected", "clusters", "largest_cluster")}
        if not args.skip_memory:
            # twice the corpus with the same kind of data: the pages again with their words
            # reversed (same lengths and near-duplicate structure, no match with the originals)
            mirrored = [" ".join(reversed(t.split())) for t in texts]
            quality["memory"] = memory_profile([("corpus", texts), ("corpus x2", texts + mirrored)], workdir)

    timing = {"clock": "process_time", "workers": 1, "statistic": "best round"}
    settings = {
        "ours": {"threshold": args.threshold, "num_perm": args.num_perm, "ngram": cfg.ngram, "input_shards": args.shards, "rounds": args.rounds, **timing},
        "datasketch": {"threshold": args.threshold, "num_perm": args.num_perm, "ngram": NGRAM, "rounds": args.rounds, **timing},
    }
    if dt_rate:
        settings["datatrove"] = {"bands": bands, "rows": rows, "ngram": NGRAM, "shingle_hash": "sha1", "rounds": 1, **timing}
    print_result(
        "dedup", "docs_per_s", ours_rate, "datatrove", dt_rate, n=len(texts), quality=quality, settings=settings,
        ratio_digits=2, ratio_vs_datasketch=round(ours_rate / ds_rate, 2),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
