"""Reading WARC records for `ingest_warc` (tasks/acquire/ingest_warc.py): one row or one skip reason each.

    for row, reason, record_type in iter_records(open("x.warc.gz", "rb"), IngestWarcConfig(), "warc", "x.warc.gz"):
        ...

Records are read with FastWARC (several times faster than warcio); HTTP bodies are decoded as
warcio does, falling back to the bytes as sent. A record is only ingested whole:

- truncated_record: the file holds fewer bytes than the record's Content-Length (an interrupted
  download cut it), found by counting what is read, digest or not;
- corrupt_record: its WARC-Block-Digest or WARC-Payload-Digest does not match its bytes (the
  payload digest is all an Internet Archive WARC carries), or bytes that are not a WARC record:
  reading resumes at the next record boundary found in the file;
- binary_payload: a payload labelled as a page that is not text (NUL or control bytes).

A row's id is derived from its content (URL and payload), never from the random WARC-Record-ID,
so the same fetched pages give the same ids in every crawl and every store.
"""
from __future__ import annotations

import base64
import hashlib
import io
import logging
import zlib
from typing import Iterator

import brotli
from fastwarc.warc import ArchiveIterator, WarcRecord
from warcio.bufferedreaders import BufferedReader, ChunkedDataReader

from lmfoundry.infra.config import IngestWarcConfig
from lmfoundry.tasks.acquire.checks import looks_binary

log = logging.getLogger("lmfoundry.ingest_warc")

# everything a damaged file can raise while records are parsed or payloads decoded
CORRUPTION_ERRORS = (EOFError, OSError, ValueError, zlib.error, brotli.error, IndexError, KeyError)
# Content-Encodings undone by warcio's decoders: they fall back to the bytes as sent when a server
# mislabels its body, where FastWARC's own decoder raises and cannot read the rest of the file
WARCIO_DECODINGS = ("gzip", "x-gzip", "deflate")
# checking a record's digests holds its whole block in memory; larger records (video, disk
# images) go unchecked, which also bounds what a damaged Content-Length can make us buffer
DIGEST_CHECK_MAX_BYTES = 64 * 2**20
DIGEST_SIZES = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}


def content_id(url: str, payload: bytes) -> str:
    """A row id from what was fetched: the URL and a hash of the payload as stored."""
    digest = hashlib.sha1(payload).hexdigest()
    return hashlib.sha1(f"{url}\x00{digest}".encode()).hexdigest()[:20]


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


def decode_body(stream, http, limit: int) -> bytes:
    """At most `limit` bytes of an HTTP body read from `stream`, chunking and Content-Encoding undone."""
    encoding = (http.get("Content-Encoding") or "").lower()
    decoding = encoding if encoding in WARCIO_DECODINGS else None
    if http.get("Transfer-Encoding") == "chunked":
        body = ChunkedDataReader(stream, decomp_type=decoding)
    elif decoding:
        body = BufferedReader(stream, decomp_type=decoding)
    else:
        body = stream
    if encoding == "br":
        return unbrotli(body.read(), limit)[:limit]
    return body.read(limit)


# ---------------------------------------------------------------- digests and completeness


def parse_digest(header: str) -> tuple[str, bytes] | None:
    """A WARC digest ('sha1:VALUE', VALUE in base32, hex or base64, any case) as (algorithm, raw
    bytes); None when the algorithm or the encoding is unknown: such a record goes unchecked
    rather than dropped as corrupt."""
    algorithm, _, value = header.strip().partition(":")
    size = DIGEST_SIZES.get(algorithm.lower())
    decoders = (bytes.fromhex, lambda v: base64.b32decode(v.upper() + "=" * (-len(v) % 8)), base64.b64decode)
    for decode in decoders if size else ():
        try:
            raw = decode(value)
        except ValueError:  # binascii.Error is a ValueError
            continue
        if len(raw) == size:
            return algorithm.lower(), raw
    return None


