"""`lmf run --plan` / `lmf status` rows: the version this config produces, what changed, what may change."""
from __future__ import annotations

from lmfoundry.infra.config import build_config
from lmfoundry.infra.stage import StageSpec, plan, run_stage
from tests.infra.test_store import run_numbers  # noqa: F401  (the stage function the specs name)

CODE_VERSION = "1"
FIRST = StageSpec("numbers", "tests.infra.test_store:run_numbers", section="exact_dedup")
SECOND = StageSpec("more", "tests.infra.test_store:run_numbers", section="near_dedup", inputs=("numbers",))


def test_stale_rows_name_the_changed_field_and_downstream_may_change(store):
    config = build_config({"store": {"url": store.url, "pipeline": "p"}})
    first = run_stage(store, FIRST, config, [])
    run_stage(store, SECOND, config, [first.ref])
    assert [row.action for row in plan(store, [FIRST, SECOND], config)] == ["skip", "skip"]

    changed = build_config({"store": {"url": store.url, "pipeline": "p"}}, ["exact_dedup.normalize=none"])
    numbers, more = plan(store, [FIRST, SECOND], changed)
    assert numbers.action == "run" and numbers.current == first.ref.version and numbers.version != first.ref.version
    assert numbers.reason == f"changed since {first.ref.version}: exact_dedup.normalize 'nfkc_lower_whitespace' -> 'none'"
    assert more.action == "run (upstream changes)" and more.reason.startswith("may change")


def test_rows_show_this_configs_version_even_when_the_ref_moved(store):
    plain = build_config({"store": {"url": store.url, "pipeline": "p"}})
    other = build_config({"store": {"url": store.url, "pipeline": "p"}}, ["exact_dedup.normalize=none"])
    mine = run_stage(store, FIRST, plain, []).ref.version
    theirs = run_stage(store, FIRST, other, []).ref.version  # the ref now points at the override run
    (row,) = plan(store, [FIRST], plain)
    assert (row.action, row.version, row.current) == ("skip", mine, theirs)
