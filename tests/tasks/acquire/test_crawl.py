"""The crawler against a real HTTP server on 127.0.0.1 serving a small generated site."""
from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from warcio.archiveiterator import ArchiveIterator

from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.faults import InjectedFault
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.tasks.acquire.robots import parse_robots
from lmfoundry.tasks.acquire.urls import forbidden_address, normalize_url

CRAWL = StageSpec("crawl", "lmfoundry.tasks.acquire.crawl:run_crawl", section="crawl")
INGEST_WARC = StageSpec("ingest_warc", "lmfoundry.tasks.acquire.ingest_warc:run_ingest_warc", section="ingest_warc", inputs=("crawl",))
WARCIO = Path(sys.executable).parent / "warcio"
BIG_PAGE_BYTES = 20 * 2**20
WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud maple cedar".split()


def prose(seed: int, words: int = 400) -> str:
    """Deterministic varied text (compresses poorly, so WARC parts fill up)."""
    digest = hashlib.sha256(str(seed).encode()).digest()
    return " ".join(WORDS[(digest[i % 32] + i * seed) % len(WORDS)] for i in range(words))


def html(title: str, body: str, links: list[str] = ()) -> bytes:
    anchors = "".join(f'<a href="{href}">{href}</a> ' for href in links)
    return f"<html><head><title>{title}</title></head><body><h1>{title}</h1><p>{body}</p>{anchors}</body></html>".encode()


class Site:
    """A generated site with every case the crawler must handle, and a log of requests."""

    def __init__(self, crawl_delay: float | None):
        self.crawl_delay = crawl_delay
        self.revision = 0  # bump to change /b.html between crawls
        self.requests: list[tuple[float, str, dict]] = []
        self.flaky_calls = 0
        self.big = b"<html><body>" + b"<p>" + b"big page " * (BIG_PAGE_BYTES // 9) + b"</p></body></html>"
        self.lock = threading.Lock()

    def robots(self) -> bytes:
        delay = f"Crawl-delay: {self.crawl_delay}\n" if self.crawl_delay else ""
        return f"User-agent: *\nDisallow: /private/\n{delay}\nUser-agent: otherbot\nDisallow: /\n".encode()

    def page(self, path: str) -> tuple[int, bytes, str, dict]:
        """(status, body, content type, extra headers) for a path."""
        pages = {
            "/": html("Home", prose(1), [
                "/a.html", "/b.html", "/private/secret.html", "/missing.html", "/error.html", "/flaky.html",
                "/slow.html", "/big.html", "/loop1", "/image.png", "/redirect", "http://example.invalid/", "/a.html#top", "/x/../a.html",
            ]),
            "/a.html": html("Page A", prose(2), ["/b.html", "/c.html"]) + b'<a rel="nofollow" href="/trap.html">trap</a>',
            "/b.html": html(f"Page B r{self.revision}", prose(3 + self.revision), ["/"]),
            "/c.html": html("Page C", prose(4), ["/d.html"]),
            "/d.html": html("Page D", prose(5)),
            "/trap.html": html("Trap", prose(6)),
            "/private/secret.html": html("Secret", prose(7)),
        }
        if path in pages:
            return 200, pages[path], "text/html; charset=utf-8", {}
        if path == "/error.html":
            return 500, b"oops", "text/plain", {}
        if path == "/flaky.html":
            with self.lock:
                self.flaky_calls += 1
                first = self.flaky_calls == 1
            return (503, b"busy", "text/plain", {"Retry-After": "0"}) if first else (200, html("Flaky", prose(8)), "text/html", {})
        if path == "/big.html":
            return 200, self.big, "text/html", {}
        if path == "/image.png":
            return 200, b"\x89PNG\r\n\x1a\n" + b"\x00" * 2048, "image/png", {}
        redirects = {"/loop1": "/loop2", "/loop2": "/loop1", "/redirect": "/a.html"}
        if path in redirects:
            return 302, b"", "text/html", {"Location": redirects[path]}
        return 404, b"not here", "text/html", {}


def make_handler(site: Site):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802
            site.requests.append((time.monotonic(), self.path, dict(self.headers)))
            if self.path == "/robots.txt":
                return self.send(200, site.robots(), "text/plain", {})
            if self.path == "/slow.html":
                time.sleep(1.5)
            status, body, ctype, extra = site.page(self.path)
            etag = '"' + hashlib.sha1(body).hexdigest()[:12] + '"'
            if status == 200 and self.headers.get("If-None-Match") == etag:
                return self.send(304, b"", None, {"ETag": etag})
            if status == 200:
                extra = {**extra, "ETag": etag}
            self.send(status, body, ctype, extra)

        def send(self, status, body, ctype, extra):
            try:
                self.send_response(status)
                if ctype:
                    self.send_header("Content-Type", ctype)
                for key, value in extra.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the crawler hung up (the 20 MB page, the timeout)

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture
def site_server():
    """Factory: start a Site on 127.0.0.1; every server is shut down after the test."""
    servers = []

    def start(crawl_delay: float | None = None) -> tuple[Site, str]:
        site = Site(crawl_delay)
        server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(site))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return site, f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def config(seed: str, **crawl) -> PipelineConfig:
    settings = dict(
        seeds=[seed], allow_private_hosts=True, max_depth=2, max_bytes=2**20, timeout_s=0.6, retries=1,
        backoff_s=0.05, delay_s=0.0, concurrency=4,
    )
    settings.update(crawl)
    return PipelineConfig.model_validate({"crawl": settings})


