"""Same inputs, same versions: the demo crawl into two fresh stores gives byte-identical stages.

The crawl fetches the local demo site with requests in flight concurrently, so pages arrive
in a different order on every run, and WARC record ids used to be random. The capture time is
an input like the pages themselves (it is written as WARC-Date and carried as each document's
fetch_date, so two crawls an hour apart rightly differ): the test holds the clock still, at the
crawler and at the demo site's HTTP Date header, and checks that nothing else reaches a version.
"""
from __future__ import annotations

import http.server

from lmfoundry.flows.pipeline import stages_until
from lmfoundry.infra.config import load_config
from lmfoundry.infra.stage import run_stage
from lmfoundry.infra.store import Store
from lmfoundry.tasks.acquire import warc_parts

UNTIL = "near_dedup"


def run_pipeline(store: Store) -> dict[str, tuple[str, str]]:
    cfg = load_config(None, ['ingest.sources=[{"name": "code", "paths": ["{stdlib}/json/*.py"]}]'])
    refs, versions = {}, {}
    for spec in stages_until(UNTIL):
        outcome = run_stage(store, spec, cfg, [refs[name] for name in spec.inputs])
        refs[spec.name] = outcome.ref
        versions[spec.name] = (outcome.ref.version, outcome.ref.digest)
        if spec.name == "crawl":
            assert outcome.stats["stored"] > 100  # the whole demo site, fetched concurrently
    return versions


def test_the_demo_crawl_gives_the_same_version_of_every_stage_in_two_stores(tmp_path, monkeypatch):
    monkeypatch.setattr(warc_parts, "warc_date", lambda: "2026-01-01T00:00:00Z")
    monkeypatch.setattr(http.server.BaseHTTPRequestHandler, "date_time_string", lambda self, timestamp=None: "Thu, 01 Jan 2026 00:00:00 GMT")
    first = run_pipeline(Store(str(tmp_path / "one")))
    second = run_pipeline(Store(str(tmp_path / "two")))
    assert list(first) == [spec.name for spec in stages_until(UNTIL)]
    assert first == second  # (version, content digest) of every stage, the crawl included