def canonical_digest(header: str) -> str | None:
    """A WARC digest in the form FastWARC checks: the algorithm in lower case, the value in upper-case base32."""
    parsed = parse_digest(header)
    return f"{parsed[0]}:{base64.b32encode(parsed[1]).decode()}" if parsed else None


def block_problem(record: WarcRecord) -> str | None:
    """Before the HTTP headers are read: 'truncated_record' when the file holds less than the
    record's Content-Length, 'corrupt_record' when its WARC-Block-Digest does not match, else None."""
    declared = record.headers.get("Content-Length") or ""
    # Content-Length is mandatory: without it the header block itself was cut
    if not declared.isdigit() or record.content_length < int(declared):
        return "truncated_record"
    digest = canonical_digest(record.headers.get("WARC-Block-Digest") or "")
    if digest is None or record.content_length > DIGEST_CHECK_MAX_BYTES:
        return None
    record.headers["WARC-Block-Digest"] = digest
    if record.verify_block_digest():  # buffers the block and rewinds, so it can still be parsed
        return None
    # the failed check left the bytes it found buffered (and content_length set to their count)
    return "truncated_record" if record.reader.consume() < int(declared) else "corrupt_record"


def payload_digest_ok(header: str | None, raw: bytes, chunked: bool) -> bool:
    """Whether the payload as stored (or, for a chunked body, without its chunking: writers differ)
    matches WARC-Payload-Digest; True when there is none we can read."""
    parsed = parse_digest(header or "")
    if parsed is None:
        return True
    algorithm, expected = parsed
    if hashlib.new(algorithm, raw).digest() == expected:
        return True
    return chunked and hashlib.new(algorithm, ChunkedDataReader(io.BytesIO(raw)).read()).digest() == expected


def http_payload(record: WarcRecord, limit: int) -> tuple[bytes | None, str | None]:
    """(At most `limit` decoded body bytes, None) or (None, skip reason) for a parsed HTTP record.

    A body up to DIGEST_CHECK_MAX_BYTES is read whole, counted against the Content-Length and
    checked against the payload digest; a longer one is decoded as it streams, then counted."""
    http, expected = record.http_headers, record.content_length
    if expected <= DIGEST_CHECK_MAX_BYTES:
        raw = record.reader.read()
        if len(raw) < expected:
            return None, "truncated_record"
        if not payload_digest_ok(record.headers.get("WARC-Payload-Digest"), raw, http.get("Transfer-Encoding") == "chunked"):
            return None, "corrupt_record"
        return decode_body(io.BytesIO(raw), http, limit), None
    body = decode_body(record.reader, http, limit)
    record.reader.consume()
    return (body, None) if record.reader.tell() >= expected else (None, "truncated_record")


def read_all(record: WarcRecord, limit: int) -> tuple[bytes | None, str | None]:
    """(At most `limit` bytes of a record's block, None), or (None, 'truncated_record')."""
    data = record.reader.read(limit)
    record.reader.consume()
    return (data, None) if record.reader.tell() >= record.content_length else (None, "truncated_record")


# ---------------------------------------------------------------- one record


