"""The crawl's output files: WARC parts with their page tables, and the validators (ETag,
Last-Modified) remembered from an earlier crawl for a conditional re-crawl."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
from lmfoundry.infra.config import CrawlConfig
from lmfoundry.infra.store import Store
from lmfoundry.tasks.acquire.urls import request_target
from warcio.statusandheaders import StatusAndHeaders
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


class WarcPart:
    """One WARC file being written in memory, and the page rows that belong to it."""

    def __init__(self, index: int, info: dict[str, str]):
        self.index = index
        self.buffer = io.BytesIO()
        self.writer = WARCWriter(self.buffer, gzip=True)
        self.writer.write_record(self.writer.create_warcinfo_record(warc_name(index).split("/")[-1], info))
        self.rows: list[dict[str, Any]] = []

    def size(self) -> int:
        return self.buffer.tell()

    def _request(self, fetched: Fetched):
        line = f"GET {request_target(fetched.url)} {fetched.http_version}"
        headers = StatusAndHeaders(line, fetched.request_headers, is_http_request=True)
        return self.writer.create_warc_record(fetched.url, "request", http_headers=headers)

    def add_response(self, fetched: Fetched) -> dict[str, str]:
        http = StatusAndHeaders(f"{fetched.status} {fetched.reason}".strip(), crawler_headers(fetched), protocol=fetched.http_version)
        extra = {"WARC-IP-Address": fetched.ip} if fetched.ip else {}
        if fetched.truncated:
            extra["WARC-Truncated"] = "length"
        record = self.writer.create_warc_record(
            fetched.url, "response", payload=io.BytesIO(fetched.body), length=len(fetched.body), http_headers=http, warc_headers_dict=extra
        )
        self.writer.write_request_response_pair(self._request(fetched), record)
        return self._ids(record)

    def add_revisit(self, fetched: Fetched, earlier: dict[str, Any]) -> dict[str, str]:
        http = StatusAndHeaders(f"{fetched.status} {fetched.reason}".strip(), fetched.headers, protocol=fetched.http_version)
        extra = {"WARC-Refers-To": earlier["warc_record_id"]}
        if fetched.ip:
            extra["WARC-IP-Address"] = fetched.ip
        record = self.writer.create_revisit_record(
            fetched.url, earlier["payload_digest"], fetched.url, earlier["warc_date"], http_headers=http, warc_headers_dict=extra
        )
        self.writer.write_request_response_pair(self._request(fetched), record)
        return self._ids(record)

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
