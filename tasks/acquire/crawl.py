"""Stage `crawl`: a polite, safe web crawler that writes WARC files.

From ``crawl.seeds`` (and the URL lists in ``crawl.url_lists``) it fetches pages breadth
first with httpx, up to ``max_depth`` links from a seed and ``max_pages`` page requests,
inside ``allowed_domains`` (default: the seeds' hosts). Politeness and safety:

- robots.txt (RFC 9309: longest match, ``*`` and ``$`` patterns) is fetched once per host and
  obeyed, including ``Crawl-delay`` (fractions allowed); a 5xx robots.txt closes the host;
  ``<meta name="robots" content="noindex/nofollow">`` and ``rel="nofollow"`` are honoured.
- per host: at most ``concurrency_per_host`` requests in flight (one when robots.txt sets a
  crawl-delay), each starting at least ``delay_s`` (or the crawl-delay) after the previous
  request's start and end; retries with exponential backoff (and Retry-After) on
  timeouts, connection errors, 429 and 5xx.
- redirects are followed as new frontier entries (so every hop passes the same checks), up
  to ``max_redirects``; a loop is stopped and counted.
- addresses that are not globally routable (private, loopback, link-local, cloud metadata,
  carrier NAT...) are refused, checked on the resolved IP before connecting and on the
  connected peer before reading, for every request and so after every redirect.
  ``allow_private_hosts: true`` turns this off (tests and the local demo site).
- bodies are cut at ``max_bytes`` (after content decoding, so a gzip bomb is cut too) and
  stored with ``WARC-Truncated: length``; media types outside ``content_types`` are not stored.

Output: ``warc/part-NNNNN.warc.gz`` (warcinfo, then request + response records for stored
pages, request + revisit records for unchanged ones; the body is stored decoded, the original
Content-Encoding/Length headers renamed X-Crawler-*, as Common Crawl does; redirects are
rows in the pages table, not records) and ``pages/part-NNNNN.parquet``: one row per URL visited with its outcome,
validators (ETag, Last-Modified), WARC record id and links. The stats (the manifest) count
outcomes overall and per host. A ``pages`` file is written after its WARC file, so a crawl
killed midway resumes after the last complete part: visited URLs are not fetched again.

Re-crawl: set ``crawl.refresh_from`` to a committed crawl version, or ``latest`` (the newest
committed crawl in the store), and a new ``crawl.snapshot`` label (a schedule sets e.g. the
date: the label is part of the stage version, so every refresh is a new version). Pages the
previous crawl stored are requested with If-None-Match / If-Modified-Since; a 304 becomes a
WARC ``revisit`` record pointing at the earlier record (nothing stored again), and its
links, remembered from the earlier crawl, are still followed. A refresh version therefore
holds what changed; the earlier version keeps the rest.

``seeds: ["{demo_site}"]`` serves tasks/acquire/demo_site.py's local site for the crawl's duration.

Run alone: ``lmf run --until crawl --set 'crawl.seeds=["https://docs.python.org/3/"]' --set crawl.max_pages=50``.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import itertools
import json
import logging
import re
import socket
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

import fsspec
import httpx
import pyarrow as pa
from pydantic import BaseModel
from resiliparse.parse.encoding import detect_encoding
from resiliparse.parse.html import HTMLTree
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from lmfoundry.infra.config import ComputeConfig, CrawlConfig
from lmfoundry.infra.store import StageDir, StageRef, Store

CODE_VERSION = "1"
log = logging.getLogger("lmfoundry.crawl")

DEMO_SITE = "{demo_site}"
MAX_URL_CHARS = 2048
ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309: crawlers must parse at least 500 KiB
MAX_RETRY_AFTER_S = 120.0
# hostnames that reach cloud metadata services whatever they resolve to
METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data", "instance-data.ec2.internal"}
DEFAULT_PORTS = {"http": 80, "https": 443}
# outcomes decided before any request for the page (they do not count against max_pages)
NOT_REQUESTED = {"robots_disallowed", "robots_unavailable", "crawl_delay_too_long", "private_address", "dns_error"}
RETRYABLE = {"timeout", "connect_error", "network_error", "http_429"}
KEPT = {"stored", "unchanged"}

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


class CrawlStats(BaseModel):
    seeds: int
    pages: int  # URLs visited (one row each in pages/)
    requests: int  # HTTP requests for pages, retries included (robots.txt not counted)
    stored: int
    unchanged: int
    truncated: int
    bytes_stored: int
    warc_files: int
    frontier_left: int  # URLs found but not visited because max_pages was reached
    refreshed_from: str | None
    outcomes: dict[str, int]
    hosts: dict[str, dict[str, Any]]


# ---------------------------------------------------------------- URLs


def remove_dot_segments(path: str) -> str:
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if len(out) > 1:
                out.pop()
        elif segment != ".":
            out.append(segment)
    result = "/".join(out)
    if path.endswith(("/.", "/..")):
        result += "/"
    return result if result.startswith("/") else "/" + result


def normalize_url(url: str, base: str | None = None) -> str | None:
    """A canonical absolute http(s) URL (lowercase scheme and host, no default port, no
    fragment or user info, dot segments resolved), or None for anything else."""
    try:
        url = urljoin(base, url.strip()) if base else url.strip()
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname
        port = parts.port
    except ValueError:
        return None
    if scheme not in DEFAULT_PORTS or not host:
        return None
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        return None
    netloc = f"[{host}]" if ":" in host else host
    if port and port != DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    path = quote(remove_dot_segments(parts.path or "/"), safe="/%:@!$&'()*+,;=-._~")
    query = quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    normal = urlunsplit((scheme, netloc, path, query, ""))
    return normal if len(normal) <= MAX_URL_CHARS else None


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def host_allowed(host: str, domains: list[str]) -> bool:
    return any(host == d or host.endswith("." + d) for d in domains)


def request_target(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


# ---------------------------------------------------------------- address safety


def forbidden_address(ip: str) -> bool:
    """True for any address that is not globally routable: private, loopback, link-local
    (169.254.169.254, the cloud metadata service), carrier NAT, multicast, reserved."""
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return True
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return not addr.is_global or addr.is_multicast


class Refused(Exception):
    """The address of a URL is not allowed (kind: private_address or dns_error)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


