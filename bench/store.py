"""Benchmark `store`: committing N shards through the stage store vs raw fsspec writes.

    lmf bench store [--shards 32] [--shard-mb 4] [--rounds 5] [--url /tmp/dir | s3://...]

Ours writes each shard atomically with a checksum and a completion marker and then commits a
manifest; the baseline writes the same bytes with plain `fs.pipe_file`. The ratio is
ours / baseline wall time (the store's overhead; aim under 1.10). The store's commit is
durable (files fsynced before the manifest), so the baseline's bytes are synced too; the
ratio against unsynced page-cache writes is printed beside it. The three writers alternate for
--rounds rounds on one pinned core, each starting with no dirty pages (os.sync before it); the
median round counts.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

import fsspec

from lmfoundry.bench._common import alternating_rounds, pin_one_core, print_result, rounds_arg
from lmfoundry.infra.store import Store


def write_raw(url: str, shards: list[bytes], durable: bool) -> float:
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    start = time.perf_counter()
    for i, data in enumerate(shards):
        fs.pipe_file(f"{root}/part-{i:05d}.bin", data)
    if durable and fs.protocol in ("file", ("file", "local")):
        os.sync()  # the store's commit is on disk when it returns; make the baseline's bytes so too
    return time.perf_counter() - start


def write_store(url: str, shards: list[bytes]) -> float:
    store = Store(url)
    start = time.perf_counter()
    out = store.open_for_write("bench", uuid.uuid4().hex[:16])
    for i, data in enumerate(shards):
        out.write_bytes(f"data/part-{i:05d}.bin", data)
    store.commit(out, {"stats": {}})
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmf bench store")
    p.add_argument("--shards", type=int, default=32)
    p.add_argument("--shard-mb", type=float, default=4.0)
    p.add_argument("--rounds", "--repeats", dest="rounds", type=rounds_arg, default=5, help="alternating rounds per writer (at least 3; the median counts)")
    p.add_argument("--url", help="where to write (default: a temp dir)")
    args = p.parse_args(argv)
    core = pin_one_core()
    base = args.url or tempfile.mkdtemp(prefix="lmf-bench-store-")
    shards = [os.urandom(int(args.shard_mb * 2**20)) for _ in range(args.shards)]
    runs = alternating_rounds(  # interleaved so all see the same machine state
        {
            "raw": lambda r: write_raw(f"{base}/raw-{r}", shards, durable=True),
            "ours": lambda r: write_store(f"{base}/store-{r}", shards),
            "cached": lambda r: write_raw(f"{base}/cached-{r}", shards, durable=False),
        },
        args.rounds,
        before=os.sync,  # start each timing with no dirty pages left by the previous one
    )
    ours, raw, cached = runs["ours"], runs["raw"], runs["cached"]
    if not args.url:
        shutil.rmtree(base, ignore_errors=True)
    med_ours, med_raw, med_cached = statistics.median(ours), statistics.median(raw), statistics.median(cached)
    total_mb = args.shards * args.shard_mb
    print(f"store: {total_mb / med_ours:.0f} MB/s, raw fsspec: {total_mb / med_raw:.0f} MB/s", file=sys.stderr)
    same = {"shards": args.shards, "shard_mb": args.shard_mb, "url": args.url or "temp dir", "rounds": args.rounds, "statistic": "median",
            "clock": "perf_counter (wall: the work is I/O)", "cores": [core]}
    print_result(
        "store", "commit_seconds", med_ours, "raw fsspec pipe_file + sync", med_raw, n=args.shards, digits=4,
        quality={"shard_mb": args.shard_mb, "rounds": args.rounds, "lower_ratio_is_better": True,
                 "seconds": {"ours": [round(x, 4) for x in ours], "raw": [round(x, 4) for x in raw], "cached": [round(x, 4) for x in cached]}},
        settings={"ours": {"writes": "StageDir.write_bytes + commit (durable)", **same}, "raw": {"writes": "fs.pipe_file + os.sync", **same}},
        ratio_vs_page_cache_writes=round(med_ours / med_cached, 3),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
