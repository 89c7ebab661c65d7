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

Integrity (infra/integrity.py): a reader checks every file's size on every read and its
checksum the first time a process uses it. A damaged committed file un-commits its version
(`Store.uncommit`): the damaged files' markers go, then the manifest, so the next run of the
stage resumes in the same directory, reuses every intact file and recomputes the damaged
ones. A manifest, marker, ref or lease that is not whole JSON (cut short by power loss) reads
as absent, with a warning naming the file: not committed, not done, no ref, abandoned.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import posixpath
import subprocess
import uuid
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict

from lmfoundry.infra import faults
from lmfoundry.infra.credentials import WHERE_INSTEAD, secret_options
from lmfoundry.infra.integrity import bytes_problem, checksum, file_problem
from lmfoundry.infra.lease import Lease, acquire

log = logging.getLogger("lmfoundry.store")

MANIFEST = "manifest.json"
MARKERS = "_markers"
LEASE = "_lease.json"
DAMAGED = "_damaged"  # <version>/_damaged/<time>/: the damaged files and the manifest they were committed in
REPAIR = "_repair.json"  # <version>/_repair.json: the damaged files the next run recomputes


class StoreError(RuntimeError):
    pass


class TornFile(StoreError):
    """A JSON file of the store that is not whole JSON (cut short by a crash or power loss)."""


class DamagedFile(StoreError):
    """Committed files whose size or checksum differ from their manifest (the version is un-committed)."""

    def __init__(self, stage: str, version: str, damaged: dict[str, str], store_url: str, committed: bool = True):
        self.stage, self.version, self.damaged = stage, version, damaged
        listed = "; ".join(f"{store_url.rstrip('/')}/stages/{stage}/{version}/{rel}: {why}" for rel, why in sorted(damaged.items()))
        what = "The version is no longer committed" if committed else "Its completion marker is removed"
        super().__init__(
            f"damaged file(s) in stage '{stage}' version {version}: {listed}. {what}: "
            f"run again and stage '{stage}' recomputes only these file(s), reusing the intact ones"
        )


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
        if secrets := secret_options(storage_options or {}):
            raise StoreError(f"store storage_options {', '.join(repr(p) for p in secrets)}: {WHERE_INSTEAD}")
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
                f.flush()
                os.fsync(f.fileno())  # on disk before it is linked: power loss cannot leave it cut short
            try:
                os.link(tmp, path)  # atomic and exclusive: readers never see a half-written lease
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            _fsync_dir(posixpath.dirname(path))
            return True
        try:
            self.fs.pipe_file(path, data, mode="create")  # S3 conditional write (If-None-Match: *)
            return True
        except (FileExistsError, OSError) as exc:
            if isinstance(exc, FileExistsError) or "PreconditionFailed" in str(exc) or "412" in str(exc):
                return False
            raise

    def read_json(self, path: str) -> Any:
        """The parsed file; None when it does not exist; TornFile (naming it) when it is not whole JSON."""
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise TornFile(f"{self.url.rstrip('/')}/{posixpath.relpath(path, self.root)} is not whole JSON ({len(data)} bytes: {exc})") from exc

    def read_json_or_none(self, path: str, consequence: str) -> Any:
        """Like read_json, but a torn file reads as absent, with a warning naming it and the consequence."""
        try:
            return self.read_json(path)
        except TornFile as exc:
            log.warning("%s: %s", exc, consequence)
            return None

    # ------------------------------------------------------------------ versions
    def is_committed(self, stage: str, version: str) -> bool:
        return self.manifest(stage, version) is not None

    def manifest(self, stage: str, version: str) -> dict | None:
        """The manifest of a committed version; None when there is none or it is torn (not committed)."""
        path = posixpath.join(self.version_path(stage, version), MANIFEST)
        return self.read_json_or_none(path, f"stage '{stage}' version {version} is treated as not committed; the next run recomputes it")

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

    def open_for_write(self, stage: str, version: str, lease: Lease | None = None) -> "StageDir":
        if self.is_committed(stage, version):
            raise StoreError(f"stage '{stage}' version {version} is committed and can never be written again")
        return StageDir(self, stage, version, lease)

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
            self._remove_leftover_tmp(out.path)
            os.sync()  # one flush of every file written before the manifest makes them visible
        with out.lease.guard() if out.lease else nullcontext():
            self.write_bytes_atomic(posixpath.join(out.path, MANIFEST), json.dumps(manifest, indent=2, default=str).encode(), durable=True)
        return StageRef(stage=out.stage, version=out.version, store_url=self.url, digest=digest)

    def _remove_leftover_tmp(self, path: str) -> None:
        """Half-written `.tmp-` files of crashed writers never stay inside a committed version
        (only the lease holder writes here, and its own writes are finished)."""
        for leftover in [p for p in self.fs.find(path) if ".tmp-" in posixpath.basename(p)]:
            try:
                self.fs.rm_file(leftover)
            except FileNotFoundError:
                pass

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
        bodies = [self.read_json_or_none(n, "this ref is skipped") for n in names if n.endswith(".json")]
        return [body for body in bodies if isinstance(body, dict) and "version" in body]

    def get_ref(self, pipeline: str, stage: str) -> str | None:
        history = self.ref_history(pipeline, stage)
        return history[-1]["version"] if history else None

    # ------------------------------------------------------------------ leases
    @contextmanager
    def lease(self, stage: str, version: str, poll_s: float = 0.5) -> Iterator[Lease]:
        """Exclusive right to write one stage version; a second writer waits here (infra/lease.py).

        A lease is abandoned when its owner stops renewing it (ttl), when the owner process on
        this host is gone, or when its file is torn; then the next writer takes it over and resumes.
        """
        held = acquire(self, stage, version, poll_s)
        try:
            yield held
        finally:
            held.release()


