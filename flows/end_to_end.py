"""The end-to-end flow: every stage in order, each through the stage store.

Run it with ``lmf run --config configs/demo.yaml`` (in-process, ephemeral Prefect) or from
the Prefect UI once served (``lmf serve``), where ``config`` is a typed form of the whole
configuration tree. Re-running is the recovery procedure: committed stages are skipped, a
half-done stage resumes at shard level.
"""
from __future__ import annotations

from prefect import flow

from lmfoundry.flows.params import Rerun, StageName
from lmfoundry.flows.pipeline import stages_until
from lmfoundry.flows.stage_task import run_stages
from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.store import StageRef


@flow(name="end-to-end", log_prints=True)
def end_to_end(
    config: PipelineConfig = PipelineConfig(),
    until: StageName | None = None,
    force: list[StageName] = [],
    rerun: Rerun = Rerun(),
    plan_only: bool = False,
) -> dict[str, StageRef | None]:
    """Run the whole pipeline, each stage through the stage store (committed stages are reused).

    Args:
        config: the whole configuration tree (defaults: the preset the deployment was served with)
        until: stop after this stage
        force: recompute these stages and everything downstream
        rerun: start at a stage and/or recompute it and everything downstream
        plan_only: run nothing; publish a table of what would run, be skipped or is stale, and why
    """
    result = run_stages(config, stages_until(until), rerun=rerun, force=[str(name) for name in force], plan_only=plan_only)
    return result.refs
