"""Benchmark `store`: committing N shards through the stage store vs raw fsspec writes.

    lmf bench store [--shards 32] [--shard-mb 4] [--url /tmp/dir | s3://...]

Ours writes each shard atomically with a checksum and a completion marker and then commits a
manifest; the baseline writes the same bytes with plain `fs.pipe_file`. The ratio is
ours / baseline wall time (the store's overhead; aim under 1.10). The store's commit is
durable (files fsynced before the manifest), so the baseline's bytes are synced too; the
ratio against unsynced page-cache writes is printed beside it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import uuid

import fsspec

from lmfoundry.bench._common import alternating_rounds, print_result
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
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--url", help="where to write (default: a temp dir)")
    args = p.parse_args(argv)
    base = args.url or tempfile.mkdtemp(prefix="lmf-bench-store-")
    shards = [os.urandom(int(args.shard_mb * 2**20)) for _ in range(args.shards)]
    runs = alternating_rounds(  # interleaved so all see the same machine state
        {
            "raw": lambda r: write_raw(f"{base}/raw-{r}", shards, durable=True),
            "ours": lambda r: write_store(f"{base}/store-{r}", shards),
            "cached": lambda r: write_raw(f"{base}/cached-{r}", shards, durable=False),
        },
        args.repeats,
        before=os.sync,  # start each timing with no dirty pages left by the previous one
    )
    ours, raw, cached = runs["ours"], runs["raw"], runs["cached"]
    if not args.url:
        shutil.rmtree(base, ignore_errors=True)
    best_ours, best_raw, best_cached = min(ours), min(raw), min(cached)
    total_mb = args.shards * args.shard_mb
    print(f"store: {total_mb / best_ours:.0f} MB/s, raw fsspec: {total_mb / best_raw:.0f} MB/s")
    same = {"shards": args.shards, "shard_mb": args.shard_mb, "url": args.url or "temp dir", "repeats": args.repeats, "statistic": "best"}
    print_result(
        "store", "commit_seconds", best_ours, "raw fsspec pipe_file + sync", best_raw, n=args.shards, digits=4,
        quality={"shard_mb": args.shard_mb, "repeats": args.repeats, "lower_ratio_is_better": True},
        settings={"ours": {"writes": "StageDir.write_bytes + commit (durable)", **same}, "raw": {"writes": "fs.pipe_file + os.sync", **same}},
        ratio_vs_page_cache_writes=round(best_ours / best_cached, 3),
    )
    return 0
