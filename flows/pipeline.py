"""The pipeline's table of contents: every stage, its code, its config section, its inputs.

Order is topological: a stage appears after the stages it reads.
"""
from __future__ import annotations

from infra.config import ConfigError
from infra.stage import StageSpec

STAGES: list[StageSpec] = [
    StageSpec("ingest", "tasks.ingest:run_ingest", section="ingest"),
    StageSpec("exact_dedup", "tasks.exact_dedup:run_exact_dedup", section="exact_dedup", inputs=("ingest",)),
]

STAGE_NAMES = [spec.name for spec in STAGES]


def stage(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise ConfigError(f"unknown stage '{name}'; stages are: {', '.join(STAGE_NAMES)}")


def stages_until(until: str | None) -> list[StageSpec]:
    """The stages up to and including `until` (all when None)."""
    if until is None:
        return list(STAGES)
    stage(until)  # validates the name
    return STAGES[: STAGE_NAMES.index(until) + 1]
