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
import json
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import fsspec
from lmfoundry.infra.config import ComputeConfig, CrawlConfig
from lmfoundry.infra.store import StageDir, StageRef
from lmfoundry.tasks.acquire.crawler import Crawler
from lmfoundry.tasks.acquire.urls import normalize_url
from lmfoundry.tasks.acquire.warc_parts import (
    load_validators,
    pages_name,
    resolve_refresh_from,
)
from pydantic import BaseModel

CODE_VERSION = "2"  # 2: WARC record ids named by content, records and page rows sorted by URL in each part

log = logging.getLogger("lmfoundry.crawl")

DEMO_SITE = "{demo_site}"


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
