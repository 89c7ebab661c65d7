"""`lmf deploy` registers the deployments, work pools and GPU limit with a running server,
and a `cpu` pool worker runs the data refresh from it."""
from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

from lmfoundry.flows.pipeline import data_stages
from lmfoundry.infra.store import Store
from tests.flows.corpus import make_corpus, write_preset
from tests.flows.server import REPO, VENV_BIN, wait_for

NAMES = ["data-refresh", "pretrain", "post-train", "end-to-end"]


def test_deploy_registers_pools_limit_and_deployments_that_a_worker_runs(prefect_server, tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    # a relative store, as in the default preset: the worker runs the flow in a scratch
    # directory, yet the results must land in the repository's store
    relative_store = Path(".lmf") / f"test-worker-{uuid.uuid4().hex[:8]}"
    store_dir = REPO / relative_store
    preset = write_preset(tmp_path / "preset.yaml", corpus, relative_store)
    done = subprocess.run(
        [str(VENV_BIN / "lmf"), "deploy", "--config", str(preset), "--gpu-pool-type", "kubernetes", "--gpu-slots", "2"],
        cwd=tmp_path,  # any directory: flows are found by module path, the preset by absolute path
        env=prefect_server.env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with prefect_server.client() as client:
        try:
            assert client.read_work_pool("cpu").type == "process"
            gpu = client.read_work_pool("gpu")
            assert gpu.type == "kubernetes"
            container = gpu.base_job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
            assert client.read_global_concurrency_limit_by_name("gpu-slots").limit == 2

            deployments = {d.name: d for d in client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=NAMES)))}
            assert {name: deployments[name].work_pool_name for name in NAMES} == {"data-refresh": "cpu", "pretrain": "gpu", "post-train": "gpu", "end-to-end": "gpu"}
            refresh = deployments["data-refresh"]
            assert refresh.schedules[0].schedule.cron == "0 3 * * *"
            schema = refresh.parameter_openapi_schema
            assert set(schema["properties"]) == {"preset", "overrides", "snapshot", "rerun", "plan_only", "then_pretrain"}
            # the form's stage dropdown offers the stages this deployment runs, no others
            assert schema["definitions"]["DataRerunStage"]["enum"] == [spec.name for spec in data_stages()]
            post_schema = deployments["post-train"].parameter_openapi_schema
            assert post_schema["definitions"]["PosttrainRerunStage"]["enum"] == ["sft", "reward_model", "dpo", "ppo"]
            assert refresh.parameters["preset"] == str(preset)
            assert deployments["end-to-end"].parameters["config"]["store"]["url"] == str(store_dir)
            assert deployments["pretrain"].parameters["then_posttrain"] is True  # pretrain chains post-train
            assert "rerun" in deployments["post-train"].parameter_openapi_schema["properties"]
            # crash detection: runs heartbeat every 30 s (on top of the kubernetes pool's default env)
            assert deployments["pretrain"].job_variables["env"] == {"DS_ACCELERATOR": "cuda", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
            assert deployments["data-refresh"].job_variables["env"] == {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
            assert all("lmf-heartbeat" in deployments[name].tags for name in NAMES)
            assert "crash detection: runs send a heartbeat every 30 s" in done.stdout

            run = client.create_flow_run_from_deployment(refresh.id, parameters={"snapshot": "from-worker"})
            worker = subprocess.run(
                [str(VENV_BIN / "prefect"), "worker", "start", "--pool", "cpu", "--run-once"],
                cwd=REPO,
                env=prefect_server.env(),
                capture_output=True,
                text=True,
                timeout=180,
            )
            state = wait_for(lambda: client.read_flow_run(run.id).state if client.read_flow_run(run.id).state.is_final() else None, 60, what="the worker's run")
            assert state.is_completed(), worker.stdout[-3000:] + worker.stderr[-3000:]
            store = Store(str(store_dir))
            assert set(store.stages()) >= {"ingest", "exact_dedup"}
            assert store.get_ref("test", "exact_dedup") is not None
        finally:
            shutil.rmtree(store_dir, ignore_errors=True)
            for deployment in client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=NAMES))):
                client.delete_deployment(deployment.id)


def test_deployment_file_errors_name_the_fix(tmp_path):
    import os

    import pytest

    from lmfoundry.flows.deploy import DeploymentFileError, parse_schedule_option, runner_deployments

    assert parse_schedule_option("data-refresh=0 */6 * * *") == ("data-refresh", {"cron": "0 */6 * * *"})
    assert parse_schedule_option("data-refresh=30") == ("data-refresh", {"interval": 30.0})
    with pytest.raises(DeploymentFileError, match="has 6 fields; use five"):
        parse_schedule_option("data-refresh=0 0 3 * * *")
    with pytest.raises(DeploymentFileError, match="is not valid"):
        parse_schedule_option("data-refresh=61 * * * *")
    with pytest.raises(DeploymentFileError, match="positive number of seconds"):
        parse_schedule_option("data-refresh=-5")
    bad_file = tmp_path / "prefect.yaml"
    bad_file.write_text((REPO / "deployments" / "prefect.yaml").read_text().replace('cron: "0 3 * * *"', 'cron: "0 0 3 * * *"'))
    with pytest.raises(DeploymentFileError, match="schedule nightly: cron '0 0 3 \\* \\* \\*' has 6 fields"):
        runner_deployments(bad_file, only=["data-refresh"])
    with pytest.raises(DeploymentFileError, match="defines: data-refresh, pretrain, post-train, end-to-end"):
        runner_deployments(only=["nope"])
    with pytest.raises(DeploymentFileError, match="does not exist"):
        runner_deployments(tmp_path / "missing.yaml")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(tmp_path / "home")}
    done = subprocess.run([str(VENV_BIN / "lmf"), "serve"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "prefect server start" in done.stderr
