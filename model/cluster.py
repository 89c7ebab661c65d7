"""Process-group setup every training rank shares: the collective timeout and its clear error,
and the check that every rank sees the same work directory.

    from lmfoundry.model.cluster import init_distributed, collective_errors
    init_distributed(cfg.distributed)            # deepspeed.init_distributed with the configured timeout
    with collective_errors("pretrain", cfg.distributed.collective_timeout_s, rank):
        trainer.run()                            # a timed-out collective -> CollectiveTimeout

``distributed.collective_timeout_s`` is the process group's timeout: a collective (all-reduce,
barrier, broadcast) that waits longer fails instead of hanging. With gloo (CPU) the waiting rank
gets a RuntimeError ("Timed out waiting ... for recv"), which ``collective_errors`` turns into a
``CollectiveTimeout`` naming the knob, the rank and what to do; model/train.py's ``run_rank``
prints it as an ERROR line the stage runner reports, and the launcher ends the other ranks.
With NCCL the timeout is enforced by PyTorch's NCCL watchdog thread, which by default
(TORCH_NCCL_ASYNC_ERROR_HANDLING=3) tears the process down after logging
"Watchdog caught collective operation timeout"; the stage reports that line. Anything that
still hangs is the stage watchdog's (infra/heartbeat.py).

``check_shared_work_dir(work, rank, world, section)`` (every rank of a run of several ranks, at
start): each rank writes ``<work>/.ranks/rank-NNNNN`` holding a token rank 0 chose for this
launch; rank 0 must see every one, else every rank raises ``SharedDirError`` naming the ranks and
hosts it cannot see. Several nodes need one work directory mounted at the same path (checkpoint
shards of every rank, the universal conversion, the stage's upload all live there).
"""
from __future__ import annotations

import re
import secrets
import socket
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Iterator

from lmfoundry.model.shm import release_at_exit

# what a timed-out collective says: gloo's recv/send wait, its pair closure after a timeout, NCCL's watchdog
TIMEOUT_MESSAGE = re.compile(r"Timed out waiting|timeout caused pair closure|Watchdog caught collective operation timeout|collective operation timeout", re.I)


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within distributed.collective_timeout_s on this rank."""


class SharedDirError(RuntimeError):
    """The ranks of one run do not share its work directory."""


def init_distributed(dist) -> None:
    """deepspeed.init_distributed for a recipe's ``distributed`` section, with its collective timeout."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist.backend, timeout=timedelta(seconds=dist.collective_timeout_s))
    release_at_exit()  # DeepSpeed would leave this rank's CPU allreduce buffer in /dev/shm


def rank_device(dist, local_rank: int):
    """This rank's torch device: its own GPU (made current) on cuda, else the CPU."""
    import torch

    if dist.accelerator != "cuda":
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def is_collective_timeout(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and bool(TIMEOUT_MESSAGE.search(str(exc)))


@contextmanager
def collective_errors(section: str, timeout_s: float, rank: int) -> Iterator[None]:
    """Turn a timed-out collective raised inside the block into a CollectiveTimeout that says what happened."""
    try:
        yield
    except RuntimeError as exc:
        if not is_collective_timeout(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CollectiveTimeout(
            f"rank {rank}: a collective did not complete within {section}.distributed.collective_timeout_s={timeout_s:g}s "
            f"({first[:200]}): another rank stopped taking part (hung, died, or is far slower). The last committed checkpoint is kept: "
            f"look for the stuck rank in the log above, then run the stage again to resume (raise collective_timeout_s if a rank is legitimately slow, "
            f"e.g. saving a large checkpoint or compiling)."
        ) from exc


def check_shared_work_dir(work: Path, rank: int, world: int, section: str) -> None:
    """Fail every rank together unless rank 0 sees the marker file each rank wrote into ``work``."""
    import torch.distributed as dist

    box = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)  # this launch's token: markers left by an earlier launch do not count
    token = box[0]
    folder = Path(work) / ".ranks"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{rank:05d}").write_text(token)
    hosts: list[str | None] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())  # also a barrier: every marker is written
    missing = [r for r in range(world) if not _marker_is(folder / f"rank-{r:05d}", token)] if rank == 0 else []
    box = [(missing, str(work))]
    dist.broadcast_object_list(box, src=0)
    missing, work_of_rank0 = box[0]
    if missing:
        seen_by = f"rank 0 (host {hosts[0]}) sees no marker of rank(s) {missing} (host(s) {sorted({hosts[r] for r in missing})}) in {work_of_rank0}"
        raise SharedDirError(
            f"{section}.distributed.work_dir is not shared by every rank: {seen_by}. Every rank writes its checkpoint shards there and "
            f"rank 0 commits them, so several nodes need one directory mounted at the same path on each (NFS, Lustre, a shared volume): "
            f"set {section}.distributed.work_dir to it (docs/multinode.md)."
        )


def _marker_is(path: Path, token: str) -> bool:
    try:
        return path.read_text() == token
    except FileNotFoundError:
        return False
