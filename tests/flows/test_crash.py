"""A crashed host: kill -9 everything `lmf serve` started in the middle of a training, the run
turns Crashed within the heartbeat window, and Retry (the UI's state change) from a new serve
finishes it from the committed stages and the last checkpoint.

Run: .venv/bin/pytest -q tests/flows/test_crash.py   (about 3 minutes; most of it is waiting)
"""
from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime, timezone

import psutil
import pytest
import yaml
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, DeploymentFilter, DeploymentFilterName
from prefect.client.schemas.objects import StateType
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import State

from lmfoundry.flows import crash_detection as crashes
from lmfoundry.flows.data_refresh import data_stages
from lmfoundry.flows.deploy import DeploymentFileError
from lmfoundry.infra.config import load_config
from lmfoundry.infra.store import Store
from tests.flows.corpus import config_data, make_corpus
from tests.flows.server import REPO, start_serve, stop_process, wait_for

WINDOW_S = 45  # crashed_after_seconds for this test: 1.5 heartbeats of 30 s
REFUSED_FOR_S = 60  # a new `lmf serve` is refused this long after the killed one's last poll


def test_config_is_checked_and_job_variables_keep_the_pool_env():
    assert crashes.crash_detection({}) == crashes.CrashDetection(enabled=True, heartbeat_seconds=30, crashed_after_seconds=90)
    with pytest.raises(DeploymentFileError, match=r"x.yaml: lmfoundry.crash_detection is wrong \(heartbeat_seconds: .*greater than or equal to 30"):
        crashes.crash_detection({"lmfoundry": {"crash_detection": {"heartbeat_seconds": 10}}}, "x.yaml")
    with pytest.raises(DeploymentFileError, match="crashed_after_seconds=40 must be at least 1.5 x heartbeat_seconds"):
        crashes.crash_detection({"lmfoundry": {"crash_detection": {"crashed_after_seconds": 40}}})
    with pytest.raises(DeploymentFileError, match="crash_detection.every: Extra inputs are not permitted|every: Extra inputs"):
        crashes.crash_detection({"lmfoundry": {"crash_detection": {"every": 5}}})
    on = crashes.CrashDetection(heartbeat_seconds=40, crashed_after_seconds=120)
    merged = crashes.heartbeat_job_variables({"env": {"A": "1"}, "cpu": 2}, {"DS_ACCELERATOR": "cuda", "A": "0"}, on)
    assert merged == {"env": {"DS_ACCELERATOR": "cuda", "A": "1", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "40"}, "cpu": 2}
    assert crashes.with_heartbeat_tag(["lmfoundry"], on) == ["lmfoundry", "lmf-heartbeat"]
    off = crashes.CrashDetection(enabled=False)
    assert crashes.heartbeat_job_variables(None, {}, off) is None and crashes.with_heartbeat_tag(["x"], off) == ["x"]


