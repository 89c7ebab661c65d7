"""The pipeline's table of contents: every stage, its code, its config section, its inputs.

Order is topological: a stage appears after the stages it reads. A stage whose section has
`enabled: false` passes its first input through (see infra/stage.py).
"""
from __future__ import annotations

from lmfoundry.infra.config import ConfigError, PipelineConfig
from lmfoundry.infra.stage import StageSpec


def _quality_training(root: PipelineConfig):
    # the threshold only matters to filtering: changing it must not retrain the classifier
    from lmfoundry.tasks.filter.quality import training_section

    return training_section(root)


def _pretrain_job(root: PipelineConfig):
    # pretraining reads two sections: the model's shape and the training recipe
    from lmfoundry.tasks.train.pretrain import pretrain_section

    return pretrain_section(root)


STAGES: list[StageSpec] = [
    StageSpec("crawl", "lmfoundry.tasks.acquire.crawl:run_crawl", section="crawl"),
    StageSpec("ingest_warc", "lmfoundry.tasks.acquire.ingest_warc:run_ingest_warc", section="ingest_warc", inputs=("crawl",)),
    StageSpec("extract", "lmfoundry.tasks.acquire.extract:run_extract", section="extract", inputs=("ingest_warc",)),
    StageSpec("ingest", "lmfoundry.tasks.acquire.ingest:run_ingest", section="ingest"),
    StageSpec("exact_dedup", "lmfoundry.tasks.dedup.exact_dedup:run_exact_dedup", section="exact_dedup", inputs=("ingest", "extract")),
    StageSpec("near_dedup", "lmfoundry.tasks.dedup.near_dedup:run_near_dedup", section="near_dedup", inputs=("exact_dedup",)),
    StageSpec("heuristic_filter", "lmfoundry.tasks.filter.heuristic_filter:run_heuristic_filter", section="heuristic_filter", inputs=("near_dedup",)),
    StageSpec("train_quality_classifier", "lmfoundry.tasks.filter.quality:run_train_quality_classifier", section=_quality_training, inputs=("heuristic_filter",)),
    StageSpec("quality_filter", "lmfoundry.tasks.filter.quality:run_quality_filter", section="quality", inputs=("heuristic_filter", "train_quality_classifier")),
    StageSpec("pii_scrub", "lmfoundry.tasks.pii.scrub:run_pii_scrub", section="pii", inputs=("quality_filter",)),
    StageSpec("train_tokenizer", "lmfoundry.tasks.tokens.train_tokenizer:run_train_tokenizer", section="tokenizer", inputs=("pii_scrub",)),
    StageSpec("tokenize", "lmfoundry.tasks.tokens.tokenize:run_tokenize", section="tokenize", inputs=("pii_scrub", "train_tokenizer")),
    StageSpec("pretrain", "lmfoundry.tasks.train.pretrain:run_pretrain", section=_pretrain_job, inputs=("tokenize", "train_tokenizer")),
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
