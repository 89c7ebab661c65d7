"""The crawl's output files: WARC parts with their page tables, and the validators (ETag,
Last-Modified) remembered from an earlier crawl for a conditional re-crawl."""
from __future__ import annotations

import base64
import hashlib
import io
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
from lmfoundry.infra.config import CrawlConfig
from lmfoundry.infra.store import Store
from lmfoundry.tasks.acquire.urls import request_target
from warcio.statusandheaders import StatusAndHeaders
from warcio.timeutils import datetime_to_iso_date
from warcio.warcwriter import WARCWriter

PAGE_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("host", pa.string()),
        ("depth", pa.int32()),
        ("outcome", pa.string()),
        ("http_status", pa.int32()),
        ("attempts", pa.int32()),
        ("content_type", pa.string()),
        ("bytes", pa.int64()),
        ("truncated", pa.bool_()),
        ("etag", pa.string()),
        ("last_modified", pa.string()),
        ("payload_digest", pa.string()),
        ("warc_record_id", pa.string()),  # for `unchanged`: the earlier record it refers to
        ("warc_date", pa.string()),
        ("links", pa.list_(pa.string())),
        ("redirect_to", pa.string()),
        ("error", pa.string()),
    ]
)


KEPT = {"stored", "unchanged"}  # outcomes whose page is in a WARC file


# ---------------------------------------------------------------- what was fetched


@dataclass
class Fetched:
    url: str
    status: int = 0
    reason: str = ""
    http_version: str = "HTTP/1.1"
    headers: list[tuple[str, str]] = field(default_factory=list)
    request_headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    truncated: bool = False
    ip: str = ""
    error: str = ""  # outcome kind when no usable response: timeout, connect_error, private_address...
    detail: str = ""
    attempts: int = 0

    def header(self, name: str) -> str:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), "")


@dataclass(frozen=True)
class FrontierItem:
    url: str
    depth: int
    chain: tuple[str, ...] = ()  # URLs that redirected here, in order


# ---------------------------------------------------------------- WARC parts


def warc_name(index: int) -> str:
    return f"warc/part-{index:05d}.warc.gz"


def pages_name(index: int) -> str:
    return f"pages/part-{index:05d}.parquet"


def crawler_headers(fetched: Fetched) -> list[tuple[str, str]]:
    """HTTP headers as stored: the body is kept decoded, so the original encoding and length
    headers are renamed (Common Crawl's convention) and Content-Length is the stored length."""
    renamed = {"content-encoding", "content-length", "transfer-encoding"}
    headers = [(f"X-Crawler-{k}" if k.lower() in renamed else k, v) for k, v in fetched.headers]
    return headers + [("Content-Length", str(len(fetched.body)))]


def warc_date() -> str:
    """The capture time written as WARC-Date (UTC, seconds, as warcio writes WARC/1.0)."""
    return datetime_to_iso_date(datetime.now(timezone.utc).replace(tzinfo=None))


def record_id(*parts: str) -> str:
    """A WARC-Record-ID named by what the record holds instead of drawn at random: a name-based
    UUID (RFC 4122 v5) of its type, URL, capture time and content, so one capture always gets
    one id, and the same fetched pages give the same records downstream."""
    return f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, chr(10).join(parts))}>"


