"""Stage `ingest_warc`: WARC and WET files -> record shards, one row per page.

Inputs are the WARC files of every `crawl` input (``warc/*.warc.gz``) and every file matching
``ingest_warc.paths``: local paths, globs or any fsspec URL (``s3://bucket/crawl/*.warc.gz``,
``https://data.commoncrawl.org/crawl-data/...warc.gz``), gzip-per-record or uncompressed,
WARC (HTTP ``response`` records) or WET (``conversion`` records holding extracted text).
Each input file is one unit of work, read as a stream (never whole into memory), in the order
given: the crawl's files, then ``paths`` in the order they are listed (a glob's or directory's
files sorted), so "keep the first occurrence" downstream keeps what the user listed first.

Output, read by ``extract``: ``files/part-FFFFF.json`` per input file F (its counts and the
list of its chunks; written last, so it marks the file complete) and the chunks
``records/part-FFFFF-CCCCC.parquet``, each holding about ``chunk_bytes`` of payload, with
columns:

    id              string  content-derived id: hash of the URL and the payload (tasks/acquire/warc_records.py)
    url             string  WARC-Target-URI
    fetch_date      string  WARC-Date (ISO 8601, as written by the crawler)
    warc_record_id  string  WARC-Record-ID
    content_type    string  media type of the payload: text/html ... (text/plain for WET)
    charset         string  charset named by the HTTP Content-Type header, "" if none
    http_status     int32   HTTP status (0 for WET conversion records)
    payload_kind    string  "html" (an HTTP response body) or "text" (a WET record)
    payload         binary  the body after chunked/gzip/br decoding, at most max_payload_bytes
    truncated       bool    cut by the crawler (WARC-Truncated) or at max_payload_bytes
    source          string  "crawl" for crawl inputs, ingest_warc.source for configured paths
    warc_file       string  the input file

Records are not documents, so they live under ``records/`` rather than ``data/``: a stage
that reads document shards can never mistake them for text. Skipped and counted, never
fatal: revisit (an unchanged page a re-crawl did not store again), http_3xx/4xx/5xx,
non_html, no_http_headers (e.g. dns: records), empty_payload, binary_payload,
truncated_record (fewer bytes than its Content-Length: an interrupted download),
corrupt_record (a block or payload digest mismatch, garbage bytes: reading resumes at the
next record boundary found in the file), unreadable_file and empty_file. Request, warcinfo
and metadata records are counted in ``other_records``. How records are read and checked:
tasks/acquire/warc_records.py. A run that ingests no record at all still commits, with a
warning in the log and in ``warnings``.

Run alone: ``lmf run --until ingest_warc --set 'ingest_warc.paths=["data/*.warc.gz"]'``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any

import fsspec
import pyarrow as pa
from pydantic import BaseModel

from lmfoundry.infra.config import ComputeConfig, IngestWarcConfig
from lmfoundry.infra.files import InputError, match_files
from lmfoundry.infra.parallel import map_pending
from lmfoundry.infra.store import StageDir, StageRef, StageReader
from lmfoundry.tasks.acquire.checks import empty_output_warning
from lmfoundry.tasks.acquire.warc_records import iter_records  # noqa: F401 (also read by bench/extract.py)

CODE_VERSION = "3"  # 3: content-derived ids, records counted against Content-Length and payload digests, paths in the order given
log = logging.getLogger("lmfoundry.ingest_warc")

RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("url", pa.string()),
        ("fetch_date", pa.string()),
        ("warc_record_id", pa.string()),
        ("content_type", pa.string()),
        ("charset", pa.string()),
        ("http_status", pa.int32()),
        ("payload_kind", pa.string()),
        ("payload", pa.binary()),
        ("truncated", pa.bool_()),
        ("source", pa.string()),
        ("warc_file", pa.string()),
    ]
)
RECORDS_PREFIX = "records/"
FILES_PREFIX = "files/"
CRAWL_SOURCE = "crawl"
WARC_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz")  # the legacy ARC format is not read


@dataclass(frozen=True)
class WarcInput:
    location: str  # a path inside the stage store, or an fsspec URL
    in_store: bool  # True: open through the store's filesystem (a crawl's WARC file)
    source: str
    stamp: str = ""  # size and mtime/ETag of a configured file: changes when the file does


class IngestWarcStats(BaseModel):
    files: int
    chunks: int
    records_in: int
    records_out: int
    payload_bytes: int
    truncated: int
    skipped: dict[str, int]
    other_records: dict[str, int]
    records_by_source: dict[str, int]
    warnings: list[str] = []  # e.g. nothing ingested at all


# ---------------------------------------------------------------- inputs


def file_name(index: int) -> str:
    return f"{FILES_PREFIX}part-{index:05d}.json"


def chunk_name(index: int, chunk: int) -> str:
    return f"{RECORDS_PREFIX}part-{index:05d}-{chunk:05d}.parquet"


def list_configured(cfg: IngestWarcConfig) -> list[WarcInput]:
    """Every file that ingest_warc.paths names, in the order of the paths (each path's own files
    sorted; a file named twice counts where it first appears); a path matching nothing is an error."""
    found: dict[str, WarcInput] = {}
    for i, raw in enumerate(cfg.paths):
        files = match_files(raw, cfg.storage_options, dir_suffixes=WARC_SUFFIXES)
        if not files:
            raise InputError(
                f"ingest_warc.paths[{i}] '{raw}' matched no files; check the path exists and is readable "
                "(for s3:// set ingest_warc.storage_options), or remove it from the config"
            )
        for f in files:
            found.setdefault(f.url, WarcInput(f.url, in_store=False, source=cfg.source, stamp=f"{f.size}:{f.stamp}"))
    return list(found.values())


def list_inputs(cfg: IngestWarcConfig, inputs: list[StageRef], out: StageDir) -> list[WarcInput]:
    """The crawl inputs' WARC files (in input order) followed by the configured files."""
    items = []
    for ref in inputs:
        reader = out.store.reader(ref)
        for relpath in reader.files("warc/"):
            if relpath.endswith(WARC_SUFFIXES):
                items.append(WarcInput(posixpath.join(reader.path, relpath), in_store=True, source=CRAWL_SOURCE))
    return items + list_configured(cfg)