def parse_record(record: WarcRecord, cfg: IngestWarcConfig, source: str, warc_file: str) -> tuple[dict | None, str | None]:
    """One WARC record -> (row, None) or (None, skip reason)."""
    headers = record.headers
    rec_type = headers.get("WARC-Type")
    cap = cfg.max_payload_bytes
    if rec_type == "revisit":
        return None, "revisit"
    problem = block_problem(record)
    if problem:
        return None, problem
    if rec_type == "conversion":
        content_type, charset = media_type(headers.get("Content-Type") or "text/plain")
        status, kind = 0, "text"
        payload, problem = read_all(record, cap + 1)
    else:
        record.parse_http()  # a no-op for a record that holds no HTTP message (dns: ...)
        status = record.http_headers.status_code if record.http_headers is not None else None
        if not status or not 100 <= status <= 599:
            # a dns: record holds no HTTP message; a response cut inside its HTTP headers neither
            return None, "truncated_record" if record.reader.consume() < record.content_length else "no_http_headers"
        if status != 200:
            return None, f"http_{status // 100}xx"
        content_type, charset = media_type(record.http_headers.get("Content-Type"))
        kind = "html"
        payload, problem = http_payload(record, cap + 1)
    if problem:
        return None, problem
    payload, cut = payload[:cap], len(payload) > cap
    if not payload.strip():
        return None, "empty_payload"
    if kind == "html":
        if not content_type and looks_like_html(payload):
            content_type = "text/html"
        if content_type not in cfg.content_types:
            return None, "non_html"
    if looks_binary(payload):
        return None, "binary_payload"
    url = headers.get("WARC-Target-URI") or ""
    return {
        "id": content_id(url, payload),
        "url": url,
        "fetch_date": headers.get("WARC-Date") or "",
        "warc_record_id": headers.get("WARC-Record-ID") or "",
        "content_type": content_type,
        "charset": charset,
        "http_status": status,
        "payload_kind": kind,
        "payload": payload,
        "truncated": cut or bool(headers.get("WARC-Truncated")),
        "source": source,
        "warc_file": warc_file,
    }, None


# ---------------------------------------------------------------- a whole file, damage included


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


def gzip_member_end(fh, start: int) -> int:
    """Offset just past the gzip member that starts at `start` (the end of the file if it is cut)."""
    fh.seek(start)
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    pos = start
    while not inflate.eof:
        chunk = fh.read(1 << 16)
        if not chunk:
            break
        pos += len(chunk)
        while chunk and not inflate.eof:
            inflate.decompress(chunk, 1 << 20)  # output discarded, and bounded: a member can inflate a lot
            chunk = inflate.unconsumed_tail
    return pos - len(inflate.unused_data)


def unread_tail(fh, last: tuple[int, str | None] | None, resume_at: int, gzipped: bool) -> bool:
    """Whether bytes follow the last whole record that FastWARC ended on quietly: a record cut
    inside its first bytes (the gzip header, the first header lines) looks like the end of the file."""
    if last is None:
        end = resume_at
    elif gzipped:
        end = gzip_member_end(fh, last[0])
    else:
        end = record_end(fh, *last, gzipped)
    fh.seek(end)
    return bool(fh.read(1 << 16).strip())


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
        reason = None
        try:
            for record in ArchiveIterator(fh, parse_http=False):
                rec_type = record.headers.get("WARC-Type") or ""
                last = (resume_at + record.stream_pos, record.headers.get("Content-Length"))
                try:
                    if not (last[1] or "").isdigit():  # mandatory: the header block was cut before it
                        row, reason = None, "truncated_record"
                    elif rec_type in ("response", "conversion", "revisit"):
                        row, reason = parse_record(record, cfg, source, warc_file)
                    else:  # counted in other_records, unless the header block was cut before WARC-Type
                        row, reason = None, None if rec_type else "corrupt_record"
                except CORRUPTION_ERRORS as exc:
                    log.debug("corrupt record in %s: %s", warc_file, exc)
                    row, reason = None, "corrupt_record"
                yield row, reason, rec_type
            if reason not in ("truncated_record", "corrupt_record") and unread_tail(fh, last, resume_at, gzipped):
                log.warning("ingest_warc: %s ends inside a record (a download cut short?)", warc_file)
                yield None, "truncated_record", "response"
            return
        except CORRUPTION_ERRORS as exc:
            log.warning("ingest_warc: damaged data in %s after offset %d (%s); skipping to the next record", warc_file, last[0] if last else resume_at, (str(exc) or type(exc).__name__).splitlines()[0][:200])
            yield None, "corrupt_record", "response"
            # strictly past where this pass began, so every pass moves forward and reading ends
            skip_to = resume_at if last is None else max(resume_at, record_end(fh, *last, gzipped))
            resume_at = next_record_start(fh, skip_to + 1, gzipped)
