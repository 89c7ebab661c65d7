"""The stage store: versioned, resumable stage artifacts on any fsspec URL.

Layout under the store root::

    stages/<stage>/<version>/            one directory per stage version
        data/part-00000.parquet          outputs (any relative path)
        _markers/<relpath>.json          per-file completion marker: size, checksum (xxh3-128), rows
        _lease.json                      who is writing this version right now
        manifest.json                    written LAST: the commit
    refs/<pipeline>/<stage>/<time>-<version>.json   named refs; the newest is current

A version directory without manifest.json is not committed and is never read. A committed
version is never written again. Files are written whole (tmp + rename locally, one PUT on
S3), then marked, so a crash leaves at most unmarked garbage that the next run rewrites.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import posixpath
import socket
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import fsspec
import xxhash
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict

from lmfoundry.infra import faults

log = logging.getLogger("lmfoundry.store")

MANIFEST = "manifest.json"
MARKERS = "_markers"
LEASE = "_lease.json"


class StoreError(RuntimeError):
    pass


class StageRef(BaseModel):
    """A small, serialisable pointer to one committed stage version (what tasks pass around)."""

    model_config = ConfigDict(frozen=True)
    stage: str
    version: str
    store_url: str
    digest: str


def stage_version(stage: str, code_version: str, identity: dict[str, Any], input_digests: list[str], salt: str = "") -> str:
    """Hash of everything that determines a stage's output; equal hash => reusable output."""
    payload = json.dumps(
        {"stage": stage, "code": code_version, "config": identity, "inputs": input_digests, "salt": salt},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def checksum(data: bytes) -> str:
    """File checksum: xxh3-128 (10+ GB/s; integrity and content identity, not security)."""
    return "xxh3_128:" + xxhash.xxh3_128_hexdigest(data)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@functools.cache  # one subprocess per process, not per commit
def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


class Store:
    """An artifact store rooted at an fsspec URL (local path or s3://bucket/prefix)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, lease_ttl_s: float = 120.0):
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(url, **self.storage_options)
        self.lease_ttl_s = lease_ttl_s
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            self.fs.makedirs(self.root, exist_ok=True)

    @classmethod
    def from_config(cls, cfg) -> "Store":
        return cls(cfg.url, cfg.storage_options, cfg.lease_ttl_s)

    # ------------------------------------------------------------------ paths and raw io
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def version_path(self, stage: str, version: str) -> str:
        return self.path("stages", stage, version)

    def write_bytes_atomic(self, path: str, data: bytes, durable: bool = False) -> None:
        """Readers see the whole file or nothing; `durable` also waits until it is on disk."""
        if self.is_local:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)  # a single PUT: atomic on S3

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create a file only if it does not exist; True if we created it."""
        if self.is_local:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)  # atomic and exclusive: readers never see a half-written lease
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        try:
            self.fs.pipe_file(path, data, mode="create")  # S3 conditional write (If-None-Match: *)
            return True
        except (FileExistsError, OSError) as exc:
            if isinstance(exc, FileExistsError) or "PreconditionFailed" in str(exc) or "412" in str(exc):
                return False
            raise

    def read_json(self, path: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------------ versions
    def is_committed(self, stage: str, version: str) -> bool:
        return self.fs.exists(posixpath.join(self.version_path(stage, version), MANIFEST))

    def manifest(self, stage: str, version: str) -> dict | None:
        return self.read_json(posixpath.join(self.version_path(stage, version), MANIFEST))

    def ref(self, stage: str, version: str) -> StageRef:
        manifest = self.manifest(stage, version)
        if manifest is None:
            raise StoreError(f"stage '{stage}' version {version} is not committed in {self.url}")
        return StageRef(stage=stage, version=version, store_url=self.url, digest=manifest["digest"])

    def versions(self, stage: str) -> list[str]:
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path("stages", stage), detail=False))
        except FileNotFoundError:
            return []

    def stages(self) -> list[str]:
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path("stages"), detail=False))
        except FileNotFoundError:
            return []

    def open_for_write(self, stage: str, version: str) -> "StageDir":
        if self.is_committed(stage, version):
            raise StoreError(f"stage '{stage}' version {version} is committed and can never be written again")
        return StageDir(self, stage, version)

    def reader(self, ref: StageRef) -> "StageReader":
        manifest = self.manifest(ref.stage, ref.version)
        if manifest is None:
            raise StoreError(f"stage '{ref.stage}' version {ref.version} is not committed in {self.url}; run the pipeline again")
        return StageReader(self, ref, manifest)

    def commit(self, out: "StageDir", fields: dict[str, Any]) -> StageRef:
        """Write the manifest (last) listing every marked file; returns the new ref."""
        files = out.marked_files()
        digest = hashlib.sha256("\n".join(f"{p}:{m['checksum']}" for p, m in sorted(files.items())).encode()).hexdigest()
        manifest = {
            "stage": out.stage,
            "version": out.version,
            "digest": digest,
            "created_at": utc_now(),
            "git_revision": git_revision(),
            "rows": sum(m.get("rows") or 0 for p, m in files.items() if p.startswith("data/")),
            "bytes": sum(m["size"] for m in files.values()),
            "files": files,
            **fields,
        }
        faults.hit(out.stage, "before_commit")
        if self.is_local:
            os.sync()  # one flush of every file written before the manifest makes them visible
        self.write_bytes_atomic(posixpath.join(out.path, MANIFEST), json.dumps(manifest, indent=2, default=str).encode(), durable=True)
        return StageRef(stage=out.stage, version=out.version, store_url=self.url, digest=digest)

    # ------------------------------------------------------------------ named refs
    def set_ref(self, pipeline: str, stage: str, version: str, run_id: str | None = None) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        body = {"stage": stage, "version": version, "set_at": utc_now(), "run_id": run_id}
        self.write_bytes_atomic(self.path("refs", pipeline, stage, f"{stamp}-{version}.json"), json.dumps(body).encode())

    def ref_history(self, pipeline: str, stage: str) -> list[dict]:
        try:
            names = sorted(self.fs.ls(self.path("refs", pipeline, stage), detail=False))
        except FileNotFoundError:
            return []
        return [json.loads(self.fs.cat_file(n)) for n in names if n.endswith(".json")]

    def get_ref(self, pipeline: str, stage: str) -> str | None:
        history = self.ref_history(pipeline, stage)
        return history[-1]["version"] if history else None

    # ------------------------------------------------------------------ leases
    @contextmanager
    def lease(self, stage: str, version: str, poll_s: float = 0.5) -> Iterator[None]:
        """Exclusive right to write one stage version; a second writer waits here.

        A lease is abandoned when its owner stops renewing it (ttl) or, on the same host,
        when the owner process is gone; then the next writer takes it over and resumes.
        """
        path = posixpath.join(self.version_path(stage, version), LEASE)
        token = uuid.uuid4().hex
        waited = False
        while not self.create_exclusive(path, self._lease_body(token)):
            holder = self.read_json(path)
            if holder is not None and self._lease_abandoned(holder):
                log.warning("taking over abandoned lease of %s/%s from %s", stage, version, holder.get("owner"))
                self.fs.rm_file(path)
                continue
            if not waited:
                log.info("stage %s/%s is being written by %s; waiting", stage, version, (holder or {}).get("owner"))
                waited = True
            time.sleep(poll_s)
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew_lease, args=(path, token, stop), daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass

    def _lease_body(self, token: str) -> bytes:
        return json.dumps(
            {
                "owner": f"{socket.gethostname()}:{os.getpid()}",
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "token": token,
                "expires_at": time.time() + self.lease_ttl_s,
            }
        ).encode()

    def _renew_lease(self, path: str, token: str, stop: threading.Event) -> None:
        while not stop.wait(self.lease_ttl_s / 3):
            self.write_bytes_atomic(path, self._lease_body(token))

    def _lease_abandoned(self, holder: dict) -> bool:
        if holder.get("expires_at", 0) < time.time():
            return True
        if holder.get("host") == socket.gethostname():
            return not _pid_alive(int(holder.get("pid", -1)))
        return False


