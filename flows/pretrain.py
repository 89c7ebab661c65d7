"""Pretraining from the data the latest data refresh produced.

    lmf serve        # Deployments -> pretrain -> Run; or chained: data-refresh with then_pretrain

The training stage reads the pipeline's current refs of its inputs (the tokenizer and token
shards), holds a slot of the GPU concurrency limit while it runs, and resumes from its
latest checkpoint when retried.
"""
from __future__ import annotations

from typing import Any

from prefect import flow

from lmfoundry.flows.params import DEFAULT_PRESET, Override, Rerun, load_run_config
from lmfoundry.flows.pipeline import stage
from lmfoundry.flows.stage_task import run_stages


@flow(name="pretrain", log_prints=True)
def pretrain(
    preset: str = DEFAULT_PRESET,
    overrides: list[Override] = [],
    rerun: Rerun = Rerun(),
    plan_only: bool = False,
) -> dict[str, Any]:
    """Pretrain on the latest committed data (a committed model is reused when nothing changed).

    Args:
        preset: YAML config preset, relative to the repository (configs/...) or an absolute path
        overrides: config edits KEY.PATH=VALUE, applied to the preset like `lmf run --set`
        rerun: start at a stage and/or recompute it and everything downstream
        plan_only: run nothing; publish a table of what would run, be skipped or is stale, and why
    """
    config = load_run_config(preset, overrides)
    result = run_stages(config, [stage("pretrain")], rerun=rerun, plan_only=plan_only)
    if plan_only:
        return {"plan": [row.model_dump() for row in result.plan or []]}
    return {"ran": result.ran(), "versions": {name: ref.version for name, ref in result.refs.items() if ref is not None}}


if __name__ == "__main__":
    pretrain()
