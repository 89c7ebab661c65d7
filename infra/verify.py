"""Checking committed stage versions against their manifests, and un-committing damaged ones.

    lmf verify [STAGE] [--report-only]   # every file of every committed version: size and checksum

Three depths of checking, cheapest first:

- `size_damage`: one listing of the version directory against the manifest's sizes (the
  stage runner does this before it reuses a committed version; `lmf status` shows it);
- the readers' checks (infra/store.py: size on every read, checksum on first use);
- `full_damage`: every file's size and checksum (``lmf verify``).

`uncommit` turns a damaged committed version back into an unfinished one, in an order that
is safe to interrupt: a repair note (``_repair.json``) first, then the damaged files' markers
go and the files move to ``_damaged/<time>/``, then the manifest moves there too. The next run
of the stage resumes in the same directory: the per-file ``done()`` markers make it reuse every
intact file and recompute only the damaged ones, and it says so.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
from dataclasses import dataclass, field
from datetime import datetime, timezone

from lmfoundry.infra.integrity import full_problem, size_problem
from lmfoundry.infra.store import DAMAGED, MANIFEST, MARKERS, REPAIR, Store, utc_now

log = logging.getLogger("lmfoundry.store")


def listed_sizes(store: Store, stage: str, version: str) -> dict[str, int]:
    """Relative path -> size of every file in a version directory (one listing)."""
    root = store.version_path(stage, version)
    store.fs.invalidate_cache(root)  # S3: list what is there now, not what this process saw before
    try:
        found = store.fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {posixpath.relpath(p, root): int(info.get("size") or 0) for p, info in found.items() if info.get("type") == "file"}


def size_damage(store: Store, stage: str, version: str, manifest: dict) -> dict[str, str]:
    """Files of a committed version that are missing or whose size differs from the manifest."""
    sizes = listed_sizes(store, stage, version)
    damaged = {}
    for relpath, entry in manifest["files"].items():
        problem = "missing" if relpath not in sizes else size_problem(sizes[relpath], entry)
        if problem:
            damaged[relpath] = problem
    return damaged


def full_damage(store: Store, stage: str, version: str, manifest: dict) -> dict[str, str]:
    """Files of a committed version that are missing or whose size or checksum is wrong."""
    root = store.version_path(stage, version)
    sizes = listed_sizes(store, stage, version)
    damaged = {}
    for relpath, entry in sorted(manifest["files"].items()):
        path = posixpath.join(root, relpath)
        problem = "missing" if relpath not in sizes else full_problem(sizes[relpath], lambda path=path: store.fs.open(path, "rb"), entry)
        if problem:
            damaged[relpath] = problem
    return damaged


def uncommit(store: Store, stage: str, version: str, damaged: dict[str, str], seen: dict) -> bool:
    """Make a committed version with damaged files not committed; False when someone else already
    did (the manifest is gone or is not the one the damage was found in)."""
    root = store.version_path(stage, version)
    current = store.manifest(stage, version)
    if current is None or current.get("digest") != seen.get("digest"):
        return False
    quarantine = posixpath.join(root, DAMAGED, datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ"))
    note = {"found_at": utc_now(), "files": damaged, "manifest_digest": seen.get("digest"), "moved_to": posixpath.relpath(quarantine, root)}
    store.write_bytes_atomic(posixpath.join(root, REPAIR), json.dumps(note, indent=2).encode(), durable=True)
    for relpath in damaged:
        _remove(store, posixpath.join(root, MARKERS, relpath + ".json"))
        _move(store, posixpath.join(root, relpath), posixpath.join(quarantine, relpath))
    _move(store, posixpath.join(root, MANIFEST), posixpath.join(quarantine, MANIFEST))
    log.warning(
        "stage '%s' version %s is no longer committed: %s. The next run recomputes only %s",
        stage, version, describe(damaged), "this file" if len(damaged) == 1 else f"these {len(damaged)} files",
    )
    return True


def pending_repair(store: Store, stage: str, version: str) -> dict | None:
    """The repair note of an un-committed version: which files were damaged and why."""
    note = store.read_json_or_none(posixpath.join(store.version_path(stage, version), REPAIR), "the repair note is ignored")
    return note if isinstance(note, dict) and isinstance(note.get("files"), dict) else None


def finish_repair(store: Store, stage: str, version: str) -> None:
    _remove(store, posixpath.join(store.version_path(stage, version), REPAIR))


def describe(damaged: dict[str, str], limit: int = 3) -> str:
    items = [f"{relpath} ({why})" for relpath, why in sorted(damaged.items())]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return "damaged: " + ", ".join(items[:limit]) + more


@dataclass
class VersionCheck:
    stage: str
    version: str
    files: int = 0
    bytes: int = 0
    damaged: dict[str, str] = field(default_factory=dict)
    uncommitted: bool = False


def verify_store(store: Store, stages: list[str] | None = None, repair: bool = True) -> list[VersionCheck]:
    """Check every file of every committed version (of `stages`, default all); with `repair`,
    un-commit the damaged versions so the next run recomputes their damaged files."""
    checks = []
    for stage in stages if stages is not None else store.stages():
        for version in store.versions(stage):
            manifest = store.manifest(stage, version)
            if manifest is None:
                continue  # not committed: nothing is promised about it
            check = VersionCheck(stage, version, len(manifest["files"]), sum(int(e["size"]) for e in manifest["files"].values()))
            check.damaged = full_damage(store, stage, version, manifest)
            if check.damaged and repair:
                check.uncommitted = uncommit(store, stage, version, check.damaged, manifest)
            checks.append(check)
    return checks


def _remove(store: Store, path: str) -> None:
    try:
        store.fs.rm_file(path)
    except FileNotFoundError:
        pass


def _move(store: Store, source: str, target: str) -> None:
    """Move a file inside the store (a rename locally; copy then delete on S3); absent: nothing."""
    if store.is_local:
        os.makedirs(posixpath.dirname(target), exist_ok=True)
        try:
            os.replace(source, target)
        except FileNotFoundError:
            pass
        return
    try:
        store.fs.copy(source, target)
    except FileNotFoundError:
        return
    _remove(store, source)
