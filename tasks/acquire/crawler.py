"""The crawler: a breadth-first frontier, per-host politeness (robots.txt, delays, concurrency),
retries, redirects as new frontier entries, safe addresses, and truncation of large bodies.

The stage around it (config, resume, stats) is tasks/acquire/crawl.py."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from lmfoundry.infra.config import CrawlConfig
from lmfoundry.infra.store import StageDir
from lmfoundry.tasks.acquire.robots import RobotsRules, parse_robots
from lmfoundry.tasks.acquire.urls import (
    DEFAULT_PORTS,
    Refused,
    check_host,
    forbidden_address,
    host_allowed,
    normalize_url,
    origin,
)
from lmfoundry.tasks.acquire.warc_parts import (
    Fetched,
    FrontierItem,
    WarcPart,
    page_row,
    pages_name,
    warc_name,
)
from resiliparse.parse.encoding import detect_encoding
from resiliparse.parse.html import HTMLTree

log = logging.getLogger("lmfoundry.crawl")

ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309: crawlers must parse at least 500 KiB

MAX_RETRY_AFTER_S = 120.0

# outcomes decided before any request for the page (they do not count against max_pages)
NOT_REQUESTED = {"robots_disallowed", "robots_unavailable", "crawl_delay_too_long", "private_address", "dns_error"}

RETRYABLE = {"timeout", "connect_error", "network_error", "http_429"}


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
        self.out.write_bytes(warc_name(part.index), part.warc_bytes())
        self.out.write_table(pages_name(part.index), part.pages_table(), records=len(part.rows))
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
