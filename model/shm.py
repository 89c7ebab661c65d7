"""DeepSpeed's CPU shared-memory communication: its compiled op and the buffers it leaves behind.

On CPU every rank's ``deepspeed.init_distributed`` loads a C++ op (compiled once per machine into
torch's extensions cache, ``shm_op_built``) and creates a ~67 MB shared-memory allreduce buffer,
``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``. DeepSpeed 0.19 never unlinks
it (shm.cpp defines shared_close but nothing calls it), so every rank of every CPU run leaves one
in RAM-backed /dev/shm: a CI machine or a long-lived worker fills its memory run by run. So each
rank removes its own buffer when its process exits (``release_at_exit``), and the stage runner
removes a run's buffers by its rendezvous port after the launcher ends (``remove_shm_buffers``),
which also covers ranks that were killed.
"""
from __future__ import annotations

import atexit
import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")


def extensions_dir() -> Path:
    """Where torch caches the C++ ops DeepSpeed compiles on first use."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")


def shm_op_built() -> bool:
    """Whether DeepSpeed's CPU shared-memory communication op (built by every CPU rank's
    init_distributed) is already compiled, so a launch starts in seconds rather than minutes."""
    return any(extensions_dir().glob("*/deepspeed_shm_comm/*.so"))


def shm_buffers(port: int | str, rank: int | str = "*") -> list[Path]:
    """The allreduce buffers of the ranks of one rendezvous port (all ranks by default)."""
    return sorted(SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"))


def remove_shm_buffers(port: int | str, rank: int | str = "*") -> int:
    """Unlink them (a rank still running keeps its mapping; only the name goes); returns how many."""
    paths = shm_buffers(port, rank)
    for path in paths:
        path.unlink(missing_ok=True)
    return len(paths)


def release_at_exit() -> None:
    """Call after init_distributed: this rank's buffer is removed when the process exits."""
    port, rank = os.environ.get("MASTER_PORT"), os.environ.get("RANK", "0")
    if port:
        atexit.register(remove_shm_buffers, port, rank)
