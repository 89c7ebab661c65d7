"""DeepSpeed's CPU allreduce buffers in /dev/shm: a rank removes its own at exit, the stage runner
removes a run's by port (model/shm.py)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from lmfoundry.model.shm import SHM_DIR, remove_shm_buffers, shm_buffers

RANK = """
import os
from lmfoundry.model.engine import init_single_process
from lmfoundry.model.shm import shm_buffers
init_single_process()
print(len(shm_buffers(os.environ["MASTER_PORT"], 0)))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_removes_its_buffer_when_it_exits():
    port = free_port()
    # LOCAL_SIZE == world size (the deepspeed launcher sets it): DeepSpeed then uses its shm allreduce
    env = {**os.environ, "MASTER_PORT": str(port), "LOCAL_SIZE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-c", RANK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "1"  # DeepSpeed made one while the rank ran...
    assert shm_buffers(port) == []  # ...and it is gone with the process


def test_the_runner_removes_every_buffer_of_its_port_and_no_other():
    uid, port, other = os.getuid(), free_port(), free_port()
    planted = [SHM_DIR / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_{p}_{rank}" for p in (port, other) for rank in (0, 1)]
    for path in planted:
        path.write_bytes(b"x")
    try:
        assert remove_shm_buffers(port) == 2
        assert [p.exists() for p in planted] == [False, False, True, True]
    finally:
        for path in planted:
            path.unlink(missing_ok=True)
