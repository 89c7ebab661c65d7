"""A served deployment on a short interval schedule: runs after the first skip all work,
and pretraining is chained only after the run that produced new data."""
from __future__ import annotations

import json
import subprocess

from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, DeploymentFilter, DeploymentFilterName, FlowRunFilter, FlowRunFilterDeploymentId

from lmfoundry.flows.data_refresh import data_stages
from lmfoundry.infra.store import Store
from lmfoundry.infra.config import load_config
from tests.flows.corpus import enabled_data_stages, expected_actions, make_corpus, write_preset
from tests.flows.server import VENV_BIN, start_serve, stop_process, wait_for

DATA_STAGES = [spec.name for spec in data_stages()]


def runs_of(client, deployment_id):
    return client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])), limit=200)


def summary_actions(client, run_id) -> list[str]:
    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    table = next(a for a in artifacts if a.key == "sched-run-summary")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    return [row["action"] for row in rows]


def test_interval_schedule_skips_all_work_when_nothing_changed(prefect_server, tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    preset = write_preset(tmp_path / "preset.yaml", corpus, tmp_path / "store")
    preset.write_text(preset.read_text().replace("pipeline: test", "pipeline: sched"))
    serve = start_serve(
        prefect_server,
        ["--config", str(preset), "--only", "data-refresh", "--only", "pretrain", "--schedule", "data-refresh=4", "--limit", "2"],
        tmp_path / "serve.log",
    )
    with prefect_server.client() as client:
        try:
            refresh = wait_for(lambda: _deployment(client, "data-refresh"), 90, what="the served data-refresh deployment")
            pretrain = wait_for(lambda: _deployment(client, "pretrain"), 30, what="the served pretrain deployment")
            assert refresh.schedules[0].schedule.interval.total_seconds() == 4
            assert refresh.schedules[0].parameters == {"then_pretrain": True}  # per-run parameters kept from prefect.yaml
            # a second serve of the same deployment is refused while the first one polls
            wait_for(lambda: _deployment(client, "data-refresh").last_polled, 30, what="the first serve's poll")
            second = subprocess.run(
                [str(VENV_BIN / "lmf"), "serve", "--config", str(preset), "--only", "data-refresh"],
                env=prefect_server.env(), capture_output=True, text=True, timeout=120,
            )
            assert second.returncode == 2 and "already being served" in second.stderr, second.stderr[-2000:]

            def runs_after_the_data_was_committed():
                done = {r.id: r for r in runs_of(client, refresh.id) if r.state_name == "Completed"}
                actions = {run_id: summary_actions(client, run_id) for run_id in done}
                committing = [done[i] for i, a in actions.items() if "ran" in a]
                if not committing:
                    return None
                committed_at = max(r.end_time for r in committing)
                later = [r for r in done.values() if r.start_time > committed_at]
                return (actions, committing, later) if len(later) >= 2 else None

            found = wait_for(runs_after_the_data_was_committed, 150, interval=2, what=f"2 runs after the first (serve log: {tmp_path / 'serve.log'})")
            actions, committing, later = found
            cfg = load_config(preset)
            for i, name in enumerate(DATA_STAGES):  # every enabled stage computed exactly once over all runs
                assert sum(a[i] == "ran" for a in actions.values()) == (name in enabled_data_stages(cfg)), name
            for run in later:
                assert actions[run.id] == expected_actions(cfg, "skipped")
            store = Store(str(tmp_path / "store"))
            for name in enabled_data_stages(cfg):
                assert len(store.versions(name)) == 1
            assert len({r.name for r in later}) == len(later)  # each run labelled by its own scheduled time

            # exactly one pretraining, started by the run that produced new data
            chained = wait_for(lambda: [r for r in runs_of(client, pretrain.id) if r.state_name == "Completed"], 120, what="the chained pretrain run")
            assert len(runs_of(client, pretrain.id)) == 1
            assert chained[0].parameters["preset"] == str(preset)
            assert len(store.versions("pretrain")) == 1
        finally:
            stop_process(serve)
            for name in ("data-refresh", "pretrain"):  # scheduled runs must not leak into other tests
                deployment = _deployment(client, name)
                if deployment:
                    client.delete_deployment(deployment.id)


def _deployment(client, name):
    found = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
    return found[0] if found else None
