"""Stage `ingest`: local or remote files (text, JSONL, Parquet) -> document shards.

Input files are listed in the order of each source's paths (a glob's or directory's files
sorted) and grouped into partitions of about ``target_shard_bytes``; each partition becomes
one shard ``data/part-NNNNN.parquet``, so a resumed run redoes only the partitions that have
no completion marker. Malformed records are skipped and counted by reason, never fatal:
invalid_utf8, bad_json, not_object, missing_text, binary (NUL or control bytes: not text),
empty, too_short, too_long, unreadable_file, empty_file (a file with no record at all).

Fatal, as an input error naming the file: a JSONL or Parquet file in which no record has the
source's ``text_field`` (the message lists the fields the records do have). A run that gives
no document at all still commits, with a warning in the log and in ``warnings``.

Run alone: ``lmf run --until ingest``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import fsspec
import pyarrow.parquet as pq
from pydantic import BaseModel

from lmfoundry.infra.config import ComputeConfig, IngestConfig, SourceConfig
from lmfoundry.infra.docs import docs_table, shard_name
from lmfoundry.infra.files import InputError, match_files
from lmfoundry.infra.parallel import map_pending
from lmfoundry.infra.store import StageDir, StageRef
from lmfoundry.tasks.acquire.checks import empty_output_warning, looks_binary

CODE_VERSION = "2"  # 2: paths in the order given, binary content skipped
log = logging.getLogger("lmfoundry.ingest")

FORMATS_BY_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


@dataclass(frozen=True)
class InputFile:
    source: SourceConfig
    url: str  # fsspec URL
    size: int
    stamp: str  # mtime or ETag: changes when the file changes


class IngestStats(BaseModel):
    files: int
    shards: int
    docs_in: int
    docs_out: int
    skipped: dict[str, int]
    docs_by_source: dict[str, int]
    warnings: list[str] = []  # e.g. no document at all


# ---------------------------------------------------------------- listing


def list_source_files(source: SourceConfig) -> list[InputFile]:
    """Every file a source names, in the order of its paths (each path's own files sorted; a file
    named twice counts where it first appears); a path that matches nothing is an error."""
    found: dict[str, InputFile] = {}
    for i, raw in enumerate(source.paths):
        files = match_files(raw)
        if not files:
            raise InputError(
                f"source '{source.name}' path '{raw}' (sources[].paths[{i}]) matched no files; "
                "check the path exists and is readable, or remove it from the config"
            )
        for f in files:
            found.setdefault(f.url, InputFile(source, f.url, f.size, f.stamp))
    return list(found.values())


def list_inputs(cfg: IngestConfig) -> list[InputFile]:
    return [f for source in cfg.sources for f in list_source_files(source)]


def input_fingerprint(cfg: IngestConfig) -> str:
    """Changes when any input file is added, removed or modified (size + mtime/ETag), like make."""
    lines = [f"{f.source.name}\t{f.url}\t{f.size}\t{f.stamp}" for f in list_inputs(cfg)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def partition(files: list[InputFile], target_bytes: int) -> list[list[InputFile]]:
    """Consecutive files grouped into partitions of about target_bytes (a big file stands alone)."""
    parts: list[list[InputFile]] = []
    current: list[InputFile] = []
    size = 0
    for f in files:
        if current and size + f.size > target_bytes:
            parts.append(current)
            current, size = [], 0
        current.append(f)
        size += f.size
    if current:
        parts.append(current)
    return parts


# ---------------------------------------------------------------- reading records


def file_format(source: SourceConfig, url: str) -> str:
    if source.format != "auto":
        return source.format
    name = url
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return FORMATS_BY_SUFFIX.get(posixpath.splitext(name)[1].lower(), "text")


def doc_id(*parts: Any) -> str:
    return hashlib.sha1("\x00".join(str(p) for p in parts).encode()).hexdigest()[:20]


Record = tuple[dict[str, Any] | None, str | None]  # (document, skip reason)


def read_text_file(f: InputFile) -> Iterator[Record]:
    with fsspec.open(f.url, "rb", compression="infer") as fh:
        data = fh.read()
    if looks_binary(data):
        yield None, "binary"
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        yield None, "invalid_utf8"
        return
    yield {"id": doc_id(f.source.name, f.url), "text": text, "url": f.url, "meta": {"path": f.url}}, None


def _record_from_object(obj: Any, f: InputFile, line_no: int) -> Record:
    src = f.source
    if not isinstance(obj, dict):
        return None, "not_object"
    text = obj.get(src.text_field)
    if not isinstance(text, str):
        return None, "missing_text"
    given_id = obj.get(src.id_field) if src.id_field else None
    url = obj.get(src.url_field) if src.url_field else None
    meta = {k: v for k, v in obj.items() if k not in (src.text_field, src.id_field, src.url_field)}
    meta.update(path=f.url, record=line_no)
    return {
        "id": str(given_id) if given_id is not None else doc_id(src.name, f.url, line_no),
        "text": text,
        "url": url if isinstance(url, str) else "",
        "meta": meta,
    }, None


class TextFieldCheck:
    """Tells a wrong `text_field` from a few records without text: a file where objects were read
    but none had the field is an input error naming the field and the fields that exist."""

    def __init__(self, f: InputFile):
        self.f, self.objects, self.with_text, self.fields = f, 0, 0, Counter()

    def see(self, obj: Any) -> None:
        if isinstance(obj, dict):
            self.objects += 1
            if isinstance(obj.get(self.f.source.text_field), str):
                self.with_text += 1
            elif self.objects <= 1000:  # enough to name the fields a file has
                self.fields.update(obj.keys())

    def finish(self) -> None:
        if self.objects and not self.with_text:
            raise text_field_error(self.f, sorted(self.fields))


def text_field_error(f: InputFile, fields: list[str]) -> InputError:
    return InputError(
        f"{f.url}: no record has the text field '{f.source.text_field}' (source '{f.source.name}', "
        f"sources[].text_field); the records have the fields {fields}: set text_field to the one holding the text"
    )


def read_jsonl_file(f: InputFile) -> Iterator[Record]:
    check = TextFieldCheck(f)
    with fsspec.open(f.url, "rb", compression="infer") as fh:
        for line_no, raw in enumerate(fh):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield None, "invalid_utf8"
                continue
            except json.JSONDecodeError:
                yield None, "bad_json"
                continue
            check.see(obj)
            yield _record_from_object(obj, f, line_no)
    check.finish()


def read_parquet_file(f: InputFile) -> Iterator[Record]:
    with fsspec.open(f.url, "rb") as fh:
        parquet = pq.ParquetFile(fh)
        if parquet.metadata.num_rows and f.source.text_field not in parquet.schema_arrow.names:
            raise text_field_error(f, parquet.schema_arrow.names)
        row = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for obj in batch.to_pylist():
                yield _record_from_object(obj, f, row)
                row += 1


READERS = {"text": read_text_file, "jsonl": read_jsonl_file, "parquet": read_parquet_file}


def read_file(f: InputFile) -> Iterator[Record]:
    """Records of one file; an unreadable file (truncated archive, bad Parquet) counts once and ends."""
    reader = READERS[file_format(f.source, f.url)]
    try:
        yield from reader(f)
    except InputError:
        raise  # the configuration is wrong, not the file: stop with the message
    except (OSError, EOFError, ValueError) as exc:  # ArrowInvalid and gzip errors are ValueError/OSError
        log.warning("ingest: skipping the rest of %s: %s", f.url, exc)
        yield None, "unreadable_file"


def check_length(doc: dict[str, Any], cfg: IngestConfig) -> str | None:
    if looks_binary(doc["text"]):
        return "binary"
    if not doc["text"].strip():
        return "empty"
    if len(doc["text"]) < cfg.min_doc_chars:
        return "too_short"
    if len(doc["text"]) > cfg.max_doc_chars:
        return "too_long"
    return None


# ---------------------------------------------------------------- the stage


def ingest_partition(cfg: IngestConfig, parts: list[list[InputFile]], out: StageDir, index: int) -> dict[str, Any]:
    """Read partition `index`, write its shard and marker; returns its counts."""
    rows, skipped, by_source = [], Counter(), Counter()
    seen = 0
    for f in parts[index]:
        before = seen
        for doc, reason in read_file(f):
            seen += 1
            reason = reason or check_length(doc, cfg)
            if reason:
                skipped[reason] += 1
                continue
            doc["source"] = f.source.name
            rows.append(doc)
            by_source[f.source.name] += 1
        if seen == before:
            log.warning("ingest: %s holds no records", f.url)
            skipped["empty_file"] += 1
    counts = {"docs_in": seen, "skipped": dict(skipped), "by_source": dict(by_source)}
    out.write_table(shard_name(index), docs_table(rows), counts=counts)
    return counts


def run_ingest(cfg: IngestConfig, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> IngestStats:
    files = list_inputs(cfg)
    parts = partition(files, cfg.target_shard_bytes)
    map_pending(partial(ingest_partition, cfg, parts, out), len(parts), shard_name, out, compute, "partitions")
    totals = Counter()
    skipped, by_source = Counter(), Counter()
    for i in range(len(parts)):
        marker = out.marker(shard_name(i))
        totals["docs_in"] += marker["counts"]["docs_in"]
        totals["docs_out"] += marker["rows"]
        skipped.update(marker["counts"]["skipped"])
        by_source.update(marker["counts"]["by_source"])
    if skipped:
        log.info("ingest skipped %s", dict(skipped))
    # no sources at all is a WARC-only pipeline, not a mistake
    warnings = empty_output_warning("ingest", len(files), totals["docs_out"], skipped) if cfg.sources else []
    for warning in warnings:
        log.warning(warning)
    return IngestStats(
        files=len(files),
        shards=len(parts),
        docs_in=totals["docs_in"],
        docs_out=totals["docs_out"],
        skipped=dict(sorted(skipped.items())),
        docs_by_source=dict(sorted(by_source.items())),
        warnings=warnings,
    )
