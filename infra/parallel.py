"""Map a pure function over shards with the configured parallelism.

Data stages call ``map_pending(fn, n_shards, output_name, out, compute, desc)`` (which maps the
shards whose output is not complete yet) or ``map_shards(fn, items, compute)`` directly; results come back in input order, so
output never depends on the worker count or where the work ran. ``fn`` must be a top-level
function or a ``functools.partial`` of one (picklable).

``compute.task_runner`` picks where shards run:

- ``processes`` (the default): a pool of ``compute.workers`` local worker processes per map,
  forked (explicitly, whatever Python's default start method): a worker starts in
  milliseconds with everything the caller imported, set and patched, and no script needs an
  ``if __name__ == "__main__"`` guard. Use it for CPU-bound Python (all data stages): threads
  would share one core through the GIL;
- ``threads``: a thread pool in this process, for work that waits on I/O or releases the GIL;
- ``dask``: a Dask cluster. With ``compute.dask_address`` (``tcp://host:8786``) the shards go
  to an existing cluster, whose workers need this package installed and the store reachable
  (an ``s3://`` store, or a shared filesystem path); without an address a local cluster of
  ``compute.workers`` processes is started once per process.

Set it from the CLI: ``lmf run --set compute.task_runner=dask --set compute.dask_address=tcp://...``.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import threading
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Callable, Iterable, TypeVar

from tqdm import tqdm

from lmfoundry.infra.config import ComputeConfig
from lmfoundry.infra.store import StageDir

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("lmfoundry.parallel")

_dask_clients: dict[str, Any] = {}  # one client per scheduler address (or local cluster) per process
_dask_lock = threading.Lock()
# fork, not spawn or forkserver: those re-import the caller's main module in every worker (a
# script without a __main__ guard would run itself again) and pay every import per worker
_FORK = multiprocessing.get_context("fork")


def map_shards(fn: Callable[[T], R], items: Iterable[T], compute: ComputeConfig | None = None) -> list[R]:
    items = list(items)
    if compute is not None and compute.task_runner == "dask" and items:
        return _map_dask(fn, items, compute)
    workers = min(compute.workers if compute else 1, len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    if compute.task_runner == "processes":
        with ProcessPoolExecutor(max_workers=workers, mp_context=_FORK) as pool:
            return list(pool.map(fn, items))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def map_pending(fn: Callable[[int], Any], count: int, output: Callable[[int], str], out: StageDir, compute: ComputeConfig, desc: str) -> None:
    """Run ``fn(i)`` for every shard ``i < count`` whose output file ``output(i)`` is not complete
    yet: a rerun after a crash maps only the shards that were not finished."""
    pending = [i for i in range(count) if not out.done(output(i))]
    map_shards(fn, progress(pending, compute, f"{out.stage} {desc}"), compute)


def progress(items: list[T], compute: ComputeConfig, desc: str) -> Iterable[T]:
    """A progress bar on a terminal (compute.progress), silent elsewhere."""
    return tqdm(items, desc=desc, disable=not (compute.progress and sys.stderr.isatty()))


def _map_dask(fn: Callable[[T], R], items: list[T], compute: ComputeConfig) -> list[R]:
    client = dask_client(compute)
    # pure=False: a shard function writes files, so Dask must never treat two calls as one result
    futures = client.map(fn, items, pure=False)
    return client.gather(futures)


def dask_client(compute: ComputeConfig):
    """The process-wide Dask client for this compute section (connects or starts a local cluster)."""
    from distributed import Client, LocalCluster

    key = compute.dask_address or f"local:{compute.workers}"
    with _dask_lock:
        client = _dask_clients.get(key)
        if client is not None and client.status == "running":
            return client
        if compute.dask_address:
            log.info("connecting to the Dask scheduler at %s", compute.dask_address)
            try:
                client = Client(compute.dask_address, set_as_default=False, timeout=30)
            except OSError as exc:
                raise RuntimeError(
                    f"cannot reach the Dask scheduler at compute.dask_address={compute.dask_address}: {exc}; "
                    "start one with `dask scheduler` (and `dask worker ADDRESS` on each host) or unset the address for a local cluster"
                ) from exc
        else:
            log.info("starting a local Dask cluster of %d worker processes", compute.workers)
            cluster = LocalCluster(n_workers=compute.workers, threads_per_worker=1, processes=True, dashboard_address=None)
            client = Client(cluster, set_as_default=False)
        _dask_clients[key] = client
        return client


@atexit.register
def close_dask_clients() -> None:
    """Close every client (and the local clusters this process started)."""
    with _dask_lock:
        for client in _dask_clients.values():
            cluster = client.cluster
            client.close()
            if cluster is not None:
                cluster.close()
        _dask_clients.clear()
