"""The end-to-end flow: run every stage in order, each through the stage store.

Run it with ``lmf run --config configs/demo.yaml`` (in-process, ephemeral Prefect) or from
the Prefect UI once deployed. Re-running is the recovery procedure: committed stages are
skipped, a half-done stage resumes at shard level.
"""
from __future__ import annotations

import uuid

from prefect import flow

from flows.pipeline import STAGES, stages_until
from flows.stage_task import stage_task
from infra.config import PipelineConfig
from infra.stage import downstream
from infra.store import StageRef


@flow(name="end-to-end", log_prints=True)
def end_to_end(config: PipelineConfig = PipelineConfig(), until: str | None = None, force: list[str] = []) -> dict[str, StageRef | None]:
    forced = downstream(STAGES, set(force))
    salt = f"force-{uuid.uuid4().hex}" if forced else ""
    refs: dict[str, StageRef | None] = {}
    for spec in stages_until(until):
        inputs = [refs[name] for name in spec.inputs if refs[name] is not None]
        if not spec.enabled(config):  # pass-through: downstream reads this stage's first input
            refs[spec.name] = refs[spec.inputs[0]] if spec.inputs else None
            continue
        refs[spec.name] = stage_task.with_options(name=spec.name)(
            spec.name, config, inputs, salt=salt if spec.name in forced else ""
        )
    return refs
