"""Map a pure function over shards with the configured local parallelism.

Data stages call ``map_shards(fn, items, compute)``; results come back in input order, so
output never depends on the worker count. ``fn`` must be a top-level function (picklable).
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

from infra.config import ComputeConfig

T = TypeVar("T")
R = TypeVar("R")


def map_shards(fn: Callable[[T], R], items: Iterable[T], compute: ComputeConfig | None = None) -> list[R]:
    items = list(items)
    workers = min(compute.workers if compute else 1, len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    pool_cls = ProcessPoolExecutor if compute.task_runner == "processes" else ThreadPoolExecutor
    with pool_cls(max_workers=workers) as pool:
        return list(pool.map(fn, items))
