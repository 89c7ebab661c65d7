"""Checkpoints that do not stop training: the state is copied to host memory (fast), the files are
written by a background thread (slow) while the next steps run, and COMPLETE.json comes last.

model/train.py installs it on its DeepSpeed engine::

    writer = CheckpointWriter(rank, world, threaded=cfg.async_checkpoints)
    writer.install(engine)                       # engine.save_checkpoint now snapshots + queues
    engine.save_checkpoint(root, tag=tag, client_state=client)
    writer.submit(write_torch, rng_state(), root / tag / "rng_rank00000.pt")
    writer.finish_checkpoint(root / tag, marker, after=callback)   # this rank done; rank 0: COMPLETE last
    ...
    writer.wait()                                # before loading, exporting or exiting: all written

Why it is safe (the invariants the stage's resume relies on):

- the snapshot is taken before save_checkpoint returns, so later optimizer steps cannot leak into
  it; only one checkpoint is in flight (the next save first waits for the previous one), which
  bounds the extra host memory to one copy of the states;
- each rank's thread writes its files, then a ``WRITTEN.rankNNNNN`` marker; rank 0's thread waits
  for every rank's marker, removes them and only then writes ``COMPLETE.json`` (atomically). A
  crash or an error at any point before leaves a directory without COMPLETE.json, which nothing
  reads (the launcher uploads and the trainer resumes only complete checkpoints): the previous
  checkpoint stays the resume point;
- a write error is raised in the training thread at the next save or wait, never swallowed.

With ``threaded=False`` the same jobs run inline (the files are on disk when save returns).
Several nodes need a shared work_dir (as a hostfile run already does): rank 0 reads the markers.
"""
from __future__ import annotations

import copy
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

WRITTEN = "WRITTEN.rank{rank:05d}"


def host_snapshot(obj: Any) -> Any:
    """A deep copy of a state dict whose tensors live in (fresh) host memory: what the writer thread
    may serialise while training goes on changing the originals in place."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the mapping type (OrderedDict)
        for key, value in obj.items():
            out[key] = host_snapshot(value)
        return out
    if type(obj) in (list, tuple):  # exactly: torch.Size and named tuples keep their type (deepcopy below)
        return type(obj)(host_snapshot(v) for v in obj)
    try:
        return copy.deepcopy(obj)
    except Exception:  # an object that cannot be copied (a lock, a module): serialised as it is now
        return obj


def write_torch(obj: Any, path: str | Path) -> None:
    """torch.save through a temporary name, so a file that exists is whole."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


class CheckpointWriter:
    def __init__(self, rank: int, world: int, threaded: bool = True, poll_s: float = 0.05):
        self.rank, self.world, self.threaded, self.poll_s = rank, world, threaded, poll_s
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._closed = threading.Event()
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._work, name="checkpoint-writer", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ the queue
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self._error is None:  # after a failure nothing more is written: no COMPLETE.json
                    job()
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread by wait()
                self._error = exc
            finally:
                self._jobs.task_done()

    def submit(self, fn: Callable, *args, **kwargs) -> None:
        """Run fn(*args, **kwargs) after every job submitted before it (inline when not threaded)."""
        self.raise_if_failed()
        if self.threaded:
            self._jobs.put(lambda: fn(*args, **kwargs))
        else:
            fn(*args, **kwargs)

    def wait(self) -> None:
        """Block until every queued write is done; raise the first write error, if any."""
        if self.threaded:
            self._jobs.join()
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed in the background: {error!r}; the previous complete checkpoint is kept") from error

    def close(self, raise_errors: bool = True) -> None:
        """Finish the queued writes and stop the thread; a write error is raised unless raise_errors
        is False (training already stops with another error, which should not be hidden)."""
        try:
            if raise_errors:
                self.wait()
            elif self.threaded:
                self._jobs.join()
        finally:
            self._closed.set()
            if self._thread is not None:
                self._jobs.put(None)
                self._thread.join()
                self._thread = None

    # ------------------------------------------------------------------ checkpoints
    def install(self, engine) -> None:
        """Make engine.save_checkpoint snapshot its states and queue the files on this writer."""
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        writer = self

        class SnapshotEngine(TorchCheckpointEngine):
            def save(self, state_dict, path: str):
                writer.submit(write_torch, host_snapshot(state_dict) if writer.threaded else state_dict, path)

            def preserves_storage_sharing(self):
                return True  # host_snapshot already gives every tensor its own storage

        engine.checkpoint_engine = SnapshotEngine()

    def finish_checkpoint(self, directory: Path, marker: dict[str, Any], after: Callable[[], None] | None = None) -> None:
        """Queue this rank's end of a checkpoint: its WRITTEN marker; on rank 0 then COMPLETE.json once
        every rank's marker is there, and `after()` (log line, fault hooks)."""
        self.submit(write_json_atomic, directory / WRITTEN.format(rank=self.rank), {"rank": self.rank})
        if self.rank == 0:
            self.submit(self._complete, directory, marker, after)

    def _complete(self, directory: Path, marker: dict[str, Any], after: Callable[[], None] | None) -> None:
        markers = [directory / WRITTEN.format(rank=r) for r in range(self.world)]
        while not all(m.exists() for m in markers):
            if self._closed.is_set():
                raise RuntimeError(f"{directory}: stopped before every rank had written its part")
            time.sleep(self.poll_s)
        for m in markers:  # before COMPLETE.json: the launcher lists the files once that exists
            m.unlink()
        write_json_atomic(directory / "COMPLETE.json", marker)
        if after is not None:
            after()
