"""The pipeline's table of contents: every stage, its code, its config section, its inputs.

Order is topological: a stage appears after the stages it reads. A stage whose section has
`enabled: false` passes its first input through (see infra/stage.py).
"""
from __future__ import annotations

from infra.config import ConfigError, PipelineConfig
from infra.stage import StageSpec


def _quality_training(root: PipelineConfig):
    # the threshold only matters to filtering: changing it must not retrain the classifier
    from tasks.quality import training_section

    return training_section(root)


def _pretrain_job(root: PipelineConfig):
    # pretraining reads two sections: the model's shape and the training recipe
    from tasks.pretrain import pretrain_section

    return pretrain_section(root)


STAGES: list[StageSpec] = [
    StageSpec("crawl", "tasks.crawl:run_crawl", section="crawl"),
    StageSpec("ingest_warc", "tasks.ingest_warc:run_ingest_warc", section="ingest_warc", inputs=("crawl",)),
    StageSpec("extract", "tasks.extract:run_extract", section="extract", inputs=("ingest_warc",)),
    StageSpec("ingest", "tasks.ingest:run_ingest", section="ingest"),
    StageSpec("exact_dedup", "tasks.exact_dedup:run_exact_dedup", section="exact_dedup", inputs=("ingest", "extract")),
    StageSpec("near_dedup", "tasks.near_dedup:run_near_dedup", section="near_dedup", inputs=("exact_dedup",)),
    StageSpec("heuristic_filter", "tasks.heuristic_filter:run_heuristic_filter", section="heuristic_filter", inputs=("near_dedup",)),
    StageSpec("train_quality_classifier", "tasks.quality:run_train_quality_classifier", section=_quality_training, inputs=("heuristic_filter",)),
    StageSpec("quality_filter", "tasks.quality:run_quality_filter", section="quality", inputs=("heuristic_filter", "train_quality_classifier")),
    StageSpec("pii_scrub", "tasks.pii_scrub:run_pii_scrub", section="pii", inputs=("quality_filter",)),
    StageSpec("train_tokenizer", "tasks.tokenizer:run_train_tokenizer", section="tokenizer", inputs=("pii_scrub",)),
    StageSpec("tokenize", "tasks.tokenize:run_tokenize", section="tokenize", inputs=("pii_scrub", "train_tokenizer")),
    StageSpec("pretrain", "tasks.pretrain:run_pretrain", section=_pretrain_job, inputs=("tokenize", "train_tokenizer")),
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