async def check_host(host: str, port: int) -> None:
    if host.lower().rstrip(".") in METADATA_HOSTS:
        raise Refused("private_address", f"{host} is a cloud metadata host")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Refused("dns_error", f"cannot resolve {host}: {exc}") from exc
    bad = sorted({info[4][0] for info in infos if forbidden_address(info[4][0])})
    if bad:
        raise Refused("private_address", f"{host} resolves to non-public address {', '.join(bad)}")


# ---------------------------------------------------------------- robots.txt (RFC 9309)


@dataclass
class RobotsRules:
    rules: list[tuple[int, bool, re.Pattern]] = field(default_factory=list)  # (length, allow, pattern)
    crawl_delay: float | None = None
    disallow_all: bool = False  # robots.txt unreachable (5xx): the host is closed

    def allows(self, url: str) -> bool:
        if self.disallow_all:
            return False
        target = request_target(url)
        if target == "/robots.txt":
            return True
        best: tuple[int, bool] | None = None
        for length, allow, pattern in self.rules:
            if pattern.match(target) and (best is None or length > best[0] or (length == best[0] and allow)):
                best = (length, allow)
        return True if best is None else best[1]


def _robots_pattern(path: str) -> re.Pattern:
    anchored = path.endswith("$")
    body = re.escape(path[:-1] if anchored else path).replace(r"\*", ".*")
    return re.compile(body + ("$" if anchored else ""))


