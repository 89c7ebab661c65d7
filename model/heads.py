"""Heads on the Transformer's final hidden state: the scalar reward model and PPO's critic.

    from lmfoundry.model.heads import RewardModel, load_reward_model, save_reward_model
    rm = RewardModel.from_policy(load_model("sft_stage/model"))   # body from the SFT model
    scores, aux = rm(tokens, lengths)     # tokens [B, T] right-padded, lengths [B] -> scores [B]

    critic = load_reward_model("reward_model_stage/model", cls=ValueModel)   # PPO's critic
    values, aux = critic(tokens, positions, segments)   # [B, T]: the head at every position

The score of a sequence is the head's output at its last real token (position lengths - 1:
the final ``<|end|>`` of a templated reply), which has attended to the whole conversation.
Module names follow Hugging Face's ``LlamaForSequenceClassification`` (``model.*``,
``score.weight``), so model/export.py writes the reward model as that class by a rename.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lmfoundry.infra.config import ModelConfig
from lmfoundry.model.sharing import is_shared_copy, unique_state_dict
from lmfoundry.model.transformer import CONFIG, WEIGHTS, Transformer

REWARD_FILE = "reward.json"  # beside the weights: marks a reward model, holds the train-set reward mean / std


class RewardModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.model = Transformer(cfg)
        if not cfg.tie_embeddings:
            del self.model.lm_head  # the body never projects to the vocabulary: no unused parameters
        self.score = nn.Linear(cfg.d_model, 1, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=cfg.init_std)

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @classmethod
    def from_policy(cls, policy: Transformer) -> "RewardModel":
        """The policy's body (its output projection dropped) under a freshly initialised head;
        seed torch beforehand for a reproducible head."""
        rm = cls(policy.cfg)
        body = {k: v for k, v in policy.state_dict().items() if not (k.startswith("lm_head.") and not policy.cfg.tie_embeddings)}
        rm.model.load_state_dict(body, strict=True)
        return rm.to(next(policy.parameters()).dtype)

    def forward(
        self, tokens: torch.Tensor, lengths: torch.Tensor, positions: torch.Tensor | None = None, segments: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] (right-padded), lengths [B] real tokens per row -> (scores [B] fp32, MoE aux)."""
        hidden, aux = self.model.hidden_states(tokens, positions, segments)  # [B, T, D]
        last = hidden[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]  # [B, D]
        return self.score(last).squeeze(-1).float(), aux

    # the run loop's accounting, delegated to the body
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        lm_head = 0 if not self.cfg.tie_embeddings else self.cfg.vocab_size * self.cfg.d_model
        return self.model.flops_per_token(seq_len) - 6 * lm_head

    @property
    def activation_stats(self):
        return self.model.activation_stats

    @property
    def record_activations(self) -> bool:
        return self.model.record_activations

    @record_activations.setter
    def record_activations(self, value: bool) -> None:
        self.model.record_activations = value

    @property
    def activation_checkpointing(self) -> bool:
        return self.model.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        self.model.activation_checkpointing = value

    def expert_load(self) -> list[list[float]]:
        return self.model.expert_load()


class ValueModel(RewardModel):
    """PPO's critic: the reward model's body and head read at every position (a value per state),
    so it starts from the reward model's weights (same module names, same files)."""

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] -> (values [B, T] fp32: the head's output after each token, MoE aux)."""
        hidden, aux = self.model.hidden_states(tokens, positions, segments)  # [B, T, D]
        return self.score(hidden).squeeze(-1).float(), aux


def save_reward_model(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, directory: str | Path, stats: dict | None = None) -> None:
    """model.safetensors (``model.*`` + ``score.weight``), model_config.json and reward.json
    ({"mean", "std", ...}: rewards over the training pairs, for normalising them later)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # a tied body has no separate lm_head; an untied one was deleted: either way none is saved
    state_dict = unique_state_dict(state_dict, cfg)  # shared layers (model.share_layers): once
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if not k.startswith("model.lm_head.")}
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True))
    (directory / REWARD_FILE).write_text(json.dumps({"head": "score", **(stats or {})}, indent=2, sort_keys=True))


def load_reward_model(directory: str | Path, dtype: torch.dtype = torch.float32, cls: type[RewardModel] = RewardModel) -> RewardModel:
    """A RewardModel (or ``cls``: ValueModel) from save_reward_model's directory (e.g. a
    reward_model stage's model/ folder)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / REWARD_FILE).exists():
        raise ValueError(f"{directory} holds no {REWARD_FILE}: not a reward model (a policy loads with transformer.load_model)")
    cfg = ModelConfig.model_validate_json((directory / CONFIG).read_text())
    rm = cls(cfg)
    state = load_file(str(directory / WEIGHTS))
    if cfg.tie_embeddings:
        state["model.lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = rm.load_state_dict(state, strict=False)
    missing = [k for k in missing if not is_shared_copy(k, cfg)]  # filled by sharing
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS} does not match a reward model of model_config.json: missing {missing}, unexpected {unexpected}")
    return rm.to(dtype)


def reward_stats(directory: str | Path) -> dict:
    """The reward.json of a saved reward model: {"mean", "std", "pairs", ...}."""
    return json.loads((Path(directory) / REWARD_FILE).read_text())
