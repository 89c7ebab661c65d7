"""Config sections of the post-training stages: chat data, SFT, reward model, DPO, PPO.

Part of the one config tree (infra/config.py's PipelineConfig holds one field per section);
kept in its own file so the tree stays readable.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

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


class BackTranslationConfig(Section):
    """Round trip through a pivot language with two local Hugging Face seq2seq models (MarianMT
    style: one directory per direction, e.g. en->de and de->en). Nothing is downloaded."""

    forward: str = Field(description="directory of the model that translates into the pivot language")
    backward: str = Field(description="directory of the model that translates back")
    batch_size: int = execution(16, ge=1, description="sentences per generate call")
    max_new_tokens: int = Field(256, ge=1, description="longest translation of one sentence")
    device: str = execution("cpu", description="torch device of both models")


class _AugmentMethods(Section):
    """What both augment stages share: the methods and their settings."""

    section_name: ClassVar[str]  # the config section, as named in messages
    enabled: bool = Field(False, description="off by default: measure on your data whether it helps (README: Augmentation)")
    methods: list[Literal["synonyms", "backtranslation"]] = Field(["synonyms"], min_length=1, description="each method makes its own variants")
    copies: int = Field(1, ge=1, le=16, description="variants per item and method (backtranslation is greedy: always one)")
    synonym_rate: float = Field(0.2, gt=0, le=1, description="chance that each replaceable word is replaced")
    pos: list[Literal["noun", "verb", "adj", "adv"]] = Field(["noun", "verb", "adj", "adv"], min_length=1, description="parts of speech that may be replaced")
    wordnet_dir: str = Field("/usr/share/wordnet", description="WordNet 3.0 database files (Debian: apt-get install wordnet-base)")
    backtranslation: BackTranslationConfig | None = Field(None, description="the two model directories; required by the backtranslation method")
    seed: int = Field(0, description="the same seed, data and settings give the same variants")

    @model_validator(mode="after")
    def _models_for_backtranslation(self) -> "_AugmentMethods":
        if "backtranslation" in self.methods and self.backtranslation is None:
            raise ValueError(f"{self.section_name}.methods has backtranslation but {self.section_name}.backtranslation is not set: give forward and backward model directories")
        return self


class AugmentConfig(_AugmentMethods):
    """Stage `augment` (tasks/augment/conversations.py): new variants of the SFT training
    conversations; sft_data adds them to its train split. Validation conversations are never
    augmented (the held-out loss stays honest)."""

    section_name: ClassVar[str] = "augment"
    roles: list[Literal["user", "assistant"]] = Field(["user", "assistant"], min_length=1, description="whose messages are rewritten")


class AugmentDocsConfig(_AugmentMethods):
    """Stage `augment_docs` (tasks/augment/documents.py): variants of every document of a small
    corpus, after exact_dedup, each linked to its source (meta.augmented_from); near_dedup and the
    review gate see the link."""

    section_name: ClassVar[str] = "augment_docs"


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


class PpoConfig(TrainRecipe):
    """Reinforcement learning from the reward model (tasks/train/ppo.py, model/ppo_train.py): the
    actor starts from the SFT policy, the critic from the reward model; the SFT policy (frozen
    reference) and the reward model stay fixed. ``advantage: grpo`` drops the critic and
    normalises rewards within groups of samples of one prompt.

    Recipe fields mean what they mean elsewhere, per optimizer step of the actor: ``steps`` are
    PPO iterations (one rollout batch, then ``ppo_epochs`` passes over it in minibatches of
    ``global_batch_size`` rollouts), ``warmup_steps`` counts iterations. Sampling is plain
    temperature sampling: top-k / top-p would make the sampled distribution differ from the one
    the ratio and the KL are computed under (a known cause of negative KL)."""

    section_name = "ppo"

    enabled: bool = Field(False, description="off unless you have a reward model: configs/demo.yaml turns post-training on")
    steps: int = Field(10, ge=1, description="PPO iterations: generate rollout_batch_size responses, then ppo_epochs of updates")
    global_batch_size: int = Field(16, ge=1, description="rollouts per optimizer step over all ranks (the PPO minibatch)")
    lr: float = Field(5e-4, gt=0, description="actor peak learning rate (large models use ~1e-6)")
    min_lr: float = Field(5e-5, ge=0, description="floor the cosine decays to")
    warmup_steps: int = Field(0, ge=0, description="iterations of linear warmup")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decay of matrices (norms are not decayed)")
    critic_lr: float = Field(2e-3, gt=0, description="critic peak learning rate (same schedule shape as the actor's)")
    rollout_batch_size: int = Field(32, ge=1, description="responses generated per iteration over all ranks (prompts x group_size); a multiple of global_batch_size")
    group_size: int = Field(1, ge=1, description="samples per prompt, next to each other in the batch; GRPO needs >= 2")
    ppo_epochs: int = Field(2, ge=1, description="passes over each rollout batch")
    max_new_tokens: int = Field(24, ge=1, description="longest response; a response that ends here without <|end|> has 'missing EOS'")
    prompt_max_len: int = Field(128, ge=2, description="prompts with more tokens (template included) are left out and counted")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; log-probs, ratios and KL use the same tempered distribution")
    advantage: Literal["gae", "grpo"] = Field("gae", description="gae: critic + GAE (PPO); grpo: group-normalised rewards, no critic")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    clip_ratio: float = Field(0.2, gt=0, description="PPO policy ratio clip")
    value_clip: float = Field(0.2, gt=0, description="critic update clip around the rollout's values (reward units)")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus in the actor loss (entropy is logged either way)")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="per-token KL to the reference: k1 = log p - log q (unbiased, signed), k3 = (r - 1) - log r (never negative)")
    kl_coef: float = Field(0.05, ge=0, description="KL coefficient (the adaptive controller's start value)")
    kl_target: float | None = Field(None, gt=0, description="per-sequence KL the adaptive controller steers to; null: a fixed kl_coef")
    kl_horizon: int = Field(10000, ge=1, description="adaptive controller horizon, in rollouts")
    kl_in: Literal["reward", "loss"] | None = Field(
        None, description="where the KL penalty goes: per-token into the reward (PPO's way) or into the actor loss (GRPO's way); null: reward for gae, loss for grpo"
    )
    whiten_advantages: bool = Field(True, description="normalise advantages over each rollout batch (per rank)")
    reward_normalize: bool = Field(True, description="(score - mean) / std with the mean and std the reward model saved (model/reward.json)")
    reward_clip: float = Field(5.0, ge=0, description="clip the (normalised) score to +-reward_clip; 0: off")
    missing_eos_penalty: float = Field(
        0.5, ge=0, description="subtracted from the (normalised) score of a response that never emitted <|end|> or <|eos|>: without it the demo's reward model is gamed by ever longer replies; 0: off"
    )
    prompts_file: str | None = Field(
        None, description="JSONL/Parquet prompts (local or s3://; rows with 'prompt' or 'messages') instead of the preference data's prompts; needs the train_tokenizer input"
    )
    prompts_storage_options: StorageOptions = execution({}, description="fsspec options for prompts_file (keep credentials in the environment)")
    log_every: int = execution(1, ge=1, description="iterations between metric lines")
    eval_every: int = execution(5, ge=1, description="iterations between greedy-reward evaluations on validation prompts (and one at the end)")
    eval_samples: int = execution(32, ge=1, description="validation prompts per evaluation")
    checkpoint_every: int = execution(5, ge=1, description="iterations between committed checkpoints (and one at the end)")
    sample_every: int = execution(5, ge=1, description="iterations between logged sample responses (samples.jsonl)")
    samples_logged: int = execution(4, ge=0, description="responses written to samples.jsonl each time")

    @model_validator(mode="after")
    def _check_ppo(self) -> "PpoConfig":
        if self.label_smoothing:
            raise ValueError("ppo.label_smoothing applies to token cross-entropy only; leave it at 0 here")
        if self.advantage == "grpo" and self.group_size < 2:
            raise ValueError(f"ppo.advantage grpo compares samples of one prompt: set ppo.group_size >= 2 (got {self.group_size})")
        if self.rollout_batch_size % self.group_size:
            raise ValueError(f"ppo.rollout_batch_size {self.rollout_batch_size} is not a multiple of ppo.group_size {self.group_size}")
        if self.rollout_batch_size % self.global_batch_size:
            raise ValueError(f"ppo.rollout_batch_size {self.rollout_batch_size} is not a multiple of ppo.global_batch_size {self.global_batch_size} (the minibatch)")
        return self

    @property
    def kl_in_loss(self) -> bool:
        return (self.kl_in or ("loss" if self.advantage == "grpo" else "reward")) == "loss"

    @property
    def updates_per_iteration(self) -> int:
        """Actor optimizer steps per iteration."""
        return self.ppo_epochs * self.rollout_batch_size // self.global_batch_size

    def recipe(self) -> "PpoConfig":
        """PPO's job file (model/ppo_train.py's PpoJob) carries the whole section."""
        return self