def input_fingerprint(cfg: IngestWarcConfig) -> str:
    """Changes when a configured file is added, removed or modified (crawl inputs are stage refs)."""
    if not cfg.paths:
        return ""
    lines = [f"{f.location}\t{f.stamp}" for f in list_configured(cfg)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def open_input(item: WarcInput, cfg: IngestWarcConfig, out: StageDir):
    if item.in_store:
        return out.store.fs.open(item.location, "rb")
    return fsspec.open(item.location, "rb", **cfg.storage_options).open()


# ---------------------------------------------------------------- the stage


def records_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def ingest_file(cfg: IngestWarcConfig, items: list[WarcInput], out: StageDir, index: int) -> dict[str, Any]:
    """Read input file `index`; write its chunks, then its file marker with counts."""
    item = items[index]
    name = item.location if not item.in_store else posixpath.relpath(item.location, out.store.root)
    skipped, other = Counter(), Counter()
    chunks: list[str] = []
    rows: list[dict] = []
    counts = Counter()

    def flush() -> None:
        if rows:
            chunks.append(chunk_name(index, len(chunks)))
            out.write_table(chunks[-1], records_table(rows))
            rows.clear()
            counts["pending_bytes"] = 0

    try:
        with open_input(item, cfg, out) as fh:
            for row, reason, rec_type in iter_records(fh, cfg, item.source, name):
                if row is None and reason is None:
                    other[rec_type] += 1
                    continue
                counts["records_in"] += 1
                if reason:
                    skipped[reason] += 1
                    continue
                rows.append(row)
                counts["records_out"] += 1
                counts["payload_bytes"] += len(row["payload"])
                counts["truncated"] += row["truncated"]
                counts["pending_bytes"] += len(row["payload"])
                if counts["pending_bytes"] >= cfg.chunk_bytes:
                    flush()
    except (OSError, EOFError) as exc:  # the file cannot be opened or read at all
        log.warning("ingest_warc: cannot read %s: %s", name, exc)
        skipped["unreadable_file"] += 1
    if not counts["records_in"] and not other and not skipped:
        log.warning("ingest_warc: %s holds no WARC records", name)
        skipped["empty_file"] += 1
    flush()
    counts.pop("pending_bytes", None)
    marker = {"file": name, "source": item.source, "chunks": chunks, "skipped": dict(skipped), "other_records": dict(other), **counts}
    out.write_json(file_name(index), marker)
    return marker


def record_chunks(reader: StageReader) -> list[str]:
    """The record chunks of a committed ingest_warc version, in input-file order."""
    chunks = []
    for relpath in reader.files(FILES_PREFIX, ".json"):
        chunks.extend(reader.read_json(relpath)["chunks"])
    return chunks


def run_ingest_warc(cfg: IngestWarcConfig, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> IngestWarcStats:
    items = list_inputs(cfg, inputs, out)
    map_pending(partial(ingest_file, cfg, items, out), len(items), file_name, out, compute, "files")
    totals, skipped, other, by_source = Counter(), Counter(), Counter(), Counter()
    chunks = 0
    for i in range(len(items)):
        marker = json.loads(out.read_bytes(file_name(i)))
        for key in ("records_in", "records_out", "payload_bytes", "truncated"):
            totals[key] += marker.get(key, 0)
        skipped.update(marker["skipped"])
        other.update(marker["other_records"])
        by_source[marker["source"]] += marker.get("records_out", 0)
        chunks += len(marker["chunks"])
    if skipped:
        log.info("ingest_warc skipped %s", dict(skipped))
    warnings = empty_output_warning("ingest_warc", len(items), totals["records_out"], skipped)
    for warning in warnings:
        log.warning(warning)
    return IngestWarcStats(
        files=len(items),
        chunks=chunks,
        records_in=totals["records_in"],
        records_out=totals["records_out"],
        payload_bytes=totals["payload_bytes"],
        truncated=totals["truncated"],
        skipped=dict(sorted(skipped.items())),
        other_records=dict(sorted(other.items())),
        records_by_source=dict(sorted(by_source.items())),
        warnings=warnings,
    )
