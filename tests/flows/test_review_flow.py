"""The review gate against a real Prefect server: the end-to-end flow (as `lmf run` starts it) pauses at review_docs with a typed form,
resume_flow_run(run_input=...) answers it, the rejected document is gone from what tokenize read,
the decisions are in the store; a forced rerun with the same items does not pause; a gate nobody
answers goes on with the machine labels (proceed_machine_labels) and says so."""
from __future__ import annotations

import json
import threading

from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings

from lmfoundry.flows.end_to_end import end_to_end
from lmfoundry.infra.config import build_config
from lmfoundry.infra.docs import iter_docs
from lmfoundry.infra.store import Store
from lmfoundry.tasks.review.decisions import read_batches
from tests.flows.corpus import config_data, make_corpus
from tests.flows.server import wait_for


def paused_run(client):
    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
    return runs[0] if runs else None


def run_flow(server, cfg, until, **kwargs):
    """The end-to-end flow in this process, against the real server (a flow run, as `lmf run` makes)."""
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        state = end_to_end(config=cfg, until=until, return_state=True, **kwargs)
    assert state.is_completed(), state
    return state.state_details.flow_run_id


def state_types(client, run_id):
    return [s.type for s in client.read_flow_run_states(run_id)]


def test_pause_resume_with_decisions_then_reuse_then_timeout(prefect_server, tmp_path):
    data = config_data(make_corpus(tmp_path / "corpus"), tmp_path / "store", pipeline="review")
    data["review_docs"] = {"enabled": True, "top_k": 2, "random_k": 1, "poll_s": 1}
    cfg = build_config(data)
    store = Store(str(tmp_path / "store"))
    answered = {}

    def reviewer():  # a person at the UI, played by the API the UI calls
        with prefect_server.client() as client:
            paused = wait_for(lambda: paused_run(client), 150, interval=0.5, what="a paused run")
        sample = store.reader(store.ref("annotate_docs", store.get_ref("review", "annotate_docs"))).read_json("sample.json")
        answer = {"reviewer": "rita", "item_01": "reject", "item_01_reason": "boilerplate",
                  "item_02": "relabel", "item_02_relabel": "quality=low", "item_03": "approve"}
        with temporary_settings({PREFECT_API_URL: prefect_server.api_url}):
            resume_flow_run(paused.id, run_input=answer)
        answered.update(sample=sample, run_id=paused.id)

    thread = threading.Thread(target=reviewer, daemon=True)
    thread.start()
    run_id = run_flow(prefect_server, cfg, "tokenize")
    thread.join(5)
    sample = answered["sample"]
    assert answered["run_id"] == run_id and len(sample["items"]) == 3
    doomed, relabelled = sample["items"][0], sample["items"][1]
    with prefect_server.client() as client:
        assert StateType.PAUSED in state_types(client, run_id)

    # the decisions are in the store: the log, and the review version's decisions.json
    (batch,) = read_batches(store, "docs")
    assert batch.source == "prefect-ui" and batch.reviewer == "rita" and batch.flow_run_id == str(run_id)
    assert [(d.item_id, d.decision, d.labels) for d in batch.decisions] == [
        (doomed["item_id"], "reject", {}), (relabelled["item_id"], "relabel", {"quality": "low"}), (sample["items"][2]["item_id"], "approve", {})]
    review = store.ref("review_docs", store.get_ref("review", "review_docs"))
    applied = store.reader(review).read_json("decisions.json")
    assert {d["item_id"]: d["decision"] for d in applied["applied"]} == {it["item_id"]: d for it, d in zip(sample["items"], ("reject", "relabel", "approve"))}
    assert applied["gate"][0]["source"] == "prefect-ui" and applied["gate"][0]["decided"] == 3
    # downstream: tokenize read the review's output, without the rejected document
    kept = {d["id"]: d for d in iter_docs(store, [review])}
    assert doomed["item_id"] not in kept and json.loads(kept[relabelled["item_id"]]["meta"])["labels"]["quality"] == "low"
    tokenize = store.manifest("tokenize", store.get_ref("review", "tokenize"))
    assert review.version in {ref["version"] for ref in tokenize["inputs"]} and tokenize["stats"]["docs_in"] == len(kept) == sample["population"] - 1

    # the same items again (a forced review): decided already, so no pause
    again = run_flow(prefect_server, cfg, "review_docs", force=["review_docs"])
    assert len(read_batches(store, "docs")) == 1 and store.get_ref("review", "review_docs") != review.version
    with prefect_server.client() as client:
        assert StateType.PAUSED not in state_types(client, again)

    # a bigger sample nobody answers: after timeout_s the run goes on with machine labels only
    late_cfg = build_config(data, ["review_docs.random_k=4", "review_docs.on_timeout=proceed_machine_labels", "review_docs.timeout_s=3"])
    late = run_flow(prefect_server, late_cfg, "review_docs")
    gate = read_batches(store, "docs")[-1]
    assert gate.source == "timeout" and gate.policy == "proceed_machine_labels" and gate.unanswered and not gate.decisions
    assert gate.flow_run_id == str(late)
    late_review = store.ref("review_docs", store.get_ref("review", "review_docs"))
    recorded = store.reader(late_review).read_json("decisions.json")
    assert recorded["gate"][0]["policy"] == "proceed_machine_labels" and recorded["gate"][0]["unanswered"] == gate.unanswered
    assert {d["item_id"] for d in recorded["applied"]} == {it["item_id"] for it in sample["items"]}  # rita's decisions still apply
    with prefect_server.client() as client:
        assert StateType.PAUSED in state_types(client, late)