def test_killed_host_turns_crashed_and_retry_resumes_from_the_checkpoint(prefect_server, tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    data = config_data(corpus, tmp_path / "store", pipeline="crash")
    data["pretrain"].update(steps=4, checkpoint_every=2, eval_every=4)
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump(data, sort_keys=False))
    prefect_file = tmp_path / "prefect.yaml"  # the real deployment file with a shorter window
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    spec["lmfoundry"]["crash_detection"]["crashed_after_seconds"] = WINDOW_S
    prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    args = ["--prefect-file", str(prefect_file), "--config", str(preset), "--only", "end-to-end", "--no-schedules"]
    arm = tmp_path / "arm"  # the training's rank 0 sleeps right after checkpoint step 2 while this exists
    arm.touch()
    serve = start_serve(prefect_server, args, tmp_path / "serve-1.log", LMF_FAULT=f"pretrain:after_checkpoint:2:sleep:{arm}")
    store = Store(str(tmp_path / "store"))
    again = None
    with prefect_server.client() as client:
        try:
            deployment = wait_for(lambda: _deployment(client), 120, what=f"the served deployment (log: {tmp_path / 'serve-1.log'})")
            assert crashes.HEARTBEAT_TAG in deployment.tags
            _check_automation(client)
            run = client.create_flow_run_from_deployment(deployment.id, parameters={"until": "pretrain"})
            checkpoint = tmp_path / "store" / "stages" / "pretrain"
            wait_for(
                lambda: not arm.exists() and list(checkpoint.glob("*/_markers/checkpoints/step-0000002/COMPLETE.json.json")),
                240, what=f"checkpoint step 2 in the store (log: {tmp_path / 'serve-1.log'})",
            )
            # heartbeats every 30 s (not Prefect's default 180 s), tagged for the automation
            beats = wait_for(lambda: (lambda b: b if len(b) >= 2 else None)(_heartbeats(client, run.id)), 40, what="two heartbeats")
            assert 29 <= (beats[1].occurred - beats[0].occurred).total_seconds() <= 40, [b.occurred for b in beats]
            assert f"prefect.tag.{crashes.HEARTBEAT_TAG}" in {r.id for r in beats[0].related}
            assert len(_kill_tree(serve)) >= 4  # the host dies: the runner, the flow run's process, the launcher, the rank
            killed = time.monotonic()
            assert client.read_flow_run(run.id).state.is_running()

            state = wait_for(lambda: _state_if(client, run.id, StateType.CRASHED), WINDOW_S + 35, what="the Crashed state")
            crashed_after = time.monotonic() - killed
            print(f"Crashed {crashed_after:.1f} s after the kill (window {WINDOW_S} s, heartbeat 30 s)")
            assert "No heartbeat for 45 s" in state.message and "Retry" in state.message

            # Retry, as the UI's button does it
            result = client.set_flow_run_state(run.id, State(type=StateType.SCHEDULED, name="AwaitingRetry", message="Retry from the UI"), force=False)
            assert result.status.value == "ACCEPT", result
            wait_for(lambda: _seconds_since(_deployment(client).last_polled) > REFUSED_FOR_S + 1, REFUSED_FOR_S + 5, what="the killed serve's release")
            again = start_serve(prefect_server, args, tmp_path / "serve-2.log")
            done = wait_for(lambda: _final(client, run.id), 240, what=f"the retried run (log: {tmp_path / 'serve-2.log'})")
            assert done.is_completed(), (tmp_path / "serve-2.log").read_text()[-3000:]
            assert client.read_flow_run(run.id).run_count == 2

            actions = _summary_actions(client, run.id)  # only the retry got to publish one
            cfg = load_config(preset)
            assert all(actions[s.name] == ("skipped" if s.enabled(cfg) else "disabled") for s in data_stages()), actions
            assert actions["pretrain"] == "ran"
            for s in data_stages():
                assert len(store.versions(s.name)) == (1 if s.enabled(cfg) else 0), s.name  # nothing computed twice
            version = store.get_ref("crash", "pretrain")
            assert store.manifest("pretrain", version)["stats"]["resumed_from_step"] == 2

            # a changed window updates the automation of that name in place
            with temporary_settings({PREFECT_API_URL: str(client.api_url).rstrip("/")}):
                assert crashes.ensure_crash_automation(crashes.CrashDetection()) == "updated"
            [automation] = client.read_automations_by_name(crashes.AUTOMATION_NAME)
            assert automation.trigger.within.total_seconds() == 90
        finally:
            if serve.poll() is None:  # failed before the kill: do not leave a sleeping rank behind
                _kill_tree(serve)
            if again is not None:
                stop_process(again)
            found = _deployment(client)
            if found:
                client.delete_deployment(found.id)


def _check_automation(client) -> None:
    """The serve created the automation once, with the window of its deployment file, and
    applying the same settings again changes nothing."""
    automations = client.read_automations_by_name(crashes.AUTOMATION_NAME)
    assert len(automations) == 1
    trigger = automations[0].trigger
    assert trigger.within.total_seconds() == WINDOW_S and trigger.posture == "Proactive"
    assert trigger.after == {"prefect.flow-run.heartbeat"} and "prefect.flow-run.Completed" in trigger.expect
    assert trigger.match_related.root == {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{crashes.HEARTBEAT_TAG}"}
    assert automations[0].actions[0].state == StateType.CRASHED
    with temporary_settings({PREFECT_API_URL: str(client.api_url).rstrip("/")}):
        assert crashes.ensure_crash_automation(crashes.CrashDetection(crashed_after_seconds=WINDOW_S)) == "unchanged"


def _kill_tree(process) -> list:
    """SIGKILL a process and all its descendants (whatever session they started), as a host crash would."""
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for member in family:
        try:
            os.kill(member.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    return family


def _heartbeats(client, run_id) -> list:
    found = EventFilter(event=EventNameFilter(name=["prefect.flow-run.heartbeat"]), resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]))
    return sorted(client.read_events(filter=found, limit=50).events, key=lambda e: e.occurred)


def _seconds_since(moment) -> float:
    return (datetime.now(timezone.utc) - moment).total_seconds()


def _deployment(client):
    found = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["end-to-end"])))
    return found[0] if found else None


def _state_if(client, run_id, state_type):
    state = client.read_flow_run(run_id).state
    return state if state is not None and state.type == state_type else None


def _final(client, run_id):
    state = client.read_flow_run(run_id).state
    return state if state is not None and state.is_final() else None


def _summary_actions(client, run_id) -> dict[str, str]:
    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    table = next(a for a in artifacts if a.key == "crash-run-summary")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    return {row["stage"]: row["action"] for row in rows}
