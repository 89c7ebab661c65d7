"""A small local website for the demo crawl, generated from files every Python has.

Pages are the Python reference manual's help topics (``pydoc_data.topics``, the text behind
``help("if")``), archived copies of every fourth topic (an earlier release's page: the same
text under a banner, the near-duplicates a documentation crawl meets) and the docstrings of
some standard-library modules, each wrapped in a
typical site layout: a navigation bar, a sidebar of related pages and a footer (boilerplate
that extraction must drop). ``robots.txt`` disallows ``/search``, which pages link to.
The server answers conditional requests (ETag / Last-Modified -> 304), so a demo re-crawl
stores nothing new.

    with demo_site() as url:          # http://127.0.0.1:8765/ (another free port if taken)
        ...
    url, stop = serve_demo_site(); ...; stop()
    python -m lmfoundry.tasks.acquire.demo_site [DIR]   # write the pages as files instead

The crawl stage serves it itself when ``crawl.seeds`` holds ``"{demo_site}"``.
"""
from __future__ import annotations

import contextlib
import hashlib
import html
import importlib
import inspect
import logging
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger("lmfoundry.demo_site")

DEMO_PORT = 8765  # a fixed port keeps page URLs, and so re-crawl validators, stable across runs
LAST_MODIFIED = "Mon, 01 Jan 2024 00:00:00 GMT"
MODULES = [
    "json", "csv", "argparse", "collections", "functools", "itertools", "pathlib", "re", "string",
    "textwrap", "logging", "datetime", "decimal", "fractions", "statistics", "random", "heapq",
    "bisect", "difflib", "shlex", "zipfile", "tarfile", "sqlite3", "unittest", "typing",
]
ROBOTS_TXT = "User-agent: *\nDisallow: /search\n"
HEADING_UNDERLINE = re.compile(r"^([*=\-~^])\1{2,}$")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "page"


def prose_to_html(text: str) -> tuple[str, str]:
    """reST-like help text -> (title, HTML body): underlined headings, indented code, paragraphs."""
    lines = text.strip("\n").splitlines()
    title = lines[0].strip() if lines else "Untitled"
    blocks, paragraph, code = [], [], []

    def close_paragraph() -> None:
        if paragraph:
            blocks.append(f"<p>{html.escape(' '.join(paragraph))}</p>")
            paragraph.clear()

    def close_code() -> None:
        if code:
            blocks.append(f"<pre><code>{html.escape(chr(10).join(code).rstrip())}</code></pre>")
            code.clear()

    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if HEADING_UNDERLINE.match(line.strip()):
            continue
        if HEADING_UNDERLINE.match(nxt.strip()) and line.strip():
            close_paragraph(), close_code()
            blocks.append(f"<h{1 if i == 0 else 2}>{html.escape(line.strip())}</h{1 if i == 0 else 2}>")
        elif line.startswith("   ") and (code or not paragraph):
            code.append(line[3:])
        elif not line.strip():
            close_paragraph()
            if code:
                code.append("")
        else:
            close_code()
            paragraph.append(line.strip())
    close_paragraph(), close_code()
    if not blocks or not blocks[0].startswith("<h1>"):
        blocks.insert(0, f"<h1>{html.escape(title)}</h1>")
    return title, "\n".join(blocks)


def module_text(name: str) -> str | None:
    """A help-like text for a stdlib module: its docstring and its public functions' docstrings."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None
    parts = [f"The {name} module", "*" * 20, "", inspect.getdoc(module) or ""]
    for attr in sorted(getattr(module, "__all__", None) or dir(module))[:25]:
        obj = getattr(module, attr, None)
        if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        doc = inspect.getdoc(obj)
        if doc:
            parts += ["", f"{name}.{attr}", "=" * 10, "", doc]
    return "\n".join(parts)


def layout(title: str, body: str, related: list[tuple[str, str]]) -> str:
    nav = " ".join(f'<li><a href="{href}">{html.escape(label)}</a></li>' for href, label in [
        ("/", "Home"), ("/topics.html", "Language reference"), ("/modules.html", "Library modules"), ("/search?q=python", "Search"),
    ])
    side = "\n".join(f'<li><a href="{href}">{html.escape(label)}</a></li>' for href, label in related)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)} - Python notes</title></head>
<body>
<header class="site-header"><nav class="menu"><ul>{nav}</ul></nav></header>
<div class="layout">
<aside class="sidebar"><h3>Related pages</h3><ul>{side}</ul></aside>
<main><article>
{body}
</article></main>
</div>
<footer class="footer"><p>Generated by lmfoundry's demo site from Python's own documentation. Copyright Python Software Foundation.</p>
<p><a href="/">Home</a> | <a href="/search?q=privacy">Privacy</a></p></footer>
</body></html>
"""


