"""The flows on the real pipeline (a tiny corpus) under the Prefect test harness."""
from __future__ import annotations

import json
import threading

import pytest

from lmfoundry.flows.data_refresh import data_refresh, data_stages
from lmfoundry.flows.end_to_end import end_to_end
from lmfoundry.flows.params import DataRerun
from lmfoundry.flows.pretrain import pretrain
from lmfoundry.flows.stage_task import MissingUpstream
from lmfoundry.infra.faults import InjectedFault
from lmfoundry.infra.snapshots import read_snapshot
from lmfoundry.infra.store import Store
from lmfoundry.infra.config import load_config
from tests.flows.corpus import enabled_data_stages, expected_actions, make_config, make_corpus, write_preset

DATA_STAGES = [spec.name for spec in data_stages()]


@pytest.fixture
def preset(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    return write_preset(tmp_path / "preset.yaml", corpus, tmp_path / "store")


def store_of(tmp_path) -> Store:
    return Store(str(tmp_path / "store"))


def latest_table(key: str) -> list[dict] | None:
    """Rows of the newest table artifact with this key."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), limit=50)
    if not found:
        return None
    data = max(found, key=lambda a: a.created).data
    return json.loads(data) if isinstance(data, str) else data


def test_data_refresh_commits_then_reuses_everything(prefect_harness, preset, tmp_path):
    cfg = load_config(preset)
    first = data_refresh(preset=str(preset), snapshot="first")
    assert first["changed"] is True
    assert first["ran"] == enabled_data_stages(cfg)
    second = data_refresh(preset=str(preset), snapshot="second")
    assert second == {**second, "changed": False, "ran": [], "pretrain_run": None}
    assert second["versions"] == first["versions"]
    store = store_of(tmp_path)
    for name in enabled_data_stages(cfg):
        assert len(store.versions(name)) == 1, name
    assert read_snapshot(store, "test", "first")["stages"] == read_snapshot(store, "test", "second")["stages"] == first["versions"]
    summary = latest_table("test-run-summary")
    assert [row["action"] for row in summary] == expected_actions(cfg, "skipped")


def test_plan_only_runs_nothing_and_publishes_a_table(prefect_harness, preset, tmp_path):
    result = data_refresh(preset=str(preset), plan_only=True)
    assert [row["stage"] for row in result["plan"]] == DATA_STAGES
    assert result["plan"][0]["action"] == "run" and result["plan"][0]["reason"] == "never run"
    assert store_of(tmp_path).stages() == []  # nothing ran
    table = latest_table("test-plan")
    assert [row["stage"] for row in table] == DATA_STAGES
    data_refresh(preset=str(preset))
    replanned = data_refresh(preset=str(preset), plan_only=True)
    assert {row["action"] for row in replanned["plan"]} <= {"skip", "disabled"}


def test_rerun_from_stage_with_force_recomputes_only_downstream(prefect_harness, preset, tmp_path):
    first = data_refresh(preset=str(preset))
    second = data_refresh(preset=str(preset), rerun=DataRerun(from_stage="exact_dedup", force=True))
    enabled = enabled_data_stages(load_config(preset))
    assert second["ran"] == enabled[enabled.index("exact_dedup"):]
    store = store_of(tmp_path)
    assert len(store.versions("ingest")) == 1  # read from the current ref, not recomputed
    assert second["versions"]["exact_dedup"] != first["versions"]["exact_dedup"]
    assert store.manifest("exact_dedup", second["versions"]["exact_dedup"])["digest"] == store.manifest("exact_dedup", first["versions"]["exact_dedup"])["digest"]


def test_rerun_from_stage_without_committed_upstream_names_what_to_run(prefect_harness, preset):
    with pytest.raises(MissingUpstream, match="stage 'ingest' has no committed version.*lmf run --until ingest"):
        data_refresh(preset=str(preset), rerun=DataRerun(from_stage="exact_dedup"))


def test_bad_override_fails_before_anything_runs(prefect_harness, preset, tmp_path):
    from lmfoundry.infra.config import ConfigError

    with pytest.raises(ConfigError, match="exact_dedup.normalize"):
        data_refresh(preset=str(preset), overrides=["exact_dedup.normalize=sideways"])
    assert store_of(tmp_path).stages() == []


def test_a_failed_run_resumes_without_recomputing_committed_stages(prefect_harness, preset, tmp_path, monkeypatch):
    arm = tmp_path / "arm-fault"
    arm.touch()
    monkeypatch.setenv("LMF_FAULT", f"exact_dedup:after_file:1:fail:{arm}")
    with pytest.raises(InjectedFault):
        data_refresh(preset=str(preset))
    assert not arm.exists()  # the fault fired once and disarmed itself
    store = store_of(tmp_path)
    ingest_manifest = store.manifest("ingest", store.versions("ingest")[0])
    result = data_refresh(preset=str(preset))
    enabled = enabled_data_stages(load_config(preset))
    assert result["ran"] == enabled[enabled.index("exact_dedup"):]  # ingest was committed by the failed attempt
    assert store.manifest("ingest", store.versions("ingest")[0]) == ingest_manifest
    assert store.manifest("exact_dedup", result["versions"]["exact_dedup"])["resumed_files"] >= 1


def test_end_to_end_keeps_the_cli_signature(prefect_harness, tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    cfg = make_config(corpus, tmp_path / "store")
    refs = end_to_end(config=cfg, until="ingest", force=[])
    assert list(refs)[-1] == "ingest" and refs["ingest"].stage == "ingest" and "exact_dedup" not in refs
    forced = end_to_end(config=cfg, until="ingest", force=["ingest"])
    assert forced["ingest"].version != refs["ingest"].version


def test_pretrain_reads_the_latest_data_refresh_refs(prefect_harness, preset, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with pytest.raises(MissingUpstream, match="stage 'tokenize' has no committed version"):
        pretrain(preset=str(preset))
    refresh = data_refresh(preset=str(preset))
    result = pretrain(preset=str(preset))
    assert result["ran"] == ["pretrain"]
    assert result["versions"]["tokenize"] == refresh["versions"]["tokenize"]  # read from the refresh's refs
    manifest = Store(str(tmp_path / "store")).manifest("pretrain", result["versions"]["pretrain"])
    assert [i["version"] for i in manifest["inputs"]] == [refresh["versions"]["tokenize"], refresh["versions"]["train_tokenizer"]]
    with get_client(sync_client=True) as client:
        curve = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pretrain-loss-curve"])))
    assert curve and "](data:image/png;base64," in curve[0].data
    assert pretrain(preset=str(preset))["ran"] == []  # unchanged data: the committed model is reused


# ------------------------------------------------------------------ the GPU slot


def _most_inside_at_once(limit_name: str | None, grace_s: float = 2.0) -> int:
    """Two stand-in training tasks at once, each holding the GPU slot guard; how many of them
    were inside the guard at the same time, at most.

    No clock decides the answer: a task inside the guard waits until the other task has
    started, then until the other is inside too (the answer is 2 at once, without a limit) or
    `grace_s` has passed (then it leaves). A slow machine can only make a broken guard harder
    to catch, never fail a working one."""
    from prefect import flow, task

    from lmfoundry.flows.pipeline import stage
    from lmfoundry.flows.stage_task import gpu_slot
    from lmfoundry.infra.config import ComputeConfig

    compute = ComputeConfig(gpu_concurrency_limit=limit_name)
    state = {"started": 0, "inside": 0, "most": 0}
    changed = threading.Condition()

    @task
    def fake_training() -> None:
        with changed:
            state["started"] += 1
            changed.notify_all()
        with gpu_slot(stage("pretrain"), compute):
            with changed:
                state["inside"] += 1
                state["most"] = max(state["most"], state["inside"])
                changed.notify_all()
                assert changed.wait_for(lambda: state["started"] == 2, timeout=120), "the second task never started"
                changed.wait_for(lambda: state["inside"] == 2, timeout=grace_s)
                state["inside"] -= 1
                changed.notify_all()

    @flow
    def two_trainings() -> None:
        futures = [fake_training.submit() for _ in range(2)]
        for future in futures:
            future.result()

    two_trainings()
    return state["most"]


def test_a_second_training_waits_for_the_gpu_slot(prefect_harness):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name("test-gpu-slots", 1)
    assert _most_inside_at_once("test-gpu-slots") == 1, "the second training started while the first held the only slot"
    # without the limit the same two tasks are inside together, so the check above can fail
    assert _most_inside_at_once(None) == 2


def test_a_training_stage_publishes_its_loss_curve(prefect_harness, tmp_path):
    from prefect import flow

    from lmfoundry.flows.stage_task import publish_artifacts
    from lmfoundry.infra.stage import StageOutcome

    store = Store(str(tmp_path / "store"))
    out = store.open_for_write("pretrain", "v1")
    out.write_bytes("metrics.jsonl", b'{"kind": "train", "step": 1, "loss": 5.1}\n{"kind": "val", "step": 1, "val_loss": 5.3}\n')
    ref = store.commit(out, {"stats": {"steps": 1}})

    @flow
    def publish():
        publish_artifacts(store, StageOutcome(ref=ref, status="ran", stats={"steps": 1}), seconds=2.0)

    publish()
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        curve = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pretrain-loss-curve"])))
    assert curve and curve[0].type == "markdown" and "](data:image/png;base64," in curve[0].data
    stats = latest_table("pretrain-stats")
    assert {"stat": "seconds", "value": "2.0"} in stats and {"stat": "steps", "value": "1"} in stats