def pages(store, ref) -> dict[str, dict]:
    reader = store.reader(ref)
    rows = [row for path in reader.files("pages/", ".parquet") for row in reader.read_table(path).to_pylist()]
    return {row["url"]: row for row in rows}


def warc_records(store, ref) -> list:
    reader = store.reader(ref)
    records = []
    for path in reader.files("warc/", ".warc.gz"):
        for record in ArchiveIterator(io.BytesIO(reader.read_bytes(path))):
            records.append((record.rec_type, record.rec_headers.get_header("WARC-Target-URI"), dict(record.rec_headers.headers), record.content_stream().read()))
    return records


def paths_requested(site: Site) -> list[str]:
    return [path for _, path, _ in site.requests]


# ---------------------------------------------------------------- the polite crawl


def test_crawl_is_polite_and_counts_every_failure(store, site_server):
    site, base = site_server(crawl_delay=0.3)
    outcome = run_stage(store, CRAWL, config(base), [])
    rows = pages(store, outcome.ref)
    by_path = {url.removeprefix(base[:-1]): row for url, row in rows.items()}
    requested = paths_requested(site)

    # robots.txt: fetched once, its Disallow honoured (and the group for another bot ignored)
    assert requested.count("/robots.txt") == 1
    assert by_path["/private/secret.html"]["outcome"] == "robots_disallowed"
    assert "/private/secret.html" not in requested
    # crawl-delay 0.3 s: the server sees at least that much time between two requests
    times = [t for t, _, _ in site.requests]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 0.29, gaps
    # failures are counted by kind; retries happen for 5xx and timeouts, not for 404
    assert by_path["/missing.html"]["outcome"] == "http_404" and by_path["/missing.html"]["attempts"] == 1
    assert by_path["/error.html"]["outcome"] == "http_500" and requested.count("/error.html") == 2
    assert by_path["/slow.html"]["outcome"] == "timeout" and by_path["/slow.html"]["attempts"] == 2
    assert by_path["/flaky.html"]["outcome"] == "stored" and by_path["/flaky.html"]["attempts"] == 2
    assert by_path["/image.png"]["outcome"] == "content_type"
    # a redirect loop is stopped after one lap; a plain redirect lands on an already known page
    assert {by_path["/loop1"]["outcome"], by_path["/loop2"]["outcome"]} == {"redirect", "redirect_loop"}
    assert requested.count("/loop1") == 1 and requested.count("/loop2") == 1
    assert by_path["/redirect"]["outcome"] == "redirect" and by_path["/redirect"]["redirect_to"] == base + "a.html"
    # the 20 MB page is cut at max_bytes and marked truncated
    big = by_path["/big.html"]
    assert big["outcome"] == "stored" and big["truncated"] and big["bytes"] == 2**20
    # URL normalisation and frontier dedup: /a.html#top and /x/../a.html are /a.html, fetched once
    assert requested.count("/a.html") == 1
    # depth limit, nofollow and allowed domains
    assert by_path["/c.html"]["depth"] == 2 and "/d.html" not in requested
    assert "/trap.html" not in requested
    assert not any("example.invalid" in url for url in rows)

    stats = outcome.stats
    host = stats["hosts"][base.split("//")[1].rstrip("/")]
    assert host["errors"] == {"content_type": 1, "http_404": 1, "http_500": 1, "redirect_loop": 1, "timeout": 1}
    assert host["robots_disallowed"] == 1 and host["stored"] == stats["stored"] == 6  # /, a, b, c, flaky, big
    assert stats["truncated"] == 1

    # the WARC passes `warcio check` and says which record was cut
    reader = store.reader(outcome.ref)
    for path in reader.files("warc/", ".warc.gz"):
        check = subprocess.run([str(WARCIO), "check", "-v", reader.local_path(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "digest pass" in check.stdout
    truncated = [headers for kind, url, headers, _ in warc_records(store, outcome.ref) if kind == "response" and url.endswith("/big.html")]
    assert truncated[0].get("WARC-Truncated") == "length"

    # the stage contract: the same config again is reused, not crawled again
    before = len(site.requests)
    again = run_stage(store, CRAWL, config(base), [])
    assert again.status == "skipped" and again.ref == outcome.ref and len(site.requests) == before


def test_private_addresses_are_refused_unless_allowed(store, site_server):
    site, base = site_server()
    refused = run_stage(store, CRAWL, config(base, allow_private_hosts=False), [])
    assert refused.stats["outcomes"] == {"private_address": 1}
    assert site.requests == []  # refused on the resolved address, before connecting
    by_name = base.replace("127.0.0.1", "localhost")  # a hostname is checked on what it resolves to
    refused = run_stage(store, CRAWL, config(by_name, allow_private_hosts=False), [])
    assert refused.stats["outcomes"] == {"private_address": 1} and site.requests == []
    allowed = run_stage(store, CRAWL, config(base, allow_private_hosts=True, max_pages=1), [])
    assert allowed.stats["stored"] == 1


@pytest.mark.parametrize(
    "address, forbidden",
    [
        ("127.0.0.1", True), ("10.1.2.3", True), ("172.16.0.1", True), ("192.168.1.1", True),
        ("169.254.169.254", True), ("100.64.0.1", True), ("0.0.0.0", True), ("::1", True),
        ("fd00:ec2::254", True), ("fe80::1", True), ("::ffff:127.0.0.1", True), ("224.0.0.1", True),
        ("8.8.8.8", False), ("2001:4860:4860::8888", False), ("not-an-ip", True),
    ],
)
def test_address_classification(address, forbidden):
    assert forbidden_address(address) is forbidden


# ---------------------------------------------------------------- re-crawl and resume


def test_recrawl_with_etag_stores_nothing_new(store, site_server):
    site, base = site_server()
    first = run_stage(store, CRAWL, config(base, snapshot="day-1"), [])
    stored_first = {url for url, row in pages(store, first.ref).items() if row["outcome"] == "stored"}
    site.requests.clear()

    second = run_stage(store, CRAWL, config(base, snapshot="day-2", refresh_from="latest"), [])
    assert second.ref.version != first.ref.version and second.stats["refreshed_from"] == first.ref.version
    rows = pages(store, second.ref)
    # every page stored before was asked for conditionally and came back 304: nothing stored again
    conditional = {base[:-1] + path for _, path, headers in site.requests if "If-None-Match" in headers}
    unchanged = {url for url, row in rows.items() if row["outcome"] == "unchanged"}
    assert conditional == unchanged == stored_first
    assert second.stats["stored"] == 0 and second.stats["bytes_stored"] == 0
    # the pages only linked from unchanged pages were still reached, through the remembered links
    assert set(rows) == set(pages(store, first.ref))
    kinds = [kind for kind, *_ in warc_records(store, second.ref)]
    assert "response" not in kinds and kinds.count("revisit") == len(unchanged)
    ingested = run_stage(store, INGEST_WARC, config(base, snapshot="day-2"), [second.ref])
    assert ingested.stats["skipped"]["revisit"] == len(unchanged)

    # a page that changed is stored again, the rest stays unchanged
    site.revision = 1
    third = run_stage(store, CRAWL, config(base, snapshot="day-3", refresh_from=second.ref.version), [])
    rows = pages(store, third.ref)
    assert rows[base + "b.html"]["outcome"] == "stored"
    assert rows[base + "a.html"]["outcome"] == "unchanged"  # validators carried through the second crawl


def test_interrupted_crawl_resumes_without_fetching_again(store, site_server, monkeypatch):
    site, base = site_server()
    cfg = config(base, warc_file_bytes=1024, concurrency=1, max_bytes=4096)
    monkeypatch.setenv("LMF_FAULT", "crawl:after_file:4:fail")  # dies once two parts are complete
    with pytest.raises(InjectedFault):
        run_stage(store, CRAWL, cfg, [])
    done_before = [path for _, path, _ in site.requests if path != "/robots.txt"]
    monkeypatch.delenv("LMF_FAULT")
    site.requests.clear()
    outcome = run_stage(store, CRAWL, cfg, [])
    rows = pages(store, outcome.ref)
    resumed = [path for _, path, _ in site.requests if path != "/robots.txt"]
    assert len(done_before) >= 2 and resumed
    # pages of the completed parts were not requested again (only the one in flight may be)
    assert len(set(done_before) & set(resumed)) <= 1
    assert outcome.stats["warc_files"] >= 3 and outcome.stats["pages"] == len(rows)
    fresh = run_stage(store, CRAWL, config(base, warc_file_bytes=1024, concurrency=1, max_bytes=4096, snapshot="clean"), [])
    assert set(rows) == set(pages(store, fresh.ref))


# ---------------------------------------------------------------- pure parts


def test_robots_rules_follow_rfc9309():
    rules = parse_robots(
        "User-agent: *\nDisallow: /\n\nUser-agent: lmfoundry-crawler\nUser-agent: other\n"
        "Disallow: /docs/\nAllow: /docs/public\nDisallow: /*.pdf$\nCrawl-delay: 0.5\n",
        "lmfoundry-crawler/0.1",
    )
    assert rules.crawl_delay == 0.5
    assert rules.allows("http://h/") and rules.allows("http://h/docs/public/x.html")
    assert not rules.allows("http://h/docs/private") and not rules.allows("http://h/a/b.pdf")
    assert rules.allows("http://h/a/b.pdf?x=1") and rules.allows("http://h/robots.txt")
    assert not parse_robots("User-agent: *\nDisallow: /\n", "lmfoundry-crawler/0.1").allows("http://h/x")
    assert parse_robots("User-agent: *\nDisallow:\n", "x").allows("http://h/x")


def test_url_normalisation():
    assert normalize_url("HTTP://Example.COM:80/a/./b/../c.html#frag") == "http://example.com/a/c.html"
    assert normalize_url("../x y.html", "https://h.org/a/b/") == "https://h.org/a/x%20y.html"
    assert normalize_url("https://user:pw@h.org:443") == "https://h.org/"
    assert normalize_url("mailto:someone@h.org") is None and normalize_url("javascript:void(0)") is None


def test_demo_site_placeholder_crawls_the_local_site(store):
    cfg = PipelineConfig.model_validate({"crawl": {"seeds": ["{demo_site}"], "allow_private_hosts": True, "delay_s": 0, "max_pages": 12}})
    outcome = run_stage(store, CRAWL, cfg, [])
    assert outcome.stats["stored"] == 12
    urls = [url for kind, url, *_ in warc_records(store, outcome.ref) if kind == "response"]
    assert any("/topics/" in url for url in urls)


def test_no_seeds_is_an_empty_crawl(store):
    outcome = run_stage(store, CRAWL, PipelineConfig(), [])
    assert outcome.stats["pages"] == 0 and outcome.stats["warc_files"] == 0
    ingested = run_stage(store, INGEST_WARC, PipelineConfig(), [outcome.ref])
    assert ingested.stats["records_out"] == 0