def parse_robots(text: str, user_agent: str) -> RobotsRules:
    """The rules of the group for our product token, else of the '*' group."""
    token = user_agent.split("/")[0].strip().lower()
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    agents: list[str] = []
    in_rules = False
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if ":" not in line:
            continue
        key, value = (s.strip() for s in line.split(":", 1))
        key = key.lower()
        if key == "user-agent":
            if in_rules:
                agents, in_rules = [], False
            agents.append(value.lower())
        elif key in ("allow", "disallow", "crawl-delay") and agents:
            in_rules = True
            for agent in agents:
                groups[agent].append((key, value))
    chosen = next((groups[a] for a in groups if a != "*" and a in token), None) or groups.get("*", [])
    rules = RobotsRules()
    for key, value in chosen:
        if key == "crawl-delay":
            with contextlib.suppress(ValueError):
                rules.crawl_delay = max(0.0, float(value))
        elif value:  # an empty Disallow allows everything
            rules.rules.append((len(value), key == "allow", _robots_pattern(value)))
    return rules


# ---------------------------------------------------------------- HTML


def page_links(body: bytes, url: str) -> tuple[list[str], bool, bool]:
    """(normalised links, nofollow, noindex) of an HTML page."""
    try:
        tree = HTMLTree.parse_from_bytes(body, detect_encoding(body, from_html_meta=True))
    except Exception as exc:  # the parser raises its own types; a broken page just has no links
        log.debug("cannot parse %s: %s", url, exc)
        return [], False, False
    directives = ""
    for meta in tree.document.query_selector_all("meta[name]"):
        if (meta.getattr("name") or "").lower() == "robots":
            directives += (meta.getattr("content") or "").lower()
    base_node = tree.document.query_selector("base[href]")
    base = normalize_url(base_node.getattr("href"), url) if base_node else None
    base = base or url
    nofollow, noindex = "nofollow" in directives or "none" in directives, "noindex" in directives or "none" in directives
    links: dict[str, None] = {}
    if not nofollow:
        for anchor in tree.document.query_selector_all("a[href]"):
            if "nofollow" in (anchor.getattr("rel") or "").lower():
                continue
            link = normalize_url(anchor.getattr("href") or "", base)
            if link:
                links[link] = None
    return list(links), nofollow, noindex


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


# ---------------------------------------------------------------- fetching


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


@dataclass
class Host:
    robots: RobotsRules
    delay: float
    slots: asyncio.Semaphore
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    next_at: float = 0.0
    closed: str = ""  # an outcome for every page of the host: crawl_delay_too_long, robots_unavailable

    async def wait_turn(self) -> None:
        """Space request starts at least `delay` apart."""
        async with self.lock:
            loop = asyncio.get_running_loop()
            wait = self.next_at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self.next_at = loop.time() + self.delay

    def finished(self) -> None:
        """A request ended: the next may start `delay` after its end, so the server sees the gap too."""
        self.next_at = max(self.next_at, asyncio.get_running_loop().time() + self.delay)


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


# ---------------------------------------------------------------- the crawler


