"""The review gate in the real Prefect UI: the paused run shows its batch artifact, a reviewer
presses Resume, fills the typed form (reject one item with a reason, relabel another), submits;
the run completes without the rejected document downstream and the decisions are in the store.

See tests/ui/conftest.py for the browser; the flow runs in this process against the same server.
"""
from __future__ import annotations

import json
import threading

from playwright.sync_api import expect

from lmfoundry.infra.config import build_config
from lmfoundry.infra.docs import iter_docs
from lmfoundry.infra.store import Store
from lmfoundry.tasks.review.decisions import read_batches
from tests.flows.corpus import config_data, make_corpus
from tests.flows.server import wait_for
from tests.flows.test_review_flow import paused_run, run_flow
from tests.ui.test_prefect_ui import SLOW, form_field


def choose(page, label: str, option: str) -> None:
    """Pick an option of a generated form's select (a custom pop-over, not a native <select>; in
    the resume dialog a mouse click only focuses it, the arrow key opens its list)."""
    button = form_field(page, label).locator("button.p-select-button__control")
    button.focus()
    button.press("ArrowDown")
    page.get_by_role("option", name=option, exact=True).click()
    expect(button).to_have_text(option)


def test_review_a_batch_in_the_prefect_ui(prefect_server, page, tmp_path):
    data = config_data(make_corpus(tmp_path / "corpus"), tmp_path / "store", pipeline="review-ui")
    data["review_docs"] = {"enabled": True, "top_k": 2, "random_k": 1, "poll_s": 1}
    store = Store(str(tmp_path / "store"))
    finished = {}
    flow = threading.Thread(target=lambda: finished.update(run_id=run_flow(prefect_server, build_config(data), "tokenize")), daemon=True)
    flow.start()
    with prefect_server.client() as client:
        run = wait_for(lambda: paused_run(client), 150, interval=0.5, what="the run paused for review")
    sample = store.reader(store.ref("annotate_docs", store.get_ref("review-ui", "annotate_docs"))).read_json("sample.json")
    doomed, relabelled = sample["items"][0], sample["items"][1]

    page.goto(f"{prefect_server.ui_url}/runs/flow-run/{run.id}")
    expect(page.locator(".state-badge").first).to_contain_text("Paused")
    page.get_by_text("Artifacts", exact=True).click()
    expect(page.get_by_text("review-docs-batch", exact=True).first).to_be_visible()
    page.get_by_role("button", name="Resume").first.click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_text(f"{doomed['item_id']}:", exact=False).first).to_be_visible()  # each item is named in its field
    form_field(page, "Reviewer").locator("textarea").fill("uma")
    choose(page, "01 decision (Optional)", "reject")
    form_field(page, "01 reason (Optional)").locator("textarea").fill("navigation boilerplate")
    choose(page, "02 decision (Optional)", "relabel")
    form_field(page, "02 relabel (Optional)").locator("textarea").fill("quality=low")
    dialog.get_by_role("button", name="Submit").click()
    expect(page.locator(".state-badge").first).to_contain_text("Completed", timeout=SLOW)
    flow.join(30)
    assert finished["run_id"] == run.id

    (batch,) = read_batches(store, "docs")
    assert batch.reviewer == "uma" and batch.source == "prefect-ui" and batch.flow_run_id == str(run.id)
    decided = {d.item_id: (d.decision, d.labels, d.reason) for d in batch.decisions}
    assert decided[doomed["item_id"]] == ("reject", {}, "navigation boilerplate")
    assert decided[relabelled["item_id"]] == ("relabel", {"quality": "low"}, "")
    assert decided[sample["items"][2]["item_id"]] == ("approve", {}, "")
    review = store.ref("review_docs", store.get_ref("review-ui", "review_docs"))
    kept = {d["id"]: d for d in iter_docs(store, [review])}
    assert doomed["item_id"] not in kept and json.loads(kept[relabelled["item_id"]]["meta"])["labels"]["quality"] == "low"
    tokenize = store.manifest("tokenize", store.get_ref("review-ui", "tokenize"))
    assert review.version in {ref["version"] for ref in tokenize["inputs"]} and tokenize["stats"]["docs_in"] == len(kept)
