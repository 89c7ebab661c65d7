"""Write leases: at most one writer of a stage version at a time, on a local disk and on S3.

A lease is a small JSON file (``_lease.json`` in the version directory) naming its owner, a
random token and an expiry. Its holder renews it in the background every ttl/3 and releases
it at the end; every renewal and the release first compare the token, so a holder never
renews or deletes a lease someone else took over. A lease is abandoned (and taken over) when
it expired, when its owner's process on this host is gone, or when it is not whole JSON (a
file cut short by power loss).

How "compare, then write" is made atomic:

- local store: the version directory is ``flock``-ed around every read-compare-write of the
  lease (and around the check before a commit), and a new lease is written, fsync-ed and
  hard-linked into place, so it appears whole or not at all;
- S3: conditional requests. A new lease is a PUT with ``If-None-Match: *``; a renewal, a
  takeover and a release carry ``If-Match: <ETag of the lease just read>``, so a writer that
  lost the lease in between gets 412 and stops. (AWS S3 and moto honour both headers; an
  S3-compatible server that ignores If-Match degrades to compare-then-write with a window of
  one round trip.)

A holder writes only while it can prove the lease is its own: `Lease.check()` (called before
every file a StageDir writes) raises LeaseLost once a renewal found another owner, and after
a pause longer than half the ttl (a stopped process, a long GC) it confirms against the store
before the write goes ahead. The commit confirms under the lock. Usage::

    with store.lease("exact_dedup", version) as lease:
        lease.check()            # before each write
        with lease.guard():      # around the commit
            ...
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import fsspec.asyn

log = logging.getLogger("lmfoundry.store")

TORN = "torn"  # a lease file that is not whole JSON: an abandoned lease


class LeaseLost(RuntimeError):
    """Another writer took over this stage version; this one must stop writing."""


class Lease:
    """One writer's hold on a stage version (made by `acquire`)."""

    def __init__(self, store: Any, stage: str, version: str, path: str):
        self.store, self.stage, self.version, self.path = store, stage, version, path
        self.ttl = float(store.lease_ttl_s)
        self.token = uuid.uuid4().hex
        self.backend = LocalLeases(store) if store.is_local else S3Leases(store)
        self.lost = threading.Event()
        self.confirmed_at = time.monotonic()
        self._renewing = threading.Lock()  # one renewal at a time per process (shard threads call check())
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def body(self) -> bytes:
        host = socket.gethostname()
        return json.dumps(
            {"owner": f"{host}:{os.getpid()}", "host": host, "pid": os.getpid(), "token": self.token, "expires_at": time.time() + self.ttl}
        ).encode()

    def what(self) -> str:
        return f"the lease of stage '{self.stage}' version {self.version}"

    # ------------------------------------------------------------------ holder side
    def renew(self) -> None:
        """Extend the lease if it is still ours; LeaseLost otherwise."""
        with self._renewing:
            if self.lost.is_set():
                self._lose(None)
            started = time.monotonic()
            with self.backend.critical(self.path):
                holder, tag = self.backend.read(self.path)
                if not self._ours(holder) or not self.backend.replace(self.path, self.body(), tag):
                    self._lose(holder)
            self.confirmed_at = started

    def check(self) -> None:
        """Before a write: raise LeaseLost if the lease is gone; confirm it after a long pause."""
        if self.lost.is_set():
            raise LeaseLost(f"{self.what()} was taken over by another writer; this run stops writing (run again to reuse that writer's result)")
        if time.monotonic() - self.confirmed_at > self.ttl / 2:
            self.renew()

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Hold the lease still while the body runs (the commit): confirmed, and locked where the store can lock."""
        self.check()
        with self.backend.critical(self.path):
            holder, _ = self.backend.read(self.path)
            if not self._ours(holder):
                self._lose(holder)
            yield

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with self.backend.critical(self.path):
            holder, tag = self.backend.read(self.path)
            if self._ours(holder):
                self.backend.delete(self.path, tag)
            elif holder is not None:
                log.warning("%s is held by %s now; leaving it in place", self.what(), _owner(holder))

    def _ours(self, holder: Any) -> bool:
        return isinstance(holder, dict) and holder.get("token") == self.token

    def _lose(self, holder: Any) -> None:
        self.lost.set()
        raise LeaseLost(
            f"{self.what()} is now held by {_owner(holder) if holder else 'another writer'} (this writer paused for longer than "
            f"store.lease_ttl_s={self.ttl:g}s?); this run stops writing: run again to reuse that writer's result"
        )

    def _renew_forever(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except LeaseLost as exc:
                log.error("%s", exc)
                return
            except OSError as exc:  # a store outage: keep trying; check() confirms before writes
                log.warning("could not renew %s: %s; retrying", self.what(), exc)


def acquire(store: Any, stage: str, version: str, poll_s: float = 0.5) -> Lease:
    """Wait for and take the lease of one stage version; a second writer waits here."""
    path = posixpath.join(store.version_path(stage, version), "_lease.json")
    lease = Lease(store, stage, version, path)
    waited = False
    while not lease.backend.create(path, lease.body()):
        with lease.backend.critical(path):
            holder, tag = lease.backend.read(path)
            if holder is None:
                continue  # released between our create and read: try to create again
            if holder == TORN or abandoned(holder):
                why = "is not whole JSON" if holder == TORN else f"of {_owner(holder)} is abandoned"
                log.warning("the lease of %s/%s %s; taking it over", stage, version, why)
                if lease.backend.replace(path, lease.body(), tag):
                    break
                continue
        if not waited:
            log.info("stage %s/%s is being written by %s; waiting", stage, version, _owner(holder))
            waited = True
        time.sleep(poll_s)
    lease.confirmed_at = time.monotonic()
    lease._renewer = threading.Thread(target=lease._renew_forever, daemon=True, name=f"lease-{stage}")
    lease._renewer.start()
    return lease


def abandoned(holder: dict) -> bool:
    if float(holder.get("expires_at", 0)) < time.time():
        return True
    if holder.get("host") == socket.gethostname():
        return not pid_alive(int(holder.get("pid", -1)))
    return False


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed, not yet reaped) is not alive for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _owner(holder: Any) -> str:
    return str(holder.get("owner")) if isinstance(holder, dict) else "an unknown writer"


def _parse(data: bytes) -> Any:
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return TORN
    return body if isinstance(body, dict) else TORN


class LocalLeases:
    """Lease files on a local disk: flock on the version directory makes compare-then-write atomic."""

    def __init__(self, store: Any):
        self.store = store

    @contextmanager
    def critical(self, path: str) -> Iterator[None]:
        folder = posixpath.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def create(self, path: str, data: bytes) -> bool:
        return self.store.create_exclusive(path, data)

    def read(self, path: str) -> tuple[Any, None]:
        try:
            with open(path, "rb") as f:
                return _parse(f.read()), None
        except FileNotFoundError:
            return None, None

    def replace(self, path: str, data: bytes, tag: None) -> bool:
        self.store.write_bytes_atomic(path, data, durable=True)
        return True

    def delete(self, path: str, tag: None) -> bool:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return True


class S3Leases:
    """Lease objects on S3: reads return the ETag; writes and deletes are conditional on it."""

    def __init__(self, store: Any):
        self.store, self.fs = store, store.fs

    def critical(self, path: str):
        return nullcontext()  # the conditional requests below are the atomicity

    def create(self, path: str, data: bytes) -> bool:
        return self.store.create_exclusive(path, data)

    def read(self, path: str) -> tuple[Any, str | None]:
        bucket, key, _ = self.fs.split_path(path)

        async def fetch() -> tuple[bytes, str]:
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with response["Body"] as stream:
                return await stream.read(), response["ETag"]

        try:
            data, etag = fsspec.asyn.sync(self.fs.loop, fetch)
        except FileNotFoundError:
            return None, None
        return _parse(data), etag

    def replace(self, path: str, data: bytes, tag: str | None) -> bool:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=tag)
        except (FileNotFoundError, OSError) as exc:
            if _precondition_failed(exc):
                return False
            raise
        self.fs.invalidate_cache(path)
        return True

    def delete(self, path: str, tag: str | None) -> bool:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=tag)
        except (FileNotFoundError, OSError) as exc:
            if _precondition_failed(exc):
                return False
            raise
        self.fs.invalidate_cache(path)
        return True


def _precondition_failed(exc: BaseException) -> bool:
    """412 (someone else changed the lease) or 404 (it is gone): the condition did not hold."""
    if isinstance(exc, FileNotFoundError):
        return True
    # s3fs turns the ClientError into a plain OSError; the S3 error code is on its cause
    code = str(getattr(exc.__cause__, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("PreconditionFailed", "412") or "PreconditionFailed" in str(exc)