class Crawler:
    def __init__(self, cfg: CrawlConfig, out: StageDir, seeds: list[str], domains: list[str], earlier: dict[str, dict], info: dict[str, str]):
        self.cfg, self.out, self.seeds, self.domains, self.earlier, self.info = cfg, out, seeds, domains, earlier, info
        self.queue: asyncio.PriorityQueue = asyncio.PriorityQueue()
        self.order = itertools.count()
        self.seen: set[str] = set()
        self.hosts: dict[str, asyncio.Future] = {}
        self.requested = 0  # pages requested (max_pages)
        self.frontier_left = 0
        self.part: WarcPart | None = None
        self.next_part = 0
        self.stale_part = False  # a WARC file without its pages file, left by an interrupted run
        self.client: httpx.AsyncClient | None = None  # opened by run()

    # ------------------------------------------------------------ frontier
    def enqueue(self, url: str, depth: int, chain: tuple[str, ...] = ()) -> None:
        if url in self.seen or depth > self.cfg.max_depth or not host_allowed(urlsplit(url).hostname or "", self.domains):
            return
        self.seen.add(url)
        self.queue.put_nowait((depth, next(self.order), FrontierItem(url, depth, chain)))

    def resume(self) -> None:
        """Rebuild the frontier from the parts an earlier, interrupted run completed."""
        done_rows: list[dict] = []
        while self.out.done(pages_name(self.next_part)):
            done_rows.extend(self.out.read_table(pages_name(self.next_part)).to_pylist())
            self.next_part += 1
        self.stale_part = self.out.done(warc_name(self.next_part))
        if done_rows:
            log.info("crawl: resuming after %d parts (%d URLs already visited)", self.next_part, len(done_rows))
        self.seen.update(row["url"] for row in done_rows)
        self.requested = sum(1 for row in done_rows if row["outcome"] not in NOT_REQUESTED)
        for url in self.seeds:
            self.enqueue(url, 0)
        for row in done_rows:
            for link in row["links"] or []:
                self.enqueue(link, row["depth"] + 1)
            if row["redirect_to"] and row["outcome"] == "redirect":
                self.enqueue(row["redirect_to"], row["depth"])

    # ------------------------------------------------------------ output
    def current_part(self) -> WarcPart:
        if self.part is None:
            self.part = WarcPart(self.next_part, self.info)
        return self.part

    def record(self, row: dict[str, Any]) -> None:
        self.current_part().rows.append(row)

    def flush(self, final: bool = False) -> None:
        part = self.part
        if part is None and final and self.stale_part:
            part = self.current_part()  # overwrite the stale file so the commit lists no orphan
        if part is None or (not part.rows and not final):
            return
        # WARC first, pages second: a pages file marks its part complete
        self.out.write_bytes(warc_name(part.index), part.buffer.getvalue())
        self.out.write_table(pages_name(part.index), pa.Table.from_pylist(part.rows, schema=PAGE_SCHEMA), records=len(part.rows))
        self.part, self.next_part, self.stale_part = None, part.index + 1, False

    # ------------------------------------------------------------ hosts and robots
    async def host(self, url: str) -> Host:
        key = origin(url)
        if key not in self.hosts:
            self.hosts[key] = asyncio.ensure_future(self.open_host(key))
        return await self.hosts[key]

    async def open_host(self, key: str) -> Host:
        probe = Host(RobotsRules(), self.cfg.delay_s, asyncio.Semaphore(self.cfg.concurrency_per_host))
        robots_url = key + "/robots.txt"
        fetched = Fetched(robots_url)
        for _ in range(self.cfg.max_redirects + 1):
            fetched = await self.fetch(fetched.url, probe, {}, body_limit=ROBOTS_MAX_BYTES, any_type=True)
            location = fetched.header("location") if 300 <= fetched.status < 400 else ""
            target = normalize_url(location, fetched.url) if location else None
            if not target:
                break
            fetched = Fetched(target)
        if fetched.status == 200:
            rules = parse_robots(fetched.body.decode("utf-8", "replace"), self.cfg.user_agent)
        elif 400 <= fetched.status < 500:
            rules = RobotsRules()  # RFC 9309: no robots.txt, no restrictions
        else:  # 5xx or unreachable: assume a complete disallow
            rules = RobotsRules(disallow_all=True)
        delay = max(self.cfg.delay_s, rules.crawl_delay or 0.0)
        # a crawl-delay means one request at a time, so the server sees the gap between any two
        slots = asyncio.Semaphore(1) if rules.crawl_delay else probe.slots
        # the robots.txt request was the host's first: the next one waits the host's real delay
        host = Host(rules, delay, slots, next_at=asyncio.get_running_loop().time() + delay)
        if fetched.error in ("private_address", "dns_error"):
            host.closed = fetched.error
            log.warning("crawl: not crawling %s: %s", key, fetched.detail)
        elif rules.disallow_all:
            host.closed = "robots_unavailable"
            log.warning("crawl: %s/robots.txt is unreachable (%s); not crawling the host", key, fetched.error or fetched.status)
        elif (rules.crawl_delay or 0.0) > self.cfg.max_crawl_delay_s:
            host.closed = "crawl_delay_too_long"
            log.warning("crawl: %s asks for crawl-delay %.0f s > crawl.max_crawl_delay_s; skipping the host", key, rules.crawl_delay)
        return host

    # ------------------------------------------------------------ HTTP
    async def fetch(self, url: str, host: Host, headers: dict[str, str], body_limit: int | None = None, any_type: bool = False) -> Fetched:
        """One URL with retries; never raises for network trouble (it is in Fetched.error)."""
        fetched = Fetched(url)
        for attempt in range(self.cfg.retries + 1):
            async with host.slots:
                await host.wait_turn()
                try:
                    fetched = await self.request_once(url, headers, body_limit, any_type)
                finally:
                    host.finished()
            fetched.attempts = attempt + 1
            kind = fetched.error or f"http_{fetched.status}"
            retryable = kind in RETRYABLE or kind.startswith("http_5")
            if not retryable or attempt == self.cfg.retries:
                break
            await asyncio.sleep(self.backoff(attempt, fetched))
        return fetched

    def backoff(self, attempt: int, fetched: Fetched) -> float:
        wait = self.cfg.backoff_s * 2**attempt
        retry_after = fetched.header("retry-after")
        if retry_after:
            try:
                wait = float(retry_after)
            except ValueError:
                with contextlib.suppress(TypeError, ValueError):
                    wait = (parsedate_to_datetime(retry_after) - datetime.now(timezone.utc)).total_seconds()
        return min(max(wait, 0.0), MAX_RETRY_AFTER_S)

    async def request_once(self, url: str, headers: dict[str, str], body_limit: int | None, any_type: bool) -> Fetched:
        fetched = Fetched(url)
        parts = urlsplit(url)
        try:
            if not self.cfg.allow_private_hosts:
                await check_host(parts.hostname, parts.port or DEFAULT_PORTS[parts.scheme])
            await asyncio.wait_for(self._stream(fetched, headers, body_limit, any_type), self.cfg.timeout_s)
        except Refused as exc:
            fetched.error, fetched.detail = exc.kind, str(exc)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            fetched.error, fetched.detail = "timeout", f"no complete response within {self.cfg.timeout_s} s"
        except httpx.ConnectError as exc:
            fetched.error, fetched.detail = "connect_error", str(exc)
        except (httpx.TransportError, httpx.DecodingError) as exc:
            fetched.error, fetched.detail = "network_error", f"{type(exc).__name__}: {exc}"
        if fetched.error:
            fetched.body = b""
        return fetched

    async def _stream(self, fetched: Fetched, headers: dict[str, str], body_limit: int | None, any_type: bool) -> None:
        async with self.client.stream("GET", fetched.url, headers=headers) as response:
            peer = self.peer_address(response)
            if not self.cfg.allow_private_hosts and peer and forbidden_address(peer):
                raise Refused("private_address", f"{fetched.url} connected to non-public address {peer}")
            fetched.ip = peer
            fetched.status, fetched.reason = response.status_code, response.reason_phrase
            fetched.http_version = response.http_version
            fetched.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw]
            fetched.request_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.request.headers.raw]
            wanted = any_type or media_type(response.headers.get("content-type")) in self.cfg.content_types
            if fetched.status != 200 or not wanted:
                return  # redirects, errors, 304 and unwanted media types: the headers are enough
            limit = body_limit or self.cfg.max_bytes
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    fetched.truncated = True
                    break
            fetched.body = bytes(body[:limit])

    @staticmethod
    def peer_address(response: httpx.Response) -> str:
        stream = response.extensions.get("network_stream")
        address = stream.get_extra_info("server_addr") if stream is not None else None
        return str(address[0]) if address else ""

    # ------------------------------------------------------------ one frontier entry
    async def visit(self, item: FrontierItem) -> None:
        if self.requested >= self.cfg.max_pages:
            self.frontier_left += 1
            return
        host = await self.host(item.url)
        if host.closed:
            return self.record(page_row(item, host.closed))
        if not host.robots.allows(item.url):
            return self.record(page_row(item, "robots_disallowed"))
        if self.requested >= self.cfg.max_pages:  # checked again: other workers ran meanwhile
            self.frontier_left += 1
            return
        self.requested += 1
        earlier = self.earlier.get(item.url)
        conditional = {}
        if earlier:
            if earlier["etag"]:
                conditional["If-None-Match"] = earlier["etag"]
            if earlier["last_modified"]:
                conditional["If-Modified-Since"] = earlier["last_modified"]
        fetched = await self.fetch(item.url, host, conditional)
        self.handle(item, fetched, earlier)

    def handle(self, item: FrontierItem, fetched: Fetched, earlier: dict | None) -> None:
        common = dict(http_status=fetched.status, attempts=fetched.attempts, content_type=media_type(fetched.header("content-type")) or None)
        if fetched.error:
            return self.record(page_row(item, fetched.error, error=fetched.detail, **common))
        status = fetched.status
        if status == 304 and earlier:
            self.current_part().add_revisit(fetched, earlier)
            # the row keeps the validators and the record the revisit refers to, for the next refresh
            keep = {k: earlier[k] for k in ("etag", "last_modified", "payload_digest", "warc_record_id", "warc_date")}
            self.record(page_row(item, "unchanged", links=earlier["links"] or [], **common, **keep))
            for link in earlier["links"] or []:
                self.enqueue(link, item.depth + 1)
            return
        if 300 <= status < 400 and fetched.header("location"):
            return self.handle_redirect(item, fetched, common)
        if status != 200:
            return self.record(page_row(item, f"http_{status}", **common))
        if common["content_type"] not in self.cfg.content_types:
            return self.record(page_row(item, "content_type", **common))
        links, _, noindex = page_links(fetched.body, item.url)
        if noindex:
            self.record(page_row(item, "noindex", links=links, **common))
        else:
            ids = self.current_part().add_response(fetched)
            validators = dict(etag=fetched.header("etag") or None, last_modified=fetched.header("last-modified") or None)
            self.record(page_row(item, "stored", links=links, bytes=len(fetched.body), truncated=fetched.truncated, **common, **validators, **ids))
        for link in links:
            self.enqueue(link, item.depth + 1)

    def handle_redirect(self, item: FrontierItem, fetched: Fetched, common: dict) -> None:
        target = normalize_url(fetched.header("location"), item.url)
        chain = item.chain + (item.url,)
        if target is None:
            return self.record(page_row(item, "bad_redirect", error=fetched.header("location")[:500], **common))
        if target in chain:
            return self.record(page_row(item, "redirect_loop", redirect_to=target, **common))
        if len(chain) > self.cfg.max_redirects:
            return self.record(page_row(item, "too_many_redirects", redirect_to=target, **common))
        self.record(page_row(item, "redirect", redirect_to=target, **common))
        self.enqueue(target, item.depth, chain)

    # ------------------------------------------------------------ the loop
    async def worker(self) -> None:
        while True:
            _, _, item = await self.queue.get()
            try:
                try:
                    await self.visit(item)
                except Exception:  # a bug or a strange page costs that page, not the crawl
                    log.exception("crawl: unexpected error visiting %s", item.url)
                    self.record(page_row(item, "crawler_error"))
                # outside the guard: failing to write output must stop the crawl
                if self.part is not None and self.part.size() >= self.cfg.warc_file_bytes:
                    self.flush()
            finally:
                self.queue.task_done()

    async def run(self) -> None:
        self.resume()
        limits = httpx.Limits(max_connections=self.cfg.concurrency, max_keepalive_connections=self.cfg.concurrency)
        timeout = httpx.Timeout(self.cfg.timeout_s)
        headers = {"User-Agent": self.cfg.user_agent}
        # trust_env=False: a proxy from the environment would hide the peer address we check
        async with httpx.AsyncClient(follow_redirects=False, timeout=timeout, limits=limits, headers=headers, trust_env=False) as client:
            self.client = client
            workers = [asyncio.create_task(self.worker()) for _ in range(self.cfg.concurrency)]
            finished = asyncio.create_task(self.queue.join())
            await asyncio.wait([finished, *workers], return_when=asyncio.FIRST_COMPLETED)
            for task in [finished, *workers]:
                task.cancel()
            results = await asyncio.gather(*workers, return_exceptions=True)
            failure = next((r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)), None)
            if failure is not None:
                raise failure  # a worker can only die by failing to write output
        self.flush(final=True)


