"""Stage `ingest_warc`: WARC and WET files -> record shards, one row per page.

Inputs are the WARC files of every `crawl` input (``warc/*.warc.gz``) and every file matching
``ingest_warc.paths``: local paths, globs or any fsspec URL (``s3://bucket/crawl/*.warc.gz``,
``https://data.commoncrawl.org/crawl-data/...warc.gz``), gzip-per-record or uncompressed,
WARC (HTTP ``response`` records) or WET (``conversion`` records holding extracted text).
Each input file is one unit of work, read as a stream (never whole into memory).

Output, read by ``extract``: ``files/part-FFFFF.json`` per input file F (its counts and the
list of its chunks; written last, so it marks the file complete) and the chunks
``records/part-FFFFF-CCCCC.parquet``, each holding about ``chunk_bytes`` of payload, with
columns:

    id              string  stable id: hash of the WARC-Record-ID
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
non_html, no_http_headers (e.g. dns: records), empty_payload, corrupt_record (a digest
mismatch, a truncated gzip member, garbage bytes: reading resumes at the next record
boundary found in the file) and unreadable_file. Request, warcinfo and metadata records
are counted in ``other_records``. Records are read with FastWARC (several times faster than
warcio); HTTP bodies are decoded as warcio does, falling back to the bytes as sent.

Run alone: ``lmf run --until ingest_warc --set 'ingest_warc.paths=["data/*.warc.gz"]'``.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import posixpath
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import brotli
import fsspec
import pyarrow as pa
from fastwarc.warc import ArchiveIterator, WarcRecord
from pydantic import BaseModel
from warcio.bufferedreaders import BufferedReader, ChunkedDataReader

from lmfoundry.infra.config import ComputeConfig, IngestWarcConfig
from lmfoundry.infra.files import InputError, match_files
from lmfoundry.infra.parallel import map_pending
from lmfoundry.infra.store import StageDir, StageRef, StageReader

CODE_VERSION = "2"  # 2: FastWARC reader; a record cut off at the end of a file is corrupt, br bodies decoded
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
# everything a damaged file can raise while records are parsed or payloads decoded
CORRUPTION_ERRORS = (EOFError, OSError, ValueError, zlib.error, brotli.error, IndexError, KeyError)
# Content-Encodings undone by warcio's decoders: they fall back to the bytes as sent when a server
# mislabels its body, where FastWARC's own decoder raises and cannot read the rest of the file
WARCIO_DECODINGS = ("gzip", "x-gzip", "deflate")
# checking a record's digest holds its whole block in memory; larger records (video, disk
# images) go unchecked, which also bounds what a damaged Content-Length can make us buffer
DIGEST_CHECK_MAX_BYTES = 64 * 2**20
DIGEST_SIZES = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}


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


# ---------------------------------------------------------------- inputs


def file_name(index: int) -> str:
    return f"{FILES_PREFIX}part-{index:05d}.json"


def chunk_name(index: int, chunk: int) -> str:
    return f"{RECORDS_PREFIX}part-{index:05d}-{chunk:05d}.parquet"


def list_configured(cfg: IngestWarcConfig) -> list[WarcInput]:
    """Every file that ingest_warc.paths names, sorted; a path matching nothing is an error."""
    found: dict[str, WarcInput] = {}
    for i, raw in enumerate(cfg.paths):
        files = match_files(raw, cfg.storage_options, dir_suffixes=WARC_SUFFIXES)
        if not files:
            raise InputError(
                f"ingest_warc.paths[{i}] '{raw}' matched no files; check the path exists and is readable "
                "(for s3:// set ingest_warc.storage_options), or remove it from the config"
            )
        for f in files:
            found[f.url] = WarcInput(f.url, in_store=False, source=cfg.source, stamp=f"{f.size}:{f.stamp}")
    return [found[k] for k in sorted(found)]


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


# ---------------------------------------------------------------- reading records


def record_id(warc_record_id: str, url: str, date: str) -> str:
    key = warc_record_id or f"{url}\x00{date}"
    return hashlib.sha1(key.encode()).hexdigest()[:20]


def media_type(content_type: str | None) -> tuple[str, str]:
    """'text/html; charset=UTF-8' -> ('text/html', 'utf-8')."""
    if not content_type:
        return "", ""
    parts = [p.strip() for p in content_type.split(";")]
    charset = next((p.split("=", 1)[1].strip().strip("\"'").lower() for p in parts[1:] if p.lower().startswith("charset=")), "")
    return parts[0].lower(), charset


def looks_like_html(payload: bytes) -> bool:
    head = payload[:1024].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html")) or b"<html" in head


def unbrotli(body: bytes, limit: int) -> bytes:
    """At least `limit` bytes of a brotli body if it has that many (warcio's brotli decoder fails with brotli >= 1.2)."""
    try:
        return brotli.Decompressor().process(body, output_buffer_limit=limit)
    except brotli.error:  # not brotli after all: the body as sent, as the other decoders do
        return body


def http_body(record: WarcRecord, limit: int) -> bytes:
    """At most `limit` bytes of the HTTP body with chunking and Content-Encoding undone."""
    http = record.http_headers
    encoding = (http.get("Content-Encoding") or "").lower()
    decoding = encoding if encoding in WARCIO_DECODINGS else None
    if http.get("Transfer-Encoding") == "chunked":
        body = ChunkedDataReader(record.reader, decomp_type=decoding)
    elif decoding:
        body = BufferedReader(record.reader, decomp_type=decoding)
    else:
        body = record.reader
    if encoding == "br":
        return unbrotli(body.read(), limit)[:limit]
    return body.read(limit)


def canonical_digest(header: str) -> str | None:
    """A WARC digest ('sha1:VALUE', VALUE in base32, hex or base64, any case) in the form FastWARC
    checks: the algorithm in lower case, the value in upper-case base32. None when the algorithm
    or the encoding is unknown: such a record goes unchecked rather than dropped as corrupt."""
    algorithm, _, value = header.strip().partition(":")
    size = DIGEST_SIZES.get(algorithm.lower())
    decoders = (bytes.fromhex, lambda v: base64.b32decode(v.upper() + "=" * (-len(v) % 8)), base64.b64decode)
    for decode in decoders if size else ():
        try:
            raw = decode(value)
        except ValueError:  # binascii.Error is a ValueError
            continue
        if len(raw) == size:
            return f"{algorithm.lower()}:{base64.b32encode(raw).decode()}"
    return None


def digest_matches(record: WarcRecord) -> bool:
    """False when the record's WARC-Block-Digest does not match its bytes: the record is damaged.

    A record without a digest, or with one we cannot read, passes. The check must run before
    the HTTP headers are parsed, as it hashes the whole block.
    """
    digest = canonical_digest(record.headers.get("WARC-Block-Digest") or "")
    if digest is None or record.content_length > DIGEST_CHECK_MAX_BYTES:
        return True
    record.headers["WARC-Block-Digest"] = digest
    return record.verify_block_digest()


def parse_record(record: WarcRecord, cfg: IngestWarcConfig, source: str, warc_file: str) -> tuple[dict | None, str | None]:
    """One WARC record -> (row, None) or (None, skip reason)."""
    headers = record.headers
    rec_type = headers.get("WARC-Type")
    cap = cfg.max_payload_bytes
    if rec_type == "revisit":
        return None, "revisit"
    if not digest_matches(record):
        return None, "corrupt_record"
    if rec_type == "conversion":
        content_type, charset = media_type(headers.get("Content-Type") or "text/plain")
        status, kind = 0, "text"
        payload = record.reader.read(cap + 1)
    else:
        record.parse_http()  # a no-op for a record that holds no HTTP message (dns: ...)
        if record.http_headers is None or not record.http_headers.status_code:
            return None, "no_http_headers"
        status = record.http_headers.status_code
        if status != 200:
            return None, f"http_{status // 100}xx"
        content_type, charset = media_type(record.http_headers.get("Content-Type"))
        kind = "html"
        payload = http_body(record, cap + 1)
    payload, cut = payload[:cap], len(payload) > cap
    if not payload.strip():
        return None, "empty_payload"
    if kind == "html":
        if not content_type and looks_like_html(payload):
            content_type = "text/html"
        if content_type not in cfg.content_types:
            return None, "non_html"
    url = headers.get("WARC-Target-URI") or ""
    date = headers.get("WARC-Date") or ""
    warc_id = headers.get("WARC-Record-ID") or ""
    return {
        "id": record_id(warc_id, url, date),
        "url": url,
        "fetch_date": date,
        "warc_record_id": warc_id,
        "content_type": content_type,
        "charset": charset,
        "http_status": status,
        "payload_kind": kind,
        "payload": payload,
        "truncated": cut or bool(headers.get("WARC-Truncated")),
        "source": source,
        "warc_file": warc_file,
    }, None


def next_record_start(fh, start: int, gzipped: bool, block: int = 1 << 20) -> int | None:
    """Offset of the first WARC record that begins after `start`, or None at end of file.

    A gzipped WARC holds one gzip member per record, so a member whose first bytes inflate
    to 'WARC/' is a record boundary; an uncompressed one has 'WARC/1.' at a line start.
    """
    marker = b"\x1f\x8b\x08" if gzipped else b"\nWARC/1."
    pos = start
    while True:
        fh.seek(pos)
        data = fh.read(block + 4096)
        if not data:
            return None
        hit = data.find(marker)
        while hit != -1 and hit < block:
            if not gzipped:
                return pos + hit + 1
            try:
                if zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[hit : hit + 4096], 16).startswith(b"WARC/"):
                    return pos + hit
            except zlib.error:
                pass
            hit = data.find(marker, hit + 1)
        if len(data) <= block:
            return None
        pos += block


