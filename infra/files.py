"""Listing input files on any fsspec URL (local paths, globs, directories, s3://...).

Shared by the stages that read files a user names in the config (ingest, ingest_warc).
"""
from __future__ import annotations

from dataclasses import dataclass

import fsspec

from lmfoundry.infra.config import expand_path


class InputError(ValueError):
    """A configured input cannot be read at all (as opposed to a malformed record)."""


@dataclass(frozen=True)
class FoundFile:
    url: str  # an fsspec URL (a plain path for local files)
    size: int
    stamp: str  # mtime or ETag: changes when the file changes


def match_files(pattern: str, storage_options: dict | None = None, dir_suffixes: tuple[str, ...] = ()) -> list[FoundFile]:
    """The files a path, glob or directory names, sorted; empty when nothing matches.

    A directory is searched recursively, for files ending in `dir_suffixes` when given.
    """
    fs, path = fsspec.core.url_to_fs(expand_path(pattern), **(storage_options or {}))
    protocol = fs.protocol[0] if isinstance(fs.protocol, (list, tuple)) else fs.protocol
    if any(ch in path for ch in "*?["):
        matches = fs.glob(path, detail=True)
    elif fs.isdir(path):
        matches = {p: info for p, info in fs.find(path, detail=True).items() if not dir_suffixes or p.endswith(dir_suffixes)}
    elif fs.exists(path):
        matches = {path: fs.info(path)}
    else:
        matches = {}
    found = []
    for p, info in sorted(matches.items()):
        if info.get("type") != "file":
            continue
        stamp = info.get("mtime") or info.get("ETag") or info.get("LastModified") or info.get("created") or ""
        found.append(FoundFile(p if protocol in ("file", "local") else f"{protocol}://{p}", int(info.get("size") or 0), str(stamp)))
    return found