def build_site(modules: list[str] = MODULES) -> dict[str, bytes]:
    """path -> page bytes for the whole site (deterministic for one Python version)."""
    from pydoc_data.topics import topics

    sources = [(f"/topics/{slug(k)}.html", topics[k]) for k in sorted(topics)]
    sources += [(f"/modules/{slug(m)}.html", text) for m in modules if (text := module_text(m))]
    rendered = [(path, *prose_to_html(text)) for path, text in sources]
    # like versioned documentation sites, every fourth topic keeps an archived copy of an earlier
    # release: the same text under a banner, a near-duplicate for near_dedup to find
    archived = {path: f"/archive{path}" for path, _, _ in rendered if path.startswith("/topics/")}
    archived = {path: copy for i, (path, copy) in enumerate(sorted(archived.items())) if i % 4 == 0}
    pages: dict[str, bytes] = {}
    for i, (path, title, body) in enumerate(rendered):
        related = [(p, t) for p, t, _ in rendered[i + 1 : i + 6]] or [(p, t) for p, t, _ in rendered[:5]]
        if path in archived:
            related.append((archived[path], f"{title} (earlier release)"))
            # the note is part of the article (extraction keeps it), so the copy is near, not exact
            note = f'<p>This copy describes an earlier release of Python; later changes are on <a href="{path}">the current page</a>.</p>'
            pages[archived[path]] = layout(f"{title} (archived)", body.replace("</h1>", "</h1>" + note, 1), related[:1]).encode()
        pages[path] = layout(title, body, related).encode()
    topic_links = [(p, t) for p, t, _ in rendered if p.startswith("/topics/")]
    module_links = [(p, t) for p, t, _ in rendered if p.startswith("/modules/")]
    index_list = lambda links: "<ul>" + "".join(f'<li><a href="{p}">{html.escape(t)}</a></li>' for p, t in links) + "</ul>"
    pages["/topics.html"] = layout("Language reference", "<h1>Language reference</h1>" + index_list(topic_links), []).encode()
    pages["/modules.html"] = layout("Library modules", "<h1>Library modules</h1>" + index_list(module_links), []).encode()
    pages["/"] = layout(
        "Python notes",
        "<h1>Python notes</h1><p>Notes on the Python language and its standard library, generated from the "
        "documentation that ships with Python itself.</p>"
        '<p>Start with the <a href="/topics.html">language reference</a> or the <a href="/modules.html">library modules</a>.</p>',
        topic_links[:5],
    ).encode()
    return pages


def write_site(directory: str | Path, modules: list[str] = MODULES) -> list[Path]:
    """Write the site as files (index.html for '/') plus robots.txt; returns the paths."""
    root = Path(directory)
    written = []
    for path, data in {**build_site(modules), "/robots.txt": ROBOTS_TXT.encode()}.items():
        target = root / (path.lstrip("/") or "index.html")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written.append(target)
    return written


def make_handler(pages: dict[str, bytes]) -> type[BaseHTTPRequestHandler]:
    etags = {path: '"' + hashlib.sha1(data).hexdigest()[:16] + '"' for path, data in pages.items()}

    class Handler(BaseHTTPRequestHandler):
        server_version = "lmfoundry-demo/1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/robots.txt":
                return self.reply(200, ROBOTS_TXT.encode(), "text/plain")
            if path not in pages:
                return self.reply(404, b"<html><body><h1>Not found</h1></body></html>", "text/html")
            etag = etags[path]
            if self.headers.get("If-None-Match") == etag or (
                "If-None-Match" not in self.headers and self.headers.get("If-Modified-Since") == LAST_MODIFIED
            ):
                return self.reply(304, b"", None, etag)
            self.reply(200, pages[path], "text/html; charset=utf-8", etag)

        def reply(self, status: int, body: bytes, content_type: str | None, etag: str | None = None) -> None:
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
            if etag:
                self.send_header("ETag", etag)
                self.send_header("Last-Modified", LAST_MODIFIED)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body:
                self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # quiet: the crawl logs what matters
            log.debug("demo site: " + format, *args)

    return Handler


def serve_demo_site(port: int = DEMO_PORT, modules: list[str] = MODULES) -> tuple[str, Callable[[], None]]:
    """Serve the site on 127.0.0.1 in a background thread; returns (base URL, stop)."""
    handler = make_handler(build_site(modules))
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError:
        log.info("demo site: port %d is taken; using a free port (page URLs will differ from earlier runs)", port)
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="demo-site", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return f"http://127.0.0.1:{server.server_address[1]}/", stop


@contextlib.contextmanager
def demo_site(port: int = DEMO_PORT) -> Iterator[str]:
    url, stop = serve_demo_site(port)
    try:
        yield url
    finally:
        stop()


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "demo-site"
    print(f"wrote {len(write_site(target))} files under {target}/")