def record_end(fh, start: int, content_length: str | None, gzipped: bool) -> int:
    """How far the record read at `start` surely reaches; the next record begins after it.

    In a gzipped file the next record is a later gzip member, and a member's compressed size
    is not known. In a plain one it follows the header block and Content-Length bytes, so a
    payload line that starts with 'WARC/1.' (a page about WARC files) is not taken for a record.
    """
    if gzipped:
        return start
    fh.seek(start)
    header_end = fh.read(1 << 16).find(b"\r\n\r\n")
    try:
        return start + header_end + 4 + int(content_length or "") if header_end != -1 else start
    except ValueError:
        return start


def iter_records(fh, cfg: IngestWarcConfig, source: str, warc_file: str) -> Iterator[tuple[dict | None, str | None, str]]:
    """(row, skip reason, record type) for every record; a damaged stretch is skipped and counted.

    FastWARC raises OSError at damage (a cut gzip member, bytes that are not a WARC header)
    and its iterator reads nothing more, so reading resumes with a new one at the next record
    boundary past the last record read: one bad record costs that record, not the rest of the file.
    """
    fh.seek(0)
    gzipped = fh.read(2) == b"\x1f\x8b"
    resume_at: int | None = 0
    while resume_at is not None:
        fh.seek(resume_at)
        last = None  # (offset, Content-Length) of the last record read in this pass
        try:
            for record in ArchiveIterator(fh, parse_http=False):
                rec_type = record.headers.get("WARC-Type") or ""
                last = (resume_at + record.stream_pos, record.headers.get("Content-Length"))
                try:
                    if rec_type in ("response", "conversion", "revisit"):
                        row, reason = parse_record(record, cfg, source, warc_file)
                    else:  # counted in other_records, unless the header block was cut before WARC-Type
                        row, reason = None, None if rec_type else "corrupt_record"
                except CORRUPTION_ERRORS as exc:
                    log.debug("corrupt record in %s: %s", warc_file, exc)
                    row, reason = None, "corrupt_record"
                yield row, reason, rec_type
            return
        except CORRUPTION_ERRORS as exc:
            log.warning("ingest_warc: damaged data in %s after offset %d (%s); skipping to the next record", warc_file, last[0] if last else resume_at, (str(exc) or type(exc).__name__).splitlines()[0][:200])
            yield None, "corrupt_record", "response"
            # strictly past where this pass began, so every pass moves forward and reading ends
            skip_to = resume_at if last is None else max(resume_at, record_end(fh, *last, gzipped))
            resume_at = next_record_start(fh, skip_to + 1, gzipped)


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
    )