def _pid_alive(pid: int) -> bool:
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


class StageDir:
    """Where a running stage writes. Every file goes through write_* so it is marked.

    ``done(relpath)`` tells a resuming stage which outputs are already complete.
    """

    def __init__(self, store: Store, stage: str, version: str):
        self.store, self.stage, self.version = store, stage, version
        self.path = store.version_path(stage, version)
        self._marked_count = 0

    def _marker_path(self, relpath: str) -> str:
        return posixpath.join(self.path, MARKERS, relpath + ".json")

    def done(self, relpath: str) -> bool:
        """True when the file was completely written (its marker exists and the size matches)."""
        marker = self.marker(relpath)
        if marker is None:
            return False
        try:
            return self.store.fs.size(posixpath.join(self.path, relpath)) == marker["size"]
        except FileNotFoundError:
            return False

    def marker(self, relpath: str) -> dict | None:
        return self.store.read_json(self._marker_path(relpath))

    def write_bytes(self, relpath: str, data: bytes, rows: int | None = None, **extra: Any) -> None:
        self.store.write_bytes_atomic(posixpath.join(self.path, relpath), data)
        marker = {"size": len(data), "checksum": checksum(data), "rows": rows, **extra}
        self.store.write_bytes_atomic(self._marker_path(relpath), json.dumps(marker).encode())
        self._marked_count += 1
        faults.hit(self.stage, "after_file", self._marked_count)

    def write_json(self, relpath: str, obj: Any) -> None:
        self.write_bytes(relpath, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def write_table(self, relpath: str, table: pa.Table, **extra: Any) -> None:
        """Write a Parquet file (zstd) and its marker with the row count."""
        self.write_bytes(relpath, table_to_parquet_bytes(table), rows=table.num_rows, **extra)

    def put_file(self, local_path: str | Path, relpath: str) -> None:
        """Upload a file produced by an external tool (a model file, a checkpoint)."""
        self.write_bytes(relpath, Path(local_path).read_bytes())

    def remove(self, prefix: str) -> None:
        """Forget marked files under `prefix` (an old checkpoint) before commit: marker first, then file."""
        for relpath in [p for p in self.marked_files() if p.startswith(prefix)]:
            for path in (self._marker_path(relpath), posixpath.join(self.path, relpath)):
                if self.store.fs.exists(path):
                    self.store.fs.rm_file(path)

    def read_bytes(self, relpath: str) -> bytes:
        return self.store.fs.cat_file(posixpath.join(self.path, relpath))

    def read_table(self, relpath: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(relpath)))

    def marked_files(self) -> dict[str, dict]:
        root = posixpath.join(self.path, MARKERS)
        if not self.store.fs.exists(root):
            return {}
        out = {}
        for marker in self.store.fs.find(root):
            if not marker.endswith(".json") or ".tmp-" in marker:
                continue
            rel = posixpath.relpath(marker, root)[: -len(".json")]
            out[rel] = json.loads(self.store.fs.cat_file(marker))
        return out