# ---------------------------------------------------------------- the stage


def configured_seeds(cfg: CrawlConfig, demo_url: str | None) -> list[str]:
    raw = [demo_url if s == DEMO_SITE else s for s in cfg.seeds]
    for path in cfg.url_lists:
        with fsspec.open(path, "rt") as fh:
            raw.extend(line.strip() for line in fh if line.strip() and not line.lstrip().startswith("#"))
    seeds = []
    for url in raw:
        normal = normalize_url(url)
        if normal is None:
            raise ValueError(f"crawl seed {url!r} is not an absolute http(s) URL; fix crawl.seeds or the URL list")
        seeds.append(normal)
    return list(dict.fromkeys(seeds))


def crawl_stats(out: StageDir, seeds: int, frontier_left: int, refreshed_from: str | None) -> CrawlStats:
    rows: list[dict] = []
    index = 0
    while out.done(pages_name(index)):
        rows.extend(out.read_table(pages_name(index)).to_pylist())
        index += 1
    outcomes = Counter(row["outcome"] for row in rows)
    hosts: dict[str, dict[str, Any]] = {}
    for row in rows:
        host = hosts.setdefault(row["host"], {"pages": 0, "requests": 0, "stored": 0, "unchanged": 0, "redirects": 0, "robots_disallowed": 0, "errors": {}})
        host["pages"] += 1
        host["requests"] += row["attempts"] or 0
        outcome = row["outcome"]
        if outcome == "redirect":
            host["redirects"] += 1
        elif outcome in ("stored", "unchanged", "robots_disallowed"):
            host[outcome] += 1
        else:
            host["errors"][outcome] = host["errors"].get(outcome, 0) + 1
    return CrawlStats(
        seeds=seeds,
        pages=len(rows),
        requests=sum(row["attempts"] or 0 for row in rows),
        stored=outcomes["stored"],
        unchanged=outcomes["unchanged"],
        truncated=sum(1 for row in rows if row["truncated"]),
        bytes_stored=sum(row["bytes"] or 0 for row in rows if row["outcome"] == "stored"),
        warc_files=index,
        frontier_left=frontier_left,
        refreshed_from=refreshed_from,
        outcomes=dict(sorted(outcomes.items())),
        hosts=dict(sorted(hosts.items())),
    )


