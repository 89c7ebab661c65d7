"""Config sections of the post-training stages: chat data, SFT, reward model, DPO.

Part of the one config tree (infra/config.py's PipelineConfig holds one field per section);
kept in its own file so the tree stays readable.
"""
from __future__ import annotations

from lmfoundry.infra.config_base import Section


class SftDataConfig(Section):
    """Conversations -> templated, tokenized, packed Arrow shards (tasks/chat/sft_data.py)."""


class PreferenceDataConfig(Section):
    """Preference pairs -> templated, tokenized Arrow shards (tasks/chat/preference_data.py)."""


class SftConfig(Section):
    """Supervised fine-tuning from the pretrained model (tasks/train/sft.py)."""


class RewardModelConfig(Section):
    """Bradley-Terry reward model on the SFT model (tasks/train/reward_model.py)."""


class DpoConfig(Section):
    """Direct preference optimisation from the SFT model (tasks/train/dpo.py)."""
