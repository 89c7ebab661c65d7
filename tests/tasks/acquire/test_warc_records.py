"""Reading WARC records (tasks/acquire/warc_records.py): records cut short, digests, binary payloads, ids.

Archives are written byte by byte here (no writer library), so each test controls exactly which
digests a record carries: Internet Archive WARCs carry only a payload digest, some none at all.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import uuid
from collections import Counter

import pytest

from lmfoundry.infra.config import IngestWarcConfig
from lmfoundry.tasks.acquire.warc_records import iter_records
from tests.tasks.acquire.test_ingest_warc import page

CUT_REASONS = {"truncated_record", "corrupt_record"}


def b32sha1(data: bytes) -> str:
    return "sha1:" + base64.b32encode(hashlib.sha1(data).digest()).decode()


def response(url: str, body: bytes, n: int = 0, digests: tuple[str, ...] = ("payload",), compress: bool = True,
             http_headers: str = "Content-Type: text/html", payload_digest: str | None = None) -> bytes:
    """One response record; `digests` names which of WARC-Payload-Digest / WARC-Block-Digest it carries."""
    block = f"HTTP/1.1 200 OK\r\n{http_headers}\r\n\r\n".encode() + body
    headers = (
        f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: {url}\r\nWARC-Date: 2024-05-01T12:00:00Z\r\n"
        f"WARC-Record-ID: <urn:uuid:{uuid.UUID(int=n)}>\r\nContent-Type: application/http; msgtype=response\r\n"
    )
    if "payload" in digests:
        headers += f"WARC-Payload-Digest: {payload_digest or b32sha1(body)}\r\n"
    if "block" in digests:
        headers += f"WARC-Block-Digest: {b32sha1(block)}\r\n"
    record = (headers + f"Content-Length: {len(block)}\r\n\r\n").encode() + block + b"\r\n\r\n"
    return gzip.compress(record, mtime=0) if compress else record


def read(data: bytes) -> tuple[dict[str, dict], Counter]:
    rows, skipped = {}, Counter()
    for row, reason, _ in iter_records(io.BytesIO(data), IngestWarcConfig(), "test", "test.warc"):
        if row:
            rows[row["url"]] = row
        elif reason:
            skipped[reason] += 1
    return rows, skipped


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize("digests", [(), ("payload",), ("payload", "block")], ids=["no-digest", "payload-digest", "both-digests"])
def test_a_record_cut_anywhere_is_never_ingested(compress, digests):
    """An interrupted download: the archive ends anywhere inside its last record."""
    records = [response(f"http://example.org/t{n}", page(80 + n), n, digests, compress) for n in range(3)]
    whole = b"".join(records[:2])
    # up to where the block ends: later, only the record separator (or the gzip trailer) is lost
    last = len(records[2]) - (16 if compress else 4)
    for cut in range(1, last, 11):
        rows, skipped = read(whole + records[2][:cut])
        assert set(rows) == {"http://example.org/t0", "http://example.org/t1"}, cut
        assert skipped and set(skipped) <= CUT_REASONS, (cut, skipped)
    rows, skipped = read(whole + records[2])
    assert len(rows) == 3 and not skipped


def test_a_payload_cut_short_is_counted_as_truncated_by_its_length():
    records = [response(f"http://example.org/t{n}", page(90 + n), n, digests=()) for n in range(2)]
    rows, skipped = read(records[0] + records[1][: len(records[1]) // 2])
    assert set(rows) == {"http://example.org/t0"} and skipped == {"truncated_record": 1}


def test_the_payload_digest_is_checked_when_it_is_the_only_digest():
    body = page(100)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    archive = b"".join([
        response("http://example.org/good", body, 1),
        response("http://example.org/wrong", body, 2, payload_digest=b32sha1(body + b"x")),
        # writers differ on chunked bodies: a digest of the body as sent or without its chunking both hold
        response("http://example.org/chunked-raw", chunked, 3, http_headers="Content-Type: text/html\r\nTransfer-Encoding: chunked"),
        response("http://example.org/chunked-dechunked", chunked, 4, http_headers="Content-Type: text/html\r\nTransfer-Encoding: chunked",
                 payload_digest=b32sha1(body)),
        response("http://example.org/unknown-algorithm", body, 5, payload_digest="blake9:" + hashlib.sha1(body).hexdigest()),
    ])
    rows, skipped = read(archive)
    assert set(rows) == {"http://example.org/good", "http://example.org/chunked-raw", "http://example.org/chunked-dechunked",
                         "http://example.org/unknown-algorithm"}
    assert rows["http://example.org/chunked-raw"]["payload"] == body
    assert skipped == {"corrupt_record": 1}


def test_binary_payloads_are_skipped_and_counted():
    archive = b"".join([
        response("http://example.org/nul", b"<html>" + bytes(4000) + b"</html>", 1),
        response("http://example.org/random", b"<html>" + bytes((i * 97 + 13) % 256 for i in range(4000)), 2),
        response("http://example.org/utf16", "\ufeff<html><body>Grüße</body></html>".encode("utf-16"), 3,
                 http_headers="Content-Type: text/html; charset=utf-16"),
        response("http://example.org/text", page(101), 4),
    ])
    rows, skipped = read(archive)
    assert set(rows) == {"http://example.org/utf16", "http://example.org/text"}
    assert skipped == {"binary_payload": 2}


def test_ids_come_from_url_and_payload_not_from_the_record_id():
    one, _ = read(response("http://example.org/a", page(1), n=1) + response("http://example.org/b", page(1), n=2))
    again, _ = read(response("http://example.org/a", page(1), n=77))  # another crawl: a new random WARC-Record-ID
    changed, _ = read(response("http://example.org/a", page(2), n=1))
    ids = {url: row["id"] for url, row in one.items()}
    assert again["http://example.org/a"]["id"] == ids["http://example.org/a"]
    assert changed["http://example.org/a"]["id"] != ids["http://example.org/a"]
    assert ids["http://example.org/a"] != ids["http://example.org/b"]  # same page at another URL
