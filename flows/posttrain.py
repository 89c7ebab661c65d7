"""Post-training from the latest pretrained model: SFT, then the reward model and DPO.

    lmf serve        # Deployments -> post-train -> Run; or chained: pretrain with then_posttrain

Every training stage after `pretrain` in flows/pipeline.py runs here, in table order. Inputs
that are not trained here (the chat and preference data, the tokenizer, the pretrained model)
come from the pipeline's current refs, so run the data refresh and pretraining first. Each
stage holds a slot of the GPU concurrency limit while it runs; Retry resumes the failed stage
from its latest committed checkpoint.
"""
from __future__ import annotations

from typing import Any

from prefect import flow

from lmfoundry.flows.params import DEFAULT_PRESET, Override, PosttrainRerun, load_run_config
from lmfoundry.flows.pipeline import posttrain_stages
from lmfoundry.flows.stage_task import run_stages



@flow(name="post-train", log_prints=True)
def post_train(
    preset: str = DEFAULT_PRESET,
    overrides: list[Override] = [],
    rerun: PosttrainRerun = PosttrainRerun(),
    plan_only: bool = False,
) -> dict[str, Any]:
    """Align the latest pretrained model: SFT, reward model, DPO (committed stages are reused).

    Args:
        preset: YAML config preset, relative to the repository (configs/...) or an absolute path
        overrides: config edits KEY.PATH=VALUE, applied to the preset like `lmf run --set`
        rerun: start at a stage and/or recompute it and everything downstream
        plan_only: run nothing; publish a table of what would run, be skipped or is stale, and why
    """
    config = load_run_config(preset, overrides)
    result = run_stages(config, posttrain_stages(), rerun=rerun, plan_only=plan_only)
    if plan_only:
        return {"plan": [row.model_dump() for row in result.plan or []]}
    return {"ran": result.ran(), "versions": {name: ref.version for name, ref in result.refs.items() if ref is not None}}


if __name__ == "__main__":
    post_train()
