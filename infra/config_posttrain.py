"""Config sections of the post-training stages: chat data, SFT, reward model, DPO.

Part of the one config tree (infra/config.py's PipelineConfig holds one field per section);
kept in its own file so the tree stays readable.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from lmfoundry.infra.config_base import Section, execution
from lmfoundry.infra.config_train import TrainRecipe
from lmfoundry.infra.credentials import StorageOptions

# the row shapes a chat source may hold (tasks/chat/shapes.py); "auto" decides per row
ChatFormat = Literal["auto", "messages", "instruction", "prompt_response", "preference", "hh_rlhf"]


class ChatSourceConfig(Section):
    """Chat data files: JSONL (.jsonl/.json, optionally compressed; a .json holding one array works
    too) or Parquet, on any fsspec URL."""

    paths: list[str] = Field(description="files, directories or globs (local, s3://...)")
    format: ChatFormat = Field("auto", description="row shape; auto detects it per row from the keys")
    name: str | None = Field(None, description="label in the stats (default: the first path)")
    storage_options: StorageOptions = execution(
        {}, description="fsspec options for these paths, e.g. an S3 endpoint (they are stored in the manifest: keep credentials in the environment)"
    )

    @model_validator(mode="after")
    def _has_paths(self) -> "ChatSourceConfig":
        if not self.paths:
            raise ValueError("a chat source needs at least one path")
        return self


class _ChatDataConfig(Section):
    enabled: bool = Field(False, description="off unless you have the data: configs/demo.yaml turns post-training on")
    sources: list[ChatSourceConfig] = Field(default_factory=list, description="your data; read in order")
    builtin: Literal["chatterbot"] | None = Field(
        None, description="add the demo corpus shipped in the chatterbot-corpus wheel (no download); null for real data only"
    )
    seq_len: int = Field(256, ge=8, le=65535, description="tokens per training input; rows hold seq_len + 1")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of items in the val split, by a stable hash of the content")
    on_bad_row: Literal["error", "skip"] = Field("error", description="a malformed row stops the stage (error) or is counted by reason (skip)")
    seed: int = Field(0, description="salts the val-split hash (and the demo pairs' choice of rejected answers)")


class SftDataConfig(_ChatDataConfig):
    """Conversations -> templated, tokenized, packed Arrow shards (tasks/chat/sft_data.py)."""


class PreferenceDataConfig(_ChatDataConfig):
    """Preference pairs -> templated, tokenized Arrow shards (tasks/chat/preference_data.py)."""


class SftConfig(TrainRecipe):
    """Supervised fine-tuning from the pretrained model (tasks/train/sft.py): loss on assistant
    tokens only, packed conversations attend only within themselves. The recipe fields are the
    same as pretrain's (infra/config_train.py); the defaults suit the tiny demo model."""

    section_name = "sft"

    enabled: bool = Field(False, description="off unless you have the data: configs/demo.yaml turns post-training on")
    steps: int = Field(60, ge=1, description="optimizer steps (the demo's ~325 packed rows: 1.5 epochs)")
    lr: float = Field(2e-3, gt=0, description="peak learning rate; below pretraining's (the demo pretrains at 3e-3; large models fine-tune at ~1e-5)")
    min_lr: float = Field(1e-5, ge=0, description="floor the cosine decays to")
    warmup_steps: int = Field(4, ge=0)
    weight_decay: float = Field(0.0, ge=0, description="AdamW decay of matrices (norms are not decayed)")
    log_every: int = execution(5, ge=1, description="steps between metric lines")
    eval_every: int = execution(20, ge=1, description="steps between validation passes (and one at the end)")
    checkpoint_every: int = execution(20, ge=1, description="steps between committed checkpoints (and one at the end)")


class _PreferenceRecipe(TrainRecipe):
    """The recipe defaults of the two preference stages (batch = pairs)."""

    enabled: bool = Field(False, description="off unless you have the data: configs/demo.yaml turns post-training on")
    steps: int = Field(40, ge=1, description="optimizer steps")
    global_batch_size: int = Field(16, ge=1, description="preference pairs per optimizer step over all ranks")
    min_lr: float = Field(1e-5, ge=0, description="floor the cosine decays to")
    warmup_steps: int = Field(4, ge=0)
    weight_decay: float = Field(0.0, ge=0, description="AdamW decay of matrices (norms are not decayed)")
    log_every: int = execution(5, ge=1, description="steps between metric lines")
    eval_every: int = execution(20, ge=1, description="steps between validation passes (and one at the end)")
    checkpoint_every: int = execution(20, ge=1, description="steps between committed checkpoints (and one at the end)")

    @model_validator(mode="after")
    def _no_label_smoothing(self) -> "_PreferenceRecipe":
        if self.label_smoothing:
            raise ValueError(f"{self.section_name}.label_smoothing applies to token cross-entropy only; leave it at 0 here")
        return self


class RewardModelConfig(_PreferenceRecipe):
    """Bradley-Terry reward model on the SFT model (tasks/train/reward_model.py): a scalar head
    on the final hidden state, scored at each reply's last token."""

    section_name = "reward_model"

    steps: int = Field(60, ge=1, description="optimizer steps")
    lr: float = Field(3e-3, gt=0, description="peak learning rate (the new head needs more than SFT's)")
    margin: float = Field(0.0, description="the chosen reward must win by this much: loss = -log sigmoid(r_c - r_r - margin)")
    center_coef: float = Field(0.0, ge=0, description="adds center_coef * mean((r_c + r_r)^2), keeping rewards near zero mean (TRL's center_rewards_coefficient, e.g. 0.01)")


class DpoConfig(_PreferenceRecipe):
    """Direct preference optimisation from the SFT model (tasks/train/dpo.py), against the frozen
    SFT model's log-probs computed once before training."""

    section_name = "dpo"

    lr: float = Field(1e-3, gt=0, description="peak learning rate; below SFT's (large models use ~5e-7)")
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL penalty: larger keeps the policy closer to the SFT model")
