"""The collective timeout (model/cluster.py) with two real gloo ranks: rank 1 stops taking part,
rank 0's all-reduce fails within distributed.collective_timeout_s with an error that names it."""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time

import pytest

from lmfoundry.infra.config_train import TrainRecipe
from lmfoundry.model.cluster import CollectiveTimeout, collective_errors, is_collective_timeout

TIMEOUT = 3.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, port: int, results) -> None:
    """One rank: join the group through model/cluster.py, then rank 0 all-reduces and rank 1 goes silent."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import torch
    import torch.distributed as dist

    from lmfoundry.model.cluster import init_distributed

    init_distributed(TrainRecipe.Distributed(collective_timeout_s=TIMEOUT))
    dist.all_reduce(torch.ones(1))  # both ranks take part once: the group works
    if rank == 1:
        time.sleep(120)  # stops participating (the test kills it)
        return
    started = time.monotonic()
    try:
        with collective_errors("pretrain", TIMEOUT, rank):
            dist.all_reduce(torch.ones(1))
        results.put(("no error", time.monotonic() - started))
    except CollectiveTimeout as exc:
        results.put((str(exc), time.monotonic() - started))


def test_a_silent_rank_makes_the_other_fail_within_the_timeout():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(rank, port, results), daemon=True) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    try:
        message, waited = results.get(timeout=120)
    finally:
        for proc in procs:
            proc.kill()
            proc.join(10)
    assert message.startswith("rank 0: a collective did not complete within pretrain.distributed.collective_timeout_s=3s"), message
    assert "another rank stopped taking part" in message and "Timed out" in message, message
    assert TIMEOUT - 0.5 <= waited < TIMEOUT + 5, waited  # it waited the timeout, not forever


def test_only_timeouts_are_rewritten():
    assert is_collective_timeout(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete"))
    assert not is_collective_timeout(RuntimeError("CUDA out of memory"))
    with pytest.raises(ValueError):  # anything else passes through untouched
        with collective_errors("sft", 1.0, 0):
            raise ValueError("bad input")
    with pytest.raises(RuntimeError, match="^CUDA out of memory$"):
        with collective_errors("sft", 1.0, 0):
            raise RuntimeError("CUDA out of memory")