def run_async(make_coroutine) -> Any:
    """asyncio.run, also from a thread that already runs an event loop (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coroutine())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make_coroutine())).result()


def run_crawl(cfg: CrawlConfig, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> CrawlStats:
    if not cfg.seeds and not cfg.url_lists:
        return crawl_stats(out, 0, 0, None)
    with contextlib.ExitStack() as stack:
        demo_url = None
        if DEMO_SITE in cfg.seeds:
            from lmfoundry.tasks.acquire.demo_site import demo_site

            demo_url = stack.enter_context(demo_site())
        seeds = configured_seeds(cfg, demo_url)
        domains = [d.lower().strip(".") for d in cfg.allowed_domains] or sorted({urlsplit(s).hostname for s in seeds})
        refreshed_from = resolve_refresh_from(cfg, out.store, out.version)
        earlier = load_validators(out.store, refreshed_from)
        if refreshed_from:
            log.info("crawl: re-crawl against crawl %s (%d pages with validators)", refreshed_from, len(earlier))
        info = {
            "software": "lmfoundry crawl",
            "format": "WARC File Format 1.0",
            "http-header-user-agent": cfg.user_agent,
            "robots": "obey",
            "isPartOf": f"crawl/{out.version}",
            "description": json.dumps({"snapshot": cfg.snapshot, "refresh_from": refreshed_from, "seeds": seeds[:20]}),
        }
        crawler = Crawler(cfg, out, seeds, domains, earlier, info)
        started = time.monotonic()
        run_async(crawler.run)
        log.info("crawl: %d pages requested in %.1f s", crawler.requested, time.monotonic() - started)
        return crawl_stats(out, len(seeds), crawler.frontier_left, refreshed_from)
