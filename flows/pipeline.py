"""The pipeline's table of contents: every stage, its code, its config section, its inputs.

Order is topological: a stage appears after the stages it reads. A stage whose section has
`enabled: false` passes its first input through (see infra/stage.py).
"""
from __future__ import annotations

from lmfoundry.infra.config import ConfigError
from lmfoundry.infra.stage import StageSpec

TASKS = "lmfoundry.tasks."  # every stage lives in a phase package of tasks/

STAGES: list[StageSpec] = [
    StageSpec("crawl", TASKS + "acquire.crawl:run_crawl", section="crawl"),
    StageSpec("ingest_warc", TASKS + "acquire.ingest_warc:run_ingest_warc", section="ingest_warc", inputs=("crawl",)),
    StageSpec("extract", TASKS + "acquire.extract:run_extract", section="extract", inputs=("ingest_warc",)),
    StageSpec("ingest", TASKS + "acquire.ingest:run_ingest", section="ingest"),
    StageSpec("exact_dedup", TASKS + "dedup.exact_dedup:run_exact_dedup", section="exact_dedup", inputs=("ingest", "extract")),
    # off by default (pass-through); variants carry meta.augmented_from, which near_dedup reports on
    StageSpec("augment_docs", TASKS + "augment.documents:run_augment_docs", section="augment_docs", inputs=("exact_dedup",)),
    StageSpec("near_dedup", TASKS + "dedup.near_dedup:run_near_dedup", section="near_dedup", inputs=("augment_docs",)),
    StageSpec("heuristic_filter", TASKS + "filter.heuristic_filter:run_heuristic_filter", section="heuristic_filter", inputs=("near_dedup",)),
    StageSpec("train_quality_classifier", TASKS + "filter.quality:run_train_quality_classifier", section="quality", unused=("threshold", "keep_top_fraction"), inputs=("heuristic_filter",)),
    StageSpec("quality_filter", TASKS + "filter.quality:run_quality_filter", section="quality", inputs=("heuristic_filter", "train_quality_classifier")),
    StageSpec("pii_scrub", TASKS + "pii.scrub:run_pii_scrub", section="pii", inputs=("quality_filter",)),
    # expert review of documents (issue 21, off by default: both pass pii_scrub through; tasks/review/)
    StageSpec("annotate_docs", TASKS + "review.stages:run_annotate_docs", section="review_docs", inputs=("pii_scrub",)),
    StageSpec("review_docs", TASKS + "review.stages:run_review_docs", section="review_docs", inputs=("pii_scrub", "annotate_docs")),
    StageSpec("train_tokenizer", TASKS + "tokens.train_tokenizer:run_train_tokenizer", section="tokenizer", inputs=("review_docs",)),
    StageSpec("tokenize", TASKS + "tokens.tokenize:run_tokenize", section="tokenize", inputs=("review_docs", "train_tokenizer")),
    # off by default; when on, its variants of the train conversations join sft_data's train split
    StageSpec("augment", TASKS + "augment.conversations:run_augment", section=("augment", "sft_data")),
    StageSpec("sft_data", TASKS + "chat.sft_data:run_sft_data", section="sft_data", inputs=("train_tokenizer", "augment")),
    StageSpec("preference_data", TASKS + "chat.preference_data:run_preference_data", section="preference_data", inputs=("train_tokenizer",)),
    # expert review of preference pairs (issue 21, off by default: both pass preference_data through)
    StageSpec("annotate_pairs", TASKS + "review.stages:run_annotate_pairs", section="review_pairs", inputs=("preference_data", "train_tokenizer")),
    StageSpec("review_pairs", TASKS + "review.stages:run_review_pairs", section="review_pairs", inputs=("preference_data", "annotate_pairs")),
    StageSpec("pretrain", TASKS + "train.pretrain:run_pretrain", section=("model", "pretrain"), inputs=("tokenize", "train_tokenizer"), gpu=True),
    StageSpec("sft", TASKS + "train.sft:run_sft", section=("model", "sft"), inputs=("sft_data", "pretrain", "train_tokenizer"), gpu=True),
    StageSpec("reward_model", TASKS + "train.reward_model:run_reward_model", section="reward_model", inputs=("review_pairs", "sft"), gpu=True),
    StageSpec("dpo", TASKS + "train.dpo:run_dpo", section="dpo", inputs=("review_pairs", "sft", "train_tokenizer"), gpu=True),
    # ppo runs its own rollout loop: the recipe's spike monitor (stability) does not apply to it
    StageSpec("ppo", TASKS + "train.ppo:run_ppo", section="ppo", inputs=("review_pairs", "sft", "reward_model", "train_tokenizer"), unused=("stability",), gpu=True),
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


def data_stages() -> list[StageSpec]:
    """The data refresh: every stage before the first training stage."""
    first_training = next((i for i, spec in enumerate(STAGES) if spec.gpu), len(STAGES))
    return STAGES[:first_training]


def posttrain_stages() -> list[StageSpec]:
    """Post-training: the training stages after pretraining, in table order."""
    return [spec for spec in STAGES[STAGE_NAMES.index("pretrain") + 1 :] if spec.gpu]