class WarcPart:
    """One WARC file being written in memory, and the page rows that belong to it.

    Pages arrive in the order concurrent requests happen to finish; each request/response pair
    is kept as its own gzip members and the file is written sorted by URL (and the page rows
    too), so the same pages fetched at the same time give the same bytes."""

    def __init__(self, index: int, info: dict[str, str]):
        self.index = index
        self.info = info
        self.writer = WARCWriter(io.BytesIO(), gzip=True)  # builds records; pairs are written by pair_bytes
        self.pairs: list[tuple[str, bytes]] = []  # (URL, the gzip members of its request and response)
        self.rows: list[dict[str, Any]] = []
        self.date = warc_date()

    def size(self) -> int:
        return sum(len(data) for _, data in self.pairs)

    def _request(self, fetched: Fetched, date: str, response_id: str):
        line = f"GET {request_target(fetched.url)} {fetched.http_version}"
        headers = StatusAndHeaders(line, fetched.request_headers, is_http_request=True)
        ids = {"WARC-Record-ID": record_id("request", fetched.url, date, response_id), "WARC-Date": date}
        return self.writer.create_warc_record(fetched.url, "request", http_headers=headers, warc_headers_dict=ids)

    def _add_pair(self, fetched: Fetched, record, date: str) -> dict[str, str]:
        buffer = io.BytesIO()
        WARCWriter(buffer, gzip=True).write_request_response_pair(self._request(fetched, date, record.rec_headers.get_header("WARC-Record-ID")), record)
        self.pairs.append((fetched.url, buffer.getvalue()))
        return self._ids(record)

    def add_response(self, fetched: Fetched) -> dict[str, str]:
        http = StatusAndHeaders(f"{fetched.status} {fetched.reason}".strip(), crawler_headers(fetched), protocol=fetched.http_version)
        date = warc_date()
        digest = "sha1:" + base64.b32encode(hashlib.sha1(fetched.body).digest()).decode()
        extra = {"WARC-Record-ID": record_id("response", fetched.url, date, digest), "WARC-Date": date}
        if fetched.ip:
            extra["WARC-IP-Address"] = fetched.ip
        if fetched.truncated:
            extra["WARC-Truncated"] = "length"
        record = self.writer.create_warc_record(
            fetched.url, "response", payload=io.BytesIO(fetched.body), length=len(fetched.body), http_headers=http, warc_headers_dict=extra
        )
        return self._add_pair(fetched, record, date)

    def add_revisit(self, fetched: Fetched, earlier: dict[str, Any]) -> dict[str, str]:
        http = StatusAndHeaders(f"{fetched.status} {fetched.reason}".strip(), fetched.headers, protocol=fetched.http_version)
        date = warc_date()
        extra = {"WARC-Refers-To": earlier["warc_record_id"], "WARC-Date": date,
                 "WARC-Record-ID": record_id("revisit", fetched.url, date, earlier["payload_digest"])}
        if fetched.ip:
            extra["WARC-IP-Address"] = fetched.ip
        record = self.writer.create_revisit_record(
            fetched.url, earlier["payload_digest"], fetched.url, earlier["warc_date"], http_headers=http, warc_headers_dict=extra
        )
        return self._add_pair(fetched, record, date)

    def warc_bytes(self) -> bytes:
        """The WARC file: its warcinfo record, then every pair in URL order."""
        buffer = io.BytesIO()
        writer = WARCWriter(buffer, gzip=True)
        name = warc_name(self.index).split("/")[-1]
        info = writer.create_warcinfo_record(name, self.info)
        info.rec_headers.replace_header("WARC-Date", self.date)
        info.rec_headers.replace_header("WARC-Record-ID", record_id("warcinfo", name, self.date))
        writer.write_record(info)
        for _, data in sorted(self.pairs):
            buffer.write(data)
        return buffer.getvalue()

    def pages_table(self) -> pa.Table:
        return pa.Table.from_pylist(sorted(self.rows, key=lambda row: row["url"]), schema=PAGE_SCHEMA)

    @staticmethod
    def _ids(record) -> dict[str, str]:
        headers = record.rec_headers
        return {
            "warc_record_id": headers.get_header("WARC-Record-ID"),
            "warc_date": headers.get_header("WARC-Date"),
            "payload_digest": headers.get_header("WARC-Payload-Digest") or "",
        }


def page_row(item: FrontierItem, outcome: str, **values: Any) -> dict[str, Any]:
    row = {name: None for name in PAGE_SCHEMA.names}
    row.update(url=item.url, host=urlsplit(item.url).netloc, depth=item.depth, outcome=outcome, attempts=0, bytes=0, truncated=False, links=[])
    row.update(values)
    return row


# ---------------------------------------------------------------- earlier crawls


def resolve_refresh_from(cfg: CrawlConfig, store: Store, own_version: str) -> str | None:
    """The crawl version whose validators this crawl sends, or None."""
    if not cfg.refresh_from:
        return None
    if cfg.refresh_from != "latest":
        if not store.is_committed("crawl", cfg.refresh_from):
            raise ValueError(
                f"crawl.refresh_from={cfg.refresh_from!r} is not a committed crawl version in {store.url}; "
                "name one listed by `lmf show crawl`, or use 'latest'"
            )
        return cfg.refresh_from
    committed = []
    for version in store.versions("crawl"):
        manifest = store.manifest("crawl", version) if version != own_version else None
        if manifest is not None:
            committed.append((manifest.get("created_at", ""), version))
    return max(committed)[1] if committed else None


def load_validators(store: Store, version: str | None) -> dict[str, dict[str, Any]]:
    """url -> validators, record id and links of every page a committed crawl kept."""
    if version is None:
        return {}
    reader = store.reader(store.ref("crawl", version))
    known: dict[str, dict[str, Any]] = {}
    for relpath in reader.files("pages/", ".parquet"):
        for row in reader.read_table(relpath).to_pylist():
            if row["outcome"] in KEPT and (row["etag"] or row["last_modified"]) and row["payload_digest"]:
                known[row["url"]] = row
    return known
