"""The Prefect UI in a real browser: run the data refresh from its form, see its artifacts,
make a run fail mid-stage and resume it with the UI's Retry button.

Classic UI pages (/deployments, /runs/flow-run/<id>); see tests/ui/conftest.py for the browser.
"""
from __future__ import annotations

from playwright.sync_api import expect
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

from lmfoundry.infra.snapshots import read_snapshot
from lmfoundry.infra.store import Store
from tests.flows.corpus import make_corpus, write_preset
from tests.flows.server import start_serve, stop_process, wait_for

SLOW = 120_000  # ms: a flow run starts a fresh Python process on a busy machine


def form_field(page, label: str):
    """The input area of a generated form field (labels are not linked to their inputs)."""
    return page.locator(".p-label").filter(has=page.get_by_text(label, exact=True))


def final_state(client, run_id):
    state = client.read_flow_run(run_id).state
    return state if state is not None and state.is_final() else None


def test_run_from_the_form_then_retry_a_failed_run(prefect_server, page, tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    preset = write_preset(tmp_path / "preset.yaml", corpus, tmp_path / "store")
    preset.write_text(preset.read_text().replace("pipeline: test", "pipeline: ui"))
    arm = tmp_path / "arm-fault"  # exists => the next exact_dedup run fails after its first file
    serve = start_serve(
        prefect_server,
        ["--config", str(preset), "--no-schedules"],
        tmp_path / "serve.log",
        LMF_FAULT=f"exact_dedup:after_file:1:fail:{arm}",
    )
    store = Store(str(tmp_path / "store"))
    ui = prefect_server.ui_url
    with prefect_server.client() as client:
        try:
            wait_for(lambda: _served(client), 120, what=f"served deployments (log: {tmp_path / 'serve.log'})")

            # 1. custom run from the deployment's form, with a changed parameter
            page.goto(f"{ui}/deployments")
            page.get_by_text("data-refresh", exact=True).first.click()
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Custom run").click()
            expect(form_field(page, "preset (Optional)").locator("textarea")).to_have_value(str(preset))
            form_field(page, "snapshot (Optional)").locator("textarea").fill("from-the-form")
            run_name = form_field(page, "Run Name").locator("input").input_value()
            page.get_by_role("button", name="Submit").click()
            run = wait_for(lambda: _run_named(client, run_name), 30, interval=0.5, what=f"flow run {run_name}")
            page.goto(f"{ui}/runs/flow-run/{run.id}")
            expect(page.locator(".state-badge").first).to_contain_text("Completed", timeout=SLOW)
            page.get_by_text("Artifacts", exact=True).click()
            for key in ("ui-run-summary", "ingest-stats", "exact-dedup-stats", "exact-dedup-manifest"):
                expect(page.get_by_text(key, exact=True).first).to_be_visible()
            assert read_snapshot(store, "ui", "from-the-form")["run_id"] == str(run.id)

            # 2. a run that fails mid-stage (a config change, so ingest commits anew first)
            arm.touch()
            deployment = client.read_deployment_by_name("data-refresh/data-refresh")
            failing = client.create_flow_run_from_deployment(
                deployment.id, parameters={"overrides": ["ingest.target_shard_bytes=2048"], "snapshot": "retried"}
            )
            state = wait_for(lambda: final_state(client, failing.id), SLOW / 1000, what="the failing run")
            assert state.is_failed() and "injected fault" in state.message
            ingest_version = store.get_ref("ui", "ingest")
            ingest_manifest = store.manifest("ingest", ingest_version)
            assert ingest_manifest["run_id"] == str(failing.id)

            # 3. Retry in the UI resumes the same flow run
            page.goto(f"{ui}/runs/flow-run/{failing.id}")
            expect(page.locator(".state-badge").first).to_contain_text("Failed")
            page.get_by_role("button", name="Retry").click()
            page.get_by_role("dialog").get_by_role("button", name="Retry").click()
            expect(page.locator(".state-badge").first).to_contain_text("Completed", timeout=SLOW)
            assert client.read_flow_run(failing.id).run_count == 2

            # committed stages were not recomputed; the failed one resumed from its done files
            assert store.manifest("ingest", ingest_version) == ingest_manifest
            dedup = store.manifest("exact_dedup", store.get_ref("ui", "exact_dedup"))
            assert dedup["run_id"] == str(failing.id) and dedup["resumed_files"] >= 1
            assert read_snapshot(store, "ui", "retried")["stages"]["ingest"] == ingest_version
        finally:
            stop_process(serve)


def _served(client):
    return {"data-refresh", "pretrain", "end-to-end"} <= {d.name for d in client.read_deployments()}


def _run_named(client, name):
    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    return runs[0] if runs else None
