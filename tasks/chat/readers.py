"""Reading chat data rows from the configured sources: JSONL and Parquet on any fsspec URL.

Every row comes with its location, for error messages a person can act on:

- JSONL (``.jsonl``, ``.ndjson``, ``.json``, optionally ``.gz``/``.bz2``/``.xz``/``.zst``):
  ``path:LINE`` (1-based). A ``.json`` file whose first character is ``[`` is one JSON array
  (the Alpaca layout): ``path:item N`` (0-based).
- Parquet (``.parquet``): ``path:row N`` (0-based, as pyarrow and pandas count).

A line that is not JSON (or not UTF-8) comes back as a ``BadRow("invalid_json")`` in place of
the object, so the stage's ``on_bad_row`` policy decides. A file that cannot be read at all
(missing, corrupt Parquet, cut gzip) is an ``InputError`` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import pyarrow.parquet as pq

from lmfoundry.infra.config_posttrain import ChatSourceConfig
from lmfoundry.infra.files import InputError, match_files

COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
DATA_SUFFIXES = tuple(s + c for s in JSONL_SUFFIXES + PARQUET_SUFFIXES for c in ("", *COMPRESSION_SUFFIXES))


class ChatDataError(InputError):
    """Chat data the stage cannot use: a malformed row (under on_bad_row: error) or a bad source."""


class BadRow(Exception):
    """One malformed row: a reason (the stats key), the field at fault and what is wrong."""

    def __init__(self, reason: str, field: str | None, detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail

    def describe(self) -> str:
        where = f"field {self.field}: " if self.field else ""
        return f"{where}{self.detail} [{self.reason}]"


@dataclass(frozen=True)
class ChatFile:
    source: ChatSourceConfig
    label: str  # the source's name in the stats
    url: str
    size: int
    stamp: str  # mtime or ETag: changes when the file changes


def source_label(source: ChatSourceConfig) -> str:
    return source.name or source.paths[0]


def list_files(sources: list[ChatSourceConfig], section: str) -> list[ChatFile]:
    """Every file the sources name, in config order then sorted; a path that matches nothing is an error."""
    files: list[ChatFile] = []
    for s, source in enumerate(sources):
        found: dict[str, ChatFile] = {}
        for p, pattern in enumerate(source.paths):
            try:
                matches = match_files(pattern, source.storage_options, DATA_SUFFIXES)
            except (OSError, ValueError) as exc:
                raise ChatDataError(f"{section}.sources[{s}].paths[{p}] '{pattern}' cannot be listed: {exc}") from exc
            if not matches:
                raise ChatDataError(
                    f"{section}.sources[{s}].paths[{p}] '{pattern}' matched no files; check the path, or remove it from the config"
                )
            for f in matches:
                found[f.url] = ChatFile(source, source_label(source), f.url, f.size, f.stamp)
        files += [found[k] for k in sorted(found)]
    return files


def fingerprint(files: list[ChatFile], extra: list[str] = ()) -> str:
    """Changes when any input file is added, removed or modified (size + mtime/ETag), like make."""
    lines = [f"{f.label}\t{f.url}\t{f.size}\t{f.stamp}" for f in files] + list(extra)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest() if lines else ""


def _base_name(url: str) -> str:
    """The file name without a compression suffix, lower-cased."""
    name = url.lower().rsplit("/", 1)[-1]
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def file_kind(url: str) -> str:
    return "parquet" if posixpath.splitext(_base_name(url))[1] in PARQUET_SUFFIXES else "jsonl"


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return BadRow("invalid_json", None, f"the line is not UTF-8 ({exc.reason} at byte {exc.start})")
    except json.JSONDecodeError as exc:
        return BadRow("invalid_json", None, f"the line is not JSON: {exc.msg} at column {exc.colno}")


def read_jsonl(f: ChatFile) -> Iterator[tuple[str, Any]]:
    with fsspec.open(f.url, "rb", compression="infer", **f.source.storage_options) as fh:
        if _base_name(f.url).endswith(".json"):
            # a .json file is either JSON lines or one array (read whole: such files are small)
            data = fh.read()
            if data.lstrip().startswith(b"["):
                try:
                    items = json.loads(data.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    line = getattr(exc, "lineno", 1)
                    yield f"{f.url}:{line}", BadRow("invalid_json", None, f"the file (one JSON array) does not parse: {exc}")
                    return
                for i, obj in enumerate(items):
                    yield f"{f.url}:item {i}", obj
                return
            lines = data.split(b"\n")
        else:
            lines = fh
        for line_no, raw in enumerate(lines, start=1):
            if raw.strip():
                yield f"{f.url}:{line_no}", _decode(raw)


def read_parquet(f: ChatFile) -> Iterator[tuple[str, Any]]:
    with fsspec.open(f.url, "rb", **f.source.storage_options) as fh:
        row = 0
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=4096):
            for obj in batch.to_pylist():
                yield f"{f.url}:row {row}", obj
                row += 1


def read_rows(f: ChatFile) -> Iterator[tuple[str, Any]]:
    """(location, object or BadRow) for every row of one file."""
    reader = read_parquet if file_kind(f.url) == "parquet" else read_jsonl
    try:
        yield from reader(f)
    except (OSError, EOFError, ValueError) as exc:  # a cut gzip, a corrupt Parquet footer (ArrowInvalid)
        raise ChatDataError(f"{f.url} cannot be read: {exc}; fix or remove the file") from exc
