"""Serve or deploy the flows described in deployments/prefect.yaml.

    lmf serve  [--config F] [--set k=v] [--only NAME] [--schedule NAME=CRON|SECONDS] [--no-schedules]
    lmf deploy [--config F] [--set k=v] [--only NAME] [--gpu-pool-type process|kubernetes] [--gpu-slots N]

Both read the same prefect.yaml (names, entrypoints, default parameters, schedules, work
pools) and make sure the GPU concurrency limit exists. ``serve`` runs every deployment from
this one process (each flow run in a subprocess): the single-machine way. ``deploy``
registers them with the server at PREFECT_API_URL for workers of the `cpu` and `gpu` pools
(``prefect worker start --pool cpu``), creating the pools when missing.
Both turn on crash detection (flows/crash_detection.py): heartbeats for the runs they start
and the automation that marks a silent run Crashed.

Flows are referenced by module path (``lmfoundry.flows.data_refresh.data_refresh``), so a worker needs
this package installed (``pip install -e .``), not a copy of the directory it was deployed from.
"""
from __future__ import annotations

import importlib
import json
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import yaml

from lmfoundry.flows import crash_detection as crashes
from lmfoundry.flows.params import REPO_ROOT, resolve_preset
from lmfoundry.infra.config import load_config

log = logging.getLogger("lmfoundry.deploy")

PREFECT_FILE = REPO_ROOT / "deployments" / "prefect.yaml"


class DeploymentFileError(ValueError):
    """prefect.yaml is missing or wrong, or there is no server to serve or deploy to."""


