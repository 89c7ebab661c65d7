"""Pretraining from the data the latest data refresh produced.

    lmf serve        # Deployments -> pretrain -> Run; or chained: data-refresh with then_pretrain

The training stage reads the pipeline's current refs of its inputs (the tokenizer and token
shards), holds a slot of the GPU concurrency limit while it runs, and resumes from its
latest checkpoint when retried. With ``then_posttrain`` a newly committed model starts the
post-train deployment (SFT, reward model, DPO) on the same preset.
"""
from __future__ import annotations

from typing import Any

from prefect import flow

from lmfoundry.flows.params import DEFAULT_PRESET, Override, PretrainRerun, load_run_config, start_deployment
from lmfoundry.flows.pipeline import stage
from lmfoundry.flows.stage_task import run_stages

POSTTRAIN_DEPLOYMENT = "post-train/post-train"


@flow(name="pretrain", log_prints=True)
def pretrain(
    preset: str = DEFAULT_PRESET,
    overrides: list[Override] = [],
    rerun: PretrainRerun = PretrainRerun(),
    plan_only: bool = False,
    then_posttrain: bool = False,
) -> dict[str, Any]:
    """Pretrain on the latest committed data (a committed model is reused when nothing changed).

    Args:
        preset: YAML config preset, relative to the repository (configs/...) or an absolute path
        overrides: config edits KEY.PATH=VALUE, applied to the preset like `lmf run --set`
        rerun: start at a stage and/or recompute it and everything downstream
        plan_only: run nothing; publish a table of what would run, be skipped or is stale, and why
        then_posttrain: start the post-train deployment when this run committed a new model
    """
    config = load_run_config(preset, overrides)
    result = run_stages(config, [stage("pretrain")], rerun=rerun, plan_only=plan_only)
    if plan_only:
        return {"plan": [row.model_dump() for row in result.plan or []]}
    posttrain_run = None
    if then_posttrain and result.actions.get("pretrain") == "ran":
        posttrain_run = start_deployment(POSTTRAIN_DEPLOYMENT, {"preset": preset, "overrides": list(overrides)}, "a new model was pretrained")
    versions = {name: ref.version for name, ref in result.refs.items() if ref is not None}
    return {"ran": result.ran(), "versions": versions, "posttrain_run": posttrain_run}


if __name__ == "__main__":
    pretrain()