def _fsync_dir(path: str) -> None:
    """Make a new directory entry (a linked lease) durable too."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StageDir:
    """Where a running stage writes. Every file goes through write_* so it is marked.

    ``done(relpath)`` tells a resuming stage which outputs are already complete. With a
    `lease` (the stage runner passes its own), every write first checks the lease is still ours.
    """

    def __init__(self, store: Store, stage: str, version: str, lease: Lease | None = None):
        self.store, self.stage, self.version, self.lease = store, stage, version, lease
        self.path = store.version_path(stage, version)
        self._marked_count = 0

    def __getstate__(self) -> dict:
        # shard workers in other processes (processes / Dask) get no lease: it holds a thread;
        # the committing process still checks it before the manifest is written
        return {**self.__dict__, "lease": None}

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
        return self.store.read_json_or_none(self._marker_path(relpath), f"{relpath} counts as not written and is written again")

    def write_bytes(self, relpath: str, data: bytes, rows: int | None = None, **extra: Any) -> None:
        if self.lease is not None:
            self.lease.check()
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
        """A file this stage wrote; a marked (done) file is checked against its marker, and a
        damaged one loses its marker so the next run writes it again."""
        path = posixpath.join(self.path, relpath)
        data = self.store.fs.cat_file(path)
        marker = self.marker(relpath)
        problem = bytes_problem(f"{self.store.url}|{path}", data, marker) if marker else None
        if problem:
            self.store.fs.rm_file(self._marker_path(relpath))
            raise DamagedFile(self.stage, self.version, {relpath: problem}, self.store.url, committed=False)
        return data

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
            body = self.store.read_json_or_none(marker, f"{rel} counts as not written")
            if body is not None:
                out[rel] = body
        return out


class StageReader:
    """Read-only view of a committed stage version; lists only files in its manifest."""

    def __init__(self, store: Store, ref: StageRef, manifest: dict):
        self.store, self.ref, self.manifest = store, ref, manifest
        self.path = store.version_path(ref.stage, ref.version)

    def files(self, prefix: str = "", suffix: str = "") -> list[str]:
        return sorted(p for p in self.manifest["files"] if p.startswith(prefix) and p.endswith(suffix))

    def read_bytes(self, relpath: str) -> bytes:
        """The file's bytes, checked: size always, checksum the first time this process reads it."""
        entry = self._entry(relpath)
        path = posixpath.join(self.path, relpath)
        try:
            data = self.store.fs.cat_file(path)
        except FileNotFoundError:
            self._damaged_if(relpath, "missing")
        self._damaged_if(relpath, bytes_problem(f"{self.store.url}|{path}", data, entry))
        return data

    def _entry(self, relpath: str) -> dict:
        if relpath not in self.manifest["files"]:
            raise StoreError(f"{relpath} is not part of committed stage {self.ref.stage}/{self.ref.version}")
        return self.manifest["files"][relpath]

    def _damaged_if(self, relpath: str, problem: str | None) -> None:
        """Un-commit this version when a file is damaged (with any other file of a wrong size) and raise."""
        if problem:
            from lmfoundry.infra.verify import size_damage, uncommit  # verify builds on this module

            damaged = {**size_damage(self.store, self.ref.stage, self.ref.version, self.manifest), relpath: problem}
            uncommit(self.store, self.ref.stage, self.ref.version, damaged, self.manifest)
            raise DamagedFile(self.ref.stage, self.ref.version, damaged, self.store.url)

    def read_json(self, relpath: str) -> Any:
        return json.loads(self.read_bytes(relpath))

    def read_table(self, relpath: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(relpath)), columns=columns)

    def local_path(self, relpath: str) -> str:
        """A local filesystem path for tools that need one (S3 files are cached once)."""
        entry = self._entry(relpath)
        if self.store.is_local:
            path = posixpath.join(self.path, relpath)
            try:
                size = os.path.getsize(path)
            except FileNotFoundError:
                self._damaged_if(relpath, "missing")
            self._damaged_if(relpath, file_problem(f"{self.store.url}|{path}", size, lambda: open(path, "rb"), entry))
            return path
        cache = Path(os.environ.get("LMF_CACHE", Path.home() / ".cache" / "lmfoundry"))
        target = cache / self.ref.stage / self.ref.version / relpath
        if target.exists() and file_problem(f"cache|{target}", target.stat().st_size, lambda: target.open("rb"), entry) is None:
            return str(target)
        target.parent.mkdir(parents=True, exist_ok=True)  # absent or a damaged cache copy: fetch (and check) again
        tmp = target.with_name(target.name + f".tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(self.read_bytes(relpath))
        os.replace(tmp, target)
        return str(target)