def require_api_url() -> str:
    """Serving or deploying needs a long-lived server (a temporary one would vanish with us)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise DeploymentFileError(
            "no Prefect server configured: start one with `prefect server start` and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (or `prefect config set PREFECT_API_URL=...`)"
        )
    return url


def load_prefect_file(path: str | Path = PREFECT_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise DeploymentFileError(f"deployment file '{path}' does not exist; pass --prefect-file deployments/prefect.yaml")
    data = yaml.safe_load(path.read_text()) or {}
    if not data.get("deployments"):
        raise DeploymentFileError(f"deployment file '{path}' lists no deployments")
    return data


def flow_from_entrypoint(entrypoint: str):
    """'flows/data_refresh.py:data_refresh' -> the flow object (imported as lmfoundry.flows.data_refresh)."""
    if ":" not in entrypoint:
        raise DeploymentFileError(f"entrypoint '{entrypoint}' must look like flows/file.py:flow_function")
    path, name = entrypoint.split(":", 1)
    module = importlib.import_module("lmfoundry." + path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def parse_schedule_option(text: str) -> tuple[str, dict[str, Any]]:
    """'data-refresh=0 3 * * *' -> cron; 'data-refresh=30' -> every 30 seconds."""
    if "=" not in text:
        raise DeploymentFileError(f"--schedule '{text}': expected DEPLOYMENT=CRON or DEPLOYMENT=SECONDS, e.g. data-refresh='0 3 * * *'")
    name, value = (part.strip() for part in text.split("=", 1))
    try:
        seconds = float(value)
    except ValueError:
        return name, {"cron": check_cron(value, f"--schedule '{text}'")}
    if seconds <= 0:
        raise DeploymentFileError(f"--schedule '{text}': an interval must be a positive number of seconds")
    return name, {"interval": seconds}


def check_cron(expr: str, where: str) -> str:
    """A standard five-field cron (minute hour day-of-month month day-of-week), or a clear error:
    a six-field one would be read with a seconds or year field and fire at the wrong times."""
    from cronsim import CronSim, CronSimError

    fields = expr.split()
    if len(fields) != 5:
        raise DeploymentFileError(f"{where}: cron '{expr}' has {len(fields)} fields; use five: minute hour day-of-month month day-of-week, e.g. '0 3 * * *'")
    try:
        CronSim(expr, datetime.now(timezone.utc))
    except CronSimError as exc:
        raise DeploymentFileError(f"{where}: cron '{expr}' is not valid ({exc})") from exc
    return expr


def build_schedule(spec: dict[str, Any]):
    from prefect.schedules import Cron, Interval

    common = {"active": bool(spec.get("active", True)), "parameters": spec.get("parameters") or {}, "slug": spec.get("slug")}
    if spec.get("cron"):
        return Cron(check_cron(spec["cron"], f"schedule {spec.get('slug') or spec['cron']}"), timezone=spec.get("timezone"), **common)
    if spec.get("interval"):
        return Interval(timedelta(seconds=float(spec["interval"])), timezone=spec.get("timezone"), **common)
    raise DeploymentFileError(f"schedule {spec} needs `cron` or `interval`")


def default_parameters(flow, declared: dict[str, Any], preset: str | None, overrides: list[str]) -> dict[str, Any]:
    """The deployment's form defaults: prefect.yaml's, then --config/--set for this machine."""
    params = dict(declared)
    accepted = set(flow.parameters.properties)
    if preset is not None and "preset" in accepted:
        params["preset"] = str(Path(preset).resolve())
    if overrides and "overrides" in accepted:
        params["overrides"] = list(overrides)
    if "config" in accepted and (preset is not None or overrides or "config" not in params):
        # the end-to-end form shows the whole config tree, filled in from the preset
        params["config"] = load_config(resolve_preset(preset) if preset else None, overrides).model_dump(mode="json")
    return params


def runner_deployments(
    path: str | Path = PREFECT_FILE,
    *,
    preset: str | None = None,
    overrides: list[str] = (),
    only: list[str] = (),
    schedules: list[str] = (),
    with_schedules: bool = True,
    for_work_pools: bool = False,
) -> list:
    """RunnerDeployments for the deployments in `path` (all, or the names in `only`)."""
    from prefect.events import DeploymentTriggerTypes
    from prefect.flows import EntrypointType
    from pydantic import TypeAdapter

    data = load_prefect_file(path)
    replaced = dict(parse_schedule_option(s) for s in schedules)
    names = [d["name"] for d in data["deployments"]]
    unknown = [n for n in list(only) + list(replaced) if n not in names]
    if unknown:
        raise DeploymentFileError(f"unknown deployment(s) {unknown}; {path} defines: {', '.join(names)}")
    triggers_adapter = TypeAdapter(DeploymentTriggerTypes)
    detection = crashes.crash_detection(data, str(path))
    out = []
    for spec in data["deployments"]:
        if only and spec["name"] not in only:
            continue
        flow = flow_from_entrypoint(spec["entrypoint"])
        declared = list(spec.get("schedules") or [])
        if spec["name"] in replaced:  # keep the declared per-run parameters, change the timing
            base = declared[0] if declared else {}
            declared = [{"parameters": base.get("parameters") or {}, "slug": base.get("slug"), **replaced[spec["name"]]}]
        triggers = [triggers_adapter.validate_python({"name": f"{spec['name']}__trigger_{i}", **t}) for i, t in enumerate(spec.get("triggers") or [], 1)]
        pool = spec.get("work_pool") or {}
        out.append(
            flow.to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                tags=crashes.with_heartbeat_tag(spec.get("tags"), detection),
                parameters=default_parameters(flow, spec.get("parameters") or {}, preset, list(overrides)),
                schedules=[build_schedule(s) for s in declared] if with_schedules else None,
                concurrency_limit=spec.get("concurrency_limit"),
                triggers=triggers or None,
                work_pool_name=pool.get("name") if for_work_pools else None,
                job_variables=pool.get("job_variables") if for_work_pools else None,
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return out


def ensure_concurrency_limits(data: dict[str, Any], gpu_slots: int | None = None) -> dict[str, int]:
    """Create or resize the global concurrency limits named in prefect.yaml's lmfoundry section."""
    from prefect import get_client

    limits = dict((data.get("lmfoundry") or {}).get("concurrency_limits") or {})
    if gpu_slots is not None:
        limits["gpu-slots"] = gpu_slots
    with get_client(sync_client=True) as client:
        for name, limit in limits.items():
            client.upsert_global_concurrency_limit_by_name(name, int(limit))
    return limits


