"""File integrity: xxh3-128 checksums and the checks a reader runs before it uses a stored file.

Every file the store commits is listed in its manifest (and in its marker before that) with
its size and checksum. A reader checks the size on every read (free) and the checksum the
first time this process uses the file (xxh3 runs at memory speed); a verified
``(path, checksum)`` pair is remembered for the life of the process, so a file read many
times is hashed once. ``lmf verify`` checks whole stores without the cache.

    from lmfoundry.infra.integrity import checksum, bytes_problem
    bytes_problem("stages/x/v/data/a.parquet", data, {"size": 10, "checksum": checksum(data)})  # None: intact
"""
from __future__ import annotations

import threading
from typing import BinaryIO, Callable

import xxhash

PREFIX = "xxh3_128:"
CHUNK = 8 * 2**20

_verified: set[tuple[str, str]] = set()
_lock = threading.Lock()


def checksum(data: bytes) -> str:
    """File checksum: xxh3-128 (10+ GB/s; integrity and content identity, not security)."""
    return PREFIX + xxhash.xxh3_128_hexdigest(data)


def checksum_stream(fh: BinaryIO) -> str:
    """The same checksum as `checksum(fh.read())`, in constant memory (token shards can be large)."""
    digest = xxhash.xxh3_128()
    while chunk := fh.read(CHUNK):
        digest.update(chunk)
    return PREFIX + digest.hexdigest()


def size_problem(actual: int, entry: dict) -> str | None:
    """None when the size matches the recorded one, else what is wrong in words."""
    expected = int(entry["size"])
    if actual == expected:
        return None
    what = "truncated" if actual < expected else "longer than written"
    return f"{what}: {actual} bytes, {expected} recorded"


def checksum_problem(actual: str, entry: dict) -> str | None:
    if actual == entry["checksum"]:
        return None
    return f"contents changed: checksum {actual}, {entry['checksum']} recorded"


def bytes_problem(key: str, data: bytes, entry: dict) -> str | None:
    """Check bytes just read: the size always, the checksum once per process per (key, checksum)."""
    return size_problem(len(data), entry) or _once(key, entry, lambda: checksum(data))


def file_problem(key: str, size: int, open_file: Callable[[], BinaryIO], entry: dict) -> str | None:
    """Check a file a tool will open by path: `size` always, the checksum (streamed) once per process."""
    def stream() -> str:
        with open_file() as fh:
            return checksum_stream(fh)

    return size_problem(size, entry) or _once(key, entry, stream)


def full_problem(size: int, open_file: Callable[[], BinaryIO], entry: dict) -> str | None:
    """Size and checksum, ignoring what this process verified before (``lmf verify``)."""
    if problem := size_problem(size, entry):
        return problem
    with open_file() as fh:
        return checksum_problem(checksum_stream(fh), entry)


def _once(key: str, entry: dict, compute: Callable[[], str]) -> str | None:
    token = (key, entry["checksum"])
    if token in _verified:
        return None
    problem = checksum_problem(compute(), entry)
    if problem is None:
        with _lock:
            _verified.add(token)
    return problem