class StageReader:
    """Read-only view of a committed stage version; lists only files in its manifest."""

    def __init__(self, store: Store, ref: StageRef, manifest: dict):
        self.store, self.ref, self.manifest = store, ref, manifest
        self.path = store.version_path(ref.stage, ref.version)

    def files(self, prefix: str = "", suffix: str = "") -> list[str]:
        return sorted(p for p in self.manifest["files"] if p.startswith(prefix) and p.endswith(suffix))

    def read_bytes(self, relpath: str) -> bytes:
        if relpath not in self.manifest["files"]:
            raise StoreError(f"{relpath} is not part of committed stage {self.ref.stage}/{self.ref.version}")
        return self.store.fs.cat_file(posixpath.join(self.path, relpath))

    def read_json(self, relpath: str) -> Any:
        return json.loads(self.read_bytes(relpath))

    def read_table(self, relpath: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(relpath)), columns=columns)

    def local_path(self, relpath: str) -> str:
        """A local filesystem path for tools that need one (S3 files are cached once)."""
        if self.store.is_local:
            return posixpath.join(self.path, relpath)
        cache = Path(os.environ.get("LMF_CACHE", Path.home() / ".cache" / "lmfoundry"))
        target = cache / self.ref.stage / self.ref.version / relpath
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + f".tmp-{uuid.uuid4().hex[:8]}")
            tmp.write_bytes(self.read_bytes(relpath))
            os.replace(tmp, target)
        return str(target)
