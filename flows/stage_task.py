"""The one thin Prefect task that runs any stage through the store (see infra/stage.py).

Its result is a small StageRef, never data. Prefect's own result cache is off: the stage
store is the source of truth for what can be reused, so a retried flow run (UI "Retry")
skips committed stages and resumes the failed one at shard level.
"""
from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context

from infra.config import PipelineConfig
from infra.stage import StageOutcome, run_stage
from infra.store import StageRef, Store
from flows.pipeline import stage


def flatten(stats: dict, prefix: str = "") -> list[dict[str, str]]:
    rows = []
    for key, value in stats.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(flatten(value, f"{name}."))
        else:
            rows.append({"stat": name, "value": str(value)})
    return rows


def artifact_key(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower())


@task(cache_policy=NO_CACHE, persist_result=False)
def stage_task(name: str, config: PipelineConfig, inputs: list[StageRef], salt: str = "") -> StageRef:
    logger = get_run_logger()
    store = Store.from_config(config.store)
    run_id = str(get_run_context().task_run.flow_run_id)
    outcome: StageOutcome = run_stage(store, stage(name), config, inputs, salt=salt, run_id=run_id)
    logger.info("%s %s version %s", name, "reused" if outcome.status == "skipped" else "committed", outcome.ref.version)
    if outcome.status == "ran":
        publish_artifacts(store, outcome)
    return outcome.ref


def publish_artifacts(store: Store, outcome: StageOutcome) -> None:
    ref = outcome.ref
    key = artifact_key(f"{ref.stage}-stats")
    create_table_artifact(key=key, table=flatten(outcome.stats), description=f"{ref.stage} {ref.version}: stats")
    manifest = f"{store.url.rstrip('/')}/stages/{ref.stage}/{ref.version}/manifest.json"
    create_markdown_artifact(
        key=artifact_key(f"{ref.stage}-manifest"),
        markdown=f"**{ref.stage}** version `{ref.version}` committed.\n\nManifest: `{manifest}`\n\n`lmf show {ref.stage}`",
        description=f"{ref.stage}: manifest",
    )