def ensure_work_pools(data: dict[str, Any], prefect_file: Path, gpu_pool_type: str = "process") -> dict[str, str]:
    """Create the work pools named in prefect.yaml's lmfoundry section when they do not exist."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    created = {}
    pools = (data.get("lmfoundry") or {}).get("work_pools") or {}
    with get_client(sync_client=True) as client:
        for name, spec in pools.items():
            pool_type = gpu_pool_type if name == "gpu" else spec.get("type", "process")
            try:
                existing = client.read_work_pool(name)
                if existing.type != pool_type:
                    log.warning("work pool '%s' exists with type %s (wanted %s); leaving it as it is", name, existing.type, pool_type)
                continue
            except ObjectNotFound:
                pass
            if pool_type == "kubernetes":
                template = json.loads((prefect_file.parent / spec["kubernetes_job_template"]).read_text())
            else:
                template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, description=spec.get("description"), base_job_template=template))
            created[name] = pool_type
    return created


def serve(
    path: str | Path = PREFECT_FILE,
    *,
    preset: str | None = None,
    overrides: list[str] = (),
    only: list[str] = (),
    schedules: list[str] = (),
    with_schedules: bool = True,
    limit: int | None = None,
) -> None:
    """Serve the deployments from this process until interrupted (Ctrl-C pauses their schedules)."""
    from prefect import serve as prefect_serve

    require_api_url()
    deployments = runner_deployments(path, preset=preset, overrides=overrides, only=only, schedules=schedules, with_schedules=with_schedules)
    refuse_if_served_elsewhere(deployments)
    data = load_prefect_file(path)
    ensure_concurrency_limits(data)
    detection = crashes.crash_detection(data, str(path))
    print(crashes.describe(detection, crashes.ensure_crash_automation(detection)), flush=True)
    # the runner passes PREFECT_FLOWS_HEARTBEAT_FREQUENCY to each flow run's process
    prefect_serve(*deployments, limit=limit, heartbeat_seconds=detection.heartbeat_seconds if detection.enabled else None)


def refuse_if_served_elsewhere(deployments: list, recent_s: float = 60.0) -> None:
    """A second `lmf serve` of the same deployments would pause the first one's schedules when it
    stops: refuse while another process polled them within `recent_s` seconds."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    now = datetime.now(timezone.utc)
    with get_client(sync_client=True) as client:
        for deployment in deployments:
            try:
                current = client.read_deployment_by_name(f"{deployment.flow_name}/{deployment.name}")
            except ObjectNotFound:
                continue
            if current.last_polled and (now - current.last_polled).total_seconds() < recent_s:
                raise DeploymentFileError(
                    f"deployment '{deployment.name}' is already being served (polled {(now - current.last_polled).total_seconds():.0f} s ago): "
                    f"stop that `lmf serve` first (a killed one is released {recent_s:.0f} s after its last poll), or serve other deployments with --only"
                )


def deploy(
    path: str | Path = PREFECT_FILE,
    *,
    preset: str | None = None,
    overrides: list[str] = (),
    only: list[str] = (),
    schedules: list[str] = (),
    with_schedules: bool = True,
    gpu_pool_type: str = "process",
    gpu_slots: int | None = None,
) -> dict[str, str]:
    """Register the deployments with the server at PREFECT_API_URL; returns name -> deployment id."""
    require_api_url()
    path = Path(path)
    data = load_prefect_file(path)
    created = ensure_work_pools(data, path, gpu_pool_type)
    for name, pool_type in created.items():
        print(f"created work pool '{name}' ({pool_type}); start a worker: prefect worker start --pool {name}")
    for name, limit in ensure_concurrency_limits(data, gpu_slots).items():
        print(f"global concurrency limit '{name}': {limit} slot(s)")
    detection = crashes.crash_detection(data, str(path))
    ids = {}
    for deployment in runner_deployments(path, preset=preset, overrides=overrides, only=only, schedules=schedules, with_schedules=with_schedules, for_work_pools=True):
        add_heartbeat_env(deployment, detection)
        ids[f"{deployment.flow_name}/{deployment.name}"] = str(deployment.apply(work_pool_name=deployment.work_pool_name))
        print(f"deployment {deployment.flow_name}/{deployment.name} -> work pool '{deployment.work_pool_name}'")
    print(crashes.describe(detection, crashes.ensure_crash_automation(detection)))
    return ids


def add_heartbeat_env(deployment, detection: crashes.CrashDetection) -> None:
    """Workers start each run with the deployment's job variables: put the heartbeat interval in its env."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        pool_env = crashes.pool_default_env(client, deployment.work_pool_name)
    deployment.job_variables = crashes.heartbeat_job_variables(deployment.job_variables, pool_env, detection)
