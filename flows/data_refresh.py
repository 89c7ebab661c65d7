"""The data refresh: every data stage (crawl/ingest through tokenize), from a form or a schedule.

    lmf serve        # then in the UI: Deployments -> data-refresh -> Run -> Custom run
    lmf run --until tokenize      # the same stages in-process, without a server

Each run records a named snapshot of the stage versions it produced (``snapshot``, default:
the run's scheduled time). When the final data stage produced new data, it emits the event
``lmf.data.changed`` and, with ``then_pretrain``, starts the pretrain deployment; when nothing
changed (every stage was already committed) it does nothing more, so a frequent schedule
costs only the checks.
"""
from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.context import get_run_context
from prefect.events import emit_event
from prefect.runtime import flow_run

from lmfoundry.flows.params import DEFAULT_PRESET, DataRerun, Override, SnapshotLabel, load_run_config, start_deployment
from lmfoundry.flows.pipeline import data_stages
from lmfoundry.flows.stage_task import MissingUpstream, current_ref, run_stages
from lmfoundry.infra.snapshots import write_snapshot
from lmfoundry.infra.store import Store

PRETRAIN_DEPLOYMENT = "pretrain/pretrain"
DATA_CHANGED_EVENT = "lmf.data.changed"



def default_label() -> str:
    when = flow_run.scheduled_start_time
    return when.strftime("%Y%m%d-%H%M%S")


def refresh_run_name() -> str:
    return f"refresh-{flow_run.parameters.get('snapshot') or default_label()}"


@flow(name="data-refresh", flow_run_name=refresh_run_name, log_prints=True)
def data_refresh(
    preset: str = DEFAULT_PRESET,
    overrides: list[Override] = [],
    snapshot: SnapshotLabel = "",
    rerun: DataRerun = DataRerun(),
    plan_only: bool = False,
    then_pretrain: bool = False,
) -> dict[str, Any]:
    """Refresh the training data: every data stage through the stage store (committed stages are reused).

    Args:
        preset: YAML config preset, relative to the repository (configs/...) or an absolute path
        overrides: config edits KEY.PATH=VALUE, applied to the preset like `lmf run --set`
        snapshot: a name for the data version this run produces (empty: the scheduled time)
        rerun: start at a stage and/or recompute it and everything downstream
        plan_only: run nothing; publish a table of what would run, be skipped or is stale, and why
        then_pretrain: start the pretrain deployment when the final data stage produced new data
    """
    config = load_run_config(preset, overrides)
    stages = data_stages()
    store = Store.from_config(config.store)
    result = run_stages(config, stages, rerun=rerun, plan_only=plan_only)
    if plan_only:
        return {"plan": [row.model_dump() for row in result.plan or []]}
    after = result.refs.get(stages[-1].name) if stages else None
    # new data = this run committed the final data version; a concurrent run that merely
    # found it committed reports no change, so one change starts one pretraining
    changed = after is not None and result.actions.get(after.stage) == "ran"
    label = snapshot or default_label()
    run_id = str(get_run_context().flow_run.id)
    refs = {spec.name: result.refs.get(spec.name) or _current_or_none(store, config, spec.name) for spec in stages}
    body = write_snapshot(store, config.store.pipeline, label, refs, run_id)
    print(f"snapshot '{label}': {'new data' if changed else 'no change'}; ran: {', '.join(result.ran()) or 'nothing'}")
    if changed:
        emit_event(
            event=DATA_CHANGED_EVENT,
            resource={"prefect.resource.id": f"lmf.pipeline.{config.store.pipeline}"},
            payload={"snapshot": label, "stage": after.stage, "version": after.version, "preset": preset, "overrides": list(overrides)},
        )
    pretrain_run = None
    if changed and then_pretrain:
        pretrain_run = start_deployment(PRETRAIN_DEPLOYMENT, {"preset": preset, "overrides": list(overrides)}, "the data changed")
    return {"snapshot": label, "changed": changed, "ran": result.ran(), "versions": body["stages"], "pretrain_run": pretrain_run}


def _current_or_none(store, config, name):
    try:
        return current_ref(store, config, name)
    except MissingUpstream:
        return None


if __name__ == "__main__":
    data_refresh()
