"""The one thin Prefect task that runs any stage through the store, and the loop every flow uses.

The task's result is a small StageOutcome, never data. Prefect's own result cache is off: the
stage store is the source of truth for what can be reused, so a retried flow run (UI "Retry")
skips committed stages and resumes the failed one at shard level.

Training stages (``StageSpec.gpu``) hold slots of a Prefect global concurrency limit
(``compute.gpu_concurrency_limit``, "gpu-slots" by default) while they run, so two trainings
never oversubscribe a host; ``lmf serve`` / ``lmf deploy`` create the limit.
"""
from __future__ import annotations

import time
import uuid
from contextlib import contextmanager, nullcontext
from typing import Iterable, Iterator

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.context import get_run_context

from lmfoundry.flows.params import Rerun
from lmfoundry.flows.pipeline import STAGES, stage, stages_until
from lmfoundry.flows.review import GATES as REVIEW_GATES, review_gate
from lmfoundry.flows.summary import StagesResult, model_location, print_summary, summary_table  # noqa: F401  (re-exported)
from lmfoundry.infra import report
from lmfoundry.infra.config import ComputeConfig, PipelineConfig
from lmfoundry.infra.stage import PlanRow, StageOutcome, StageSpec, check_inputs, downstream, plan, run_stage
from lmfoundry.infra.store import StageRef, Store



class MissingUpstream(RuntimeError):
    """A flow starts part-way through the pipeline but an earlier stage was never committed."""


# ------------------------------------------------------------------ the task


# The slot is a lease the run renews every 3/4 of this while it lives: a run whose host died
# frees its slot this long after its last renewal (Prefect's default, 300 s, would keep the
# Retry of a crashed training waiting for minutes after it was marked Crashed).
GPU_SLOT_LEASE_S = 90


@contextmanager
def gpu_slot(spec: StageSpec, compute: ComputeConfig) -> Iterator[None]:
    """Hold `compute.gpu_slots` slots of the GPU concurrency limit while a training stage runs."""
    if not spec.gpu or not compute.gpu_concurrency_limit or not limit_exists(compute.gpu_concurrency_limit):
        yield
        return
    with concurrency(compute.gpu_concurrency_limit, occupy=compute.gpu_slots, lease_duration=GPU_SLOT_LEASE_S):
        yield


