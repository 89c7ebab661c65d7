"""Config of the two review points (sections `review_docs` and `review_pairs`, issue 21).

Both are off by default: then their stages pass their first input through and every version
downstream stays what it was. See tasks/review/__init__.py for what the stages do.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmfoundry.infra.config_base import Section, added_later, execution


class ReviewConfig(Section):
    """Machine labels + risk for every item, an expert review gate over a sample, decisions applied."""

    enabled: bool = Field(False, description="annotate, pause the flow for a reviewer, apply the decisions (off: pass the data through)")
    top_k: int = Field(20, ge=0, description="the highest-risk items a reviewer sees")
    random_k: int = Field(10, ge=0, description="items drawn uniformly from the rest: an unbiased estimate of the unreviewed remainder's error rate")
    seed: int = Field(0, description="seed of the random share")
    preview_chars: int = Field(600, ge=40, description="characters of each text shown to the reviewer")
    # added_later: unset, it stays out of the identity, so every version committed before it keeps its hash
    reward_model: str | None = added_later(
        None,
        description="review_pairs only: a reward model trained earlier, as reward_model@<version> (a committed version in this store) "
        "or a directory with model.safetensors, model_config.json, reward.json; adds rm_margin = r(chosen) - r(rejected) to every pair and its term to the risk",
    )
    # how the gate waits changes nothing a committed version holds: execution knobs
    timeout_s: int = execution(3600, ge=1, description="seconds the flow waits for a reviewer (on_timeout: proceed_machine_labels)")
    on_timeout: Literal["keep_paused", "proceed_machine_labels"] = execution(
        "keep_paused",
        description="nobody answered within timeout_s: keep waiting (a pause of 30 days, Prefect needs a number) or go on with the machine labels only, recorded as such",
    )
    poll_s: int = execution(5, ge=1, description="seconds between the paused flow's checks for an answer")
