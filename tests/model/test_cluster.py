"""model/cluster.py with two real gloo ranks: rank 1 stops taking part, rank 0's all-reduce fails
within distributed.collective_timeout_s with an error that names it; ranks with separate work
directories (two nodes without a shared filesystem) fail the shared-directory check together."""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time

import pytest

from lmfoundry.infra.config_train import TrainRecipe
from lmfoundry.model.cluster import CollectiveTimeout, SharedDirError, collective_errors, is_collective_timeout

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


def shared_dir_rank(rank: int, port: int, root: str, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    from pathlib import Path

    from lmfoundry.model.cluster import check_shared_work_dir, init_distributed

    init_distributed(TrainRecipe.Distributed(collective_timeout_s=60))
    outcome = []
    for work in (Path(root) / f"node{rank}", Path(root) / "shared"):  # separate directories, then one
        try:
            check_shared_work_dir(work, rank, 2, "pretrain")
            outcome.append("ok")
        except SharedDirError as exc:
            outcome.append(str(exc))
    results.put((rank, outcome))


def test_ranks_without_a_shared_work_dir_fail_together(tmp_path):
    (tmp_path / "node0" / ".ranks").mkdir(parents=True)
    (tmp_path / "node0" / ".ranks" / "rank-00001").write_text("an earlier launch's token")  # stale: must not count
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=shared_dir_rank, args=(rank, port, str(tmp_path), results), daemon=True) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    try:
        outcomes = dict(results.get(timeout=120) for _ in procs)
    finally:
        for proc in procs:
            proc.join(30)
            proc.kill()
    for rank in (0, 1):
        separate, shared = outcomes[rank]
        assert separate.startswith("pretrain.distributed.work_dir is not shared by every rank: rank 0 (host "), separate
        assert "sees no marker of rank(s) [1]" in separate and str(tmp_path / "node0") in separate and "set pretrain.distributed.work_dir" in separate
        assert shared == "ok"
    assert sorted(p.name for p in (tmp_path / "shared" / ".ranks").iterdir()) == ["rank-00000", "rank-00001"]


def test_several_nodes_need_a_rendezvous_and_a_shared_work_dir():
    from lmfoundry.tasks.train.launch import launch_command

    dist = TrainRecipe.Distributed(launcher="torchrun", procs=8, nnodes=2, rdzv_endpoint="node0:29400", work_dir="/shared/lmf", accelerator="cuda")
    cmd = launch_command(dist, "/shared/lmf/v1/job.json", 0)
    assert cmd[1:9] == ["-u", "-m", "torch.distributed.run", "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400", "--nproc_per_node=8", "-m"]
    assert "--standalone" in launch_command(TrainRecipe.Distributed(launcher="torchrun"), "job.json", 0)
    with pytest.raises(ValueError, match="nnodes > 1 needs launcher: torchrun and rdzv_endpoint"):
        TrainRecipe.Distributed(launcher="torchrun", nnodes=2, work_dir="/shared/lmf")
    with pytest.raises(ValueError, match="several nodes .* need distributed.work_dir"):
        TrainRecipe.Distributed(hostfile="/etc/hosts.ds")
