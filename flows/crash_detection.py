"""Crash detection: a flow run whose process or host dies is marked Crashed, so Retry can resume it.

A killed `lmf serve`, a worker host that loses power or an evicted pod cannot report its own end:
Prefect keeps such a run in Running forever. `lmf serve` and `lmf deploy` therefore

1. turn on flow-run heartbeats for the runs of our deployments: the event
   ``prefect.flow-run.heartbeat`` every ``heartbeat_seconds`` (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``,
   passed to each served run's process, or set in the deployments' job variables for workers),
   and tag those deployments ``lmf-heartbeat`` (their runs inherit the tag);
2. create, once, by name, the automation "lmfoundry: crash silent runs": for each run with that
   tag, after a heartbeat it expects another heartbeat or an end state (Completed, Failed,
   Cancelled, Crashed) within ``crashed_after_seconds``; when none comes it sets the run Crashed.

Both numbers live in deployments/prefect.yaml under ``lmfoundry.crash_detection``. Only runs with
the tag are watched: runs of the same flows without our heartbeat setting (a local `lmf run`, or a
plain `prefect deploy`) send heartbeats far less often (Prefect's default is every 180 s) and
would otherwise be crashed while alive.

Run `lmf serve` or `lmf deploy` to apply; see deployments/README.md ("When a run crashed").
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

HEARTBEAT_TAG = "lmf-heartbeat"
AUTOMATION_NAME = "lmfoundry: crash silent runs"
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
# Prefect raises any smaller heartbeat interval to this (flow_engine.MINIMUM_HEARTBEAT_INTERVAL)
MIN_HEARTBEAT_SECONDS = 30
# the run's end states, each of which answers the last heartbeat
END_EVENTS = ("prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed")


class CrashDetection(BaseModel):
    """prefect.yaml -> lmfoundry.crash_detection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    heartbeat_seconds: int = Field(30, ge=MIN_HEARTBEAT_SECONDS, description="seconds between a run's heartbeats")
    crashed_after_seconds: int = Field(90, description="a run silent this long after a heartbeat is marked Crashed")

    @model_validator(mode="after")
    def _window_leaves_room_for_a_late_heartbeat(self) -> "CrashDetection":
        # a heartbeat can arrive a few seconds late on a busy host or network: a window barely
        # longer than the interval would crash healthy runs
        if self.crashed_after_seconds < 1.5 * self.heartbeat_seconds:
            raise ValueError(
                f"crashed_after_seconds={self.crashed_after_seconds} must be at least 1.5 x heartbeat_seconds "
                f"({1.5 * self.heartbeat_seconds:g}); 3 x (a run missed three heartbeats) is a good choice"
            )
        return self


def crash_detection(data: dict[str, Any], where: str = "deployments/prefect.yaml") -> CrashDetection:
    """The checked `lmfoundry.crash_detection` section of a loaded prefect.yaml (defaults when absent)."""
    from lmfoundry.flows.deploy import DeploymentFileError

    section = (data.get("lmfoundry") or {}).get("crash_detection") or {}
    try:
        return CrashDetection.model_validate(section)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'crash_detection'}: {e['msg']}" for e in exc.errors())
        raise DeploymentFileError(f"{where}: lmfoundry.crash_detection is wrong ({problems})") from exc


def with_heartbeat_tag(tags: list[str] | None, detection: CrashDetection) -> list[str] | None:
    """A deployment's tags plus the one the automation watches (its runs inherit it)."""
    if not detection.enabled:
        return tags
    return [*(tags or []), *([] if HEARTBEAT_TAG in (tags or []) else [HEARTBEAT_TAG])]


def heartbeat_job_variables(job_variables: dict[str, Any] | None, pool_env: dict[str, str], detection: CrashDetection) -> dict[str, Any] | None:
    """A deployment's job variables with the heartbeat interval in `env`.

    A deployment's `env` replaces the work pool's default `env` as a whole (the GPU template's
    DS_ACCELERATOR=cuda, say), so the pool's defaults are carried along under ours.
    """
    if not detection.enabled:
        return job_variables
    variables = dict(job_variables or {})
    variables["env"] = {**pool_env, **(variables.get("env") or {}), HEARTBEAT_ENV: str(detection.heartbeat_seconds)}
    return variables


def pool_default_env(client, pool_name: str | None) -> dict[str, str]:
    """The default `env` job variable of a work pool's base job template ({} when it has none)."""
    if not pool_name:
        return {}
    template = client.read_work_pool(pool_name).base_job_template or {}
    env = (((template.get("variables") or {}).get("properties") or {}).get("env") or {}).get("default")
    return dict(env) if isinstance(env, dict) else {}


def crash_automation(detection: CrashDetection):
    """The automation (Prefect's own objects) that marks a silent run of our deployments Crashed."""
    from prefect.automations import Automation, ChangeFlowRunState, EventTrigger, Posture
    from prefect.client.schemas.objects import StateType

    window = detection.crashed_after_seconds
    return Automation(
        name=AUTOMATION_NAME,
        description=(
            f"Created by `lmf serve` / `lmf deploy` from deployments/prefect.yaml (lmfoundry.crash_detection). "
            f"Runs tagged {HEARTBEAT_TAG} send a heartbeat every {detection.heartbeat_seconds} s; one silent for "
            f"{window} s (its process or host died) is set Crashed. Press Retry on it to resume."
        ),
        enabled=True,
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{HEARTBEAT_TAG}"},
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *END_EVENTS},
            for_each={"prefect.resource.id"},  # one window per flow run
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=window),
        ),
        # force stays False: Prefect refuses Crashed for a run already in an end state, so a run
        # whose end raced its last heartbeat is never crashed after it finished
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=(
                    f"No heartbeat for {window} s: the process or host running this flow run stopped. "
                    "Press Retry: committed stages are reused and training resumes from its last checkpoint."
                ),
            )
        ],
    )


def ensure_crash_automation(detection: CrashDetection) -> str:
    """Create the automation, or bring the one of that name up to date; 'created', 'updated',
    'unchanged' or 'disabled' (crash detection off: nothing is created)."""
    from prefect import get_client

    if not detection.enabled:
        return "disabled"
    wanted = crash_automation(detection)
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(AUTOMATION_NAME)
        for duplicate in existing[1:]:  # two `lmf deploy` at once may each have created one
            client.delete_automation(duplicate.id)
    if not existing:
        wanted.create()
        return "created"
    current = existing[0]
    same = (current.trigger, current.actions, current.enabled, current.description) == (wanted.trigger, wanted.actions, wanted.enabled, wanted.description)
    if same:
        return "unchanged"
    wanted.id = current.id
    wanted.update()
    return "updated"


def describe(detection: CrashDetection, status: str) -> str:
    """One line for the terminal after `lmf serve` / `lmf deploy`."""
    if not detection.enabled:
        return "crash detection off (lmfoundry.crash_detection.enabled: false): a run whose host dies stays Running"
    return (
        f"crash detection: runs send a heartbeat every {detection.heartbeat_seconds} s; automation "
        f"'{AUTOMATION_NAME}' ({status}) marks a run silent for {detection.crashed_after_seconds} s Crashed"
    )