def limit_exists(name: str) -> bool:
    """Whether the server has the GPU limit: `lmf serve` / `lmf deploy` create it; a local
    `lmf run` (its own temporary server, one process) needs none."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            get_run_logger().info("no concurrency limit '%s' on this server: training without a GPU slot guard", name)
            return False
    return True


@task(cache_policy=NO_CACHE, persist_result=False)
def stage_task(name: str, config: PipelineConfig, inputs: list[StageRef], salt: str = "") -> StageOutcome:
    logger = get_run_logger()
    store = Store.from_config(config.store)
    run_id = str(get_run_context().task_run.flow_run_id)
    spec = stage(name)
    # a committed training is reused without waiting for a GPU slot
    committed = store.is_committed(name, spec.version(config, [ref.digest for ref in inputs], salt))
    with nullcontext() if committed else gpu_slot(spec, config.compute):
        started = time.monotonic()
        outcome = run_stage(store, spec, config, inputs, salt=salt, run_id=run_id)
    logger.info("%s %s version %s", name, "reused" if outcome.status == "skipped" else "committed", outcome.ref.version)
    if outcome.status == "ran":
        publish_artifacts(store, outcome, time.monotonic() - started)
    return outcome


# ------------------------------------------------------------------ artifacts


def artifact_key(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower())


def publish_artifacts(store: Store, outcome: StageOutcome, seconds: float) -> None:
    ref = outcome.ref
    manifest = store.manifest(ref.stage, ref.version) or {}
    header = [
        {"stat": "version", "value": ref.version},
        {"stat": "seconds", "value": f"{seconds:.1f}"},
        {"stat": "rows", "value": str(manifest.get("rows", ""))},
        {"stat": "bytes", "value": str(manifest.get("bytes", ""))},
        {"stat": "resumed_files", "value": str(manifest.get("resumed_files", 0))},
    ]
    create_table_artifact(key=artifact_key(f"{ref.stage}-stats"), table=header + [{"stat": k, "value": str(v)} for k, v in report.flat_stats(outcome.stats).items()], description=f"{ref.stage} {ref.version}: stats")
    location = f"{store.url.rstrip('/')}/stages/{ref.stage}/{ref.version}/manifest.json"
    create_markdown_artifact(
        key=artifact_key(f"{ref.stage}-manifest"),
        markdown=f"**{ref.stage}** version `{ref.version}` committed.\n\nManifest: `{location}`\n\n`lmf show {ref.stage}`",
        description=f"{ref.stage}: manifest",
    )
    curve = report.training_metrics(store, ref)
    if curve:
        create_table_artifact(key=artifact_key(f"{ref.stage}-metrics"), table=report.metrics_table(curve), description=f"{ref.stage} {ref.version}: logged steps")
        png = report.png_data_uri(report.training_curve_figure(curve, title=f"{ref.stage} {ref.version}"))
        create_markdown_artifact(
            key=artifact_key(f"{ref.stage}-loss-curve"),
            markdown=f"![{ref.stage} loss curve]({png})",
            description=f"{ref.stage}: loss curve",
        )


def publish_plan(rows: list[PlanRow], pipeline: str) -> None:
    table = [{"stage": r.stage, "action": r.action, "version": r.version or "-", "current": r.current or "-", "reason": r.reason} for r in rows]
    create_table_artifact(key=artifact_key(f"{pipeline}-plan"), table=table, description=f"plan for pipeline '{pipeline}': what a run would do")
    for row in table:
        print(f"{row['stage']:<24} {row['action']:<24} {row['version']:<18} {row['reason']}")


# ------------------------------------------------------------------ the stage loop


def select_stages(stages: list[StageSpec], rerun: Rerun) -> list[StageSpec]:
    if rerun.from_stage is None:
        return list(stages)
    names = [spec.name for spec in stages]
    start = str(rerun.from_stage)
    if start not in names:
        raise ValueError(f"rerun.from_stage '{start}' is not a stage of this flow; choose one of: {', '.join(names)}")
    return stages[names.index(start):]


def current_ref(store: Store, config: PipelineConfig, name: str) -> StageRef | None:
    """The ref the pipeline points at for `name` (following disabled pass-through stages)."""
    spec = stage(name)
    if not spec.enabled(config):
        return current_ref(store, config, spec.inputs[0]) if spec.inputs else None
    version = store.get_ref(config.store.pipeline, name)
    if version is None or not store.is_committed(name, version):
        raise MissingUpstream(
            f"stage '{name}' has no committed version in pipeline '{config.store.pipeline}' ({store.url}); "
            f"run the stages up to it first (the data-refresh flow, or `lmf run --until {name}`)"
        )
    return store.ref(name, version)


def run_stages(
    config: PipelineConfig,
    stages: list[StageSpec],
    *,
    rerun: Rerun = Rerun(),
    force: Iterable[str] = (),
    plan_only: bool = False,
) -> StagesResult:
    """Run `stages` in order through the store; inputs from outside `stages` come from current refs."""
    store = Store.from_config(config.store)
    selected = select_stages(stages, rerun)
    if not selected:
        return StagesResult()
    check_inputs(selected, config)  # a path that matches nothing fails here, before any stage runs
    start = {str(rerun.from_stage)} if rerun.force and rerun.from_stage else set()
    forced = downstream(STAGES, set(force) | start)
    if plan_only:
        rows = plan(store, stages_until(selected[-1].name), config, forced)
        publish_plan(rows, config.store.pipeline)
        return StagesResult(plan=rows)
    salt = f"force-{uuid.uuid4().hex}" if forced else ""
    result = StagesResult()
    progress = create_progress_artifact(progress=0.0, description=f"stages done of {len(selected)}: {', '.join(s.name for s in selected)}")
    selected_names = {spec.name for spec in selected}
    for i, spec in enumerate(selected):
        inputs = [ref for ref in (_input_ref(store, config, result, name, selected_names) for name in spec.inputs) if ref is not None]
        if not spec.enabled(config):  # pass-through: downstream reads this stage's first input
            result.refs[spec.name] = result.refs.get(spec.inputs[0]) if spec.inputs else None
            result.actions[spec.name] = "disabled"
        else:
            if spec.name in REVIEW_GATES:  # pauses the flow for a reviewer when needed (flows/review.py)
                review_gate(store, spec, config, inputs, salt=salt if spec.name in forced else "")
            started = time.monotonic()
            outcome = stage_task.with_options(name=spec.name)(spec.name, config, inputs, salt=salt if spec.name in forced else "")
            result.seconds[spec.name] = time.monotonic() - started
            result.refs[spec.name] = outcome.ref
            result.actions[spec.name] = outcome.status
        update_progress_artifact(progress, progress=100.0 * (i + 1) / len(selected))
    publish_summary(store, config, result)
    return result


def _input_ref(store, config, result: StagesResult, name: str, selected: set[str]) -> StageRef | None:
    if name in result.refs:
        return result.refs[name]
    if name in selected:  # cannot happen for a topological list; guard against a miswired StageSpec
        raise RuntimeError(f"stage input '{name}' is listed after the stage that reads it in flows/pipeline.py")
    ref = current_ref(store, config, name)
    result.refs[name] = ref
    result.actions[name] = "from ref"
    return ref


def publish_summary(store: Store, config: PipelineConfig, result: StagesResult) -> None:
    """The run's summary as a table artifact and as printed lines: what ran or was reused, how much
    each stage holds (docs, tokens or files), how long it took, and where the model is."""
    table = summary_table(store, result)
    print_summary(store, table, result)
    create_table_artifact(
        key=artifact_key(f"{config.store.pipeline}-run-summary"),
        table=table,
        description=f"pipeline '{config.store.pipeline}': {len(result.ran())} stage(s) ran, the rest were reused",
    )
