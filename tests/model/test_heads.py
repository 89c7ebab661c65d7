"""The reward model: score at the last real token, body taken from a policy, save/load, HF export."""
from __future__ import annotations

import pytest
import torch

from lmfoundry.infra.config import ModelConfig
from lmfoundry.model.heads import REWARD_FILE, RewardModel, load_reward_model, reward_stats, save_reward_model
from lmfoundry.model.transformer import Transformer, resolve, save_model

VOCAB, PAD = 61, 1


# one torch thread (tests/model/conftest.py): on two shared cores intra-op threads spin against other processes
pytestmark = pytest.mark.usefixtures("one_thread")


def policy(tie: bool = True, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(resolve(ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=tie), VOCAB))


def right_padded(lengths: list[int], width: int, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(3, VOCAB, (len(lengths), width), generator=torch.Generator().manual_seed(seed))
    for row, n in enumerate(lengths):
        tokens[row, n:] = PAD
    return tokens


@pytest.mark.parametrize("tie", [True, False])
def test_score_is_read_at_the_last_real_token(tie):
    rm = RewardModel.from_policy(policy(tie)).eval()
    lengths = [4, 9, 6]
    tokens = right_padded(lengths, 9)
    with torch.no_grad():
        scores, _ = rm(tokens, torch.tensor(lengths))
        for row, n in enumerate(lengths):
            alone, _ = rm(tokens[row : row + 1, :n], torch.tensor([n]))
            assert abs(scores[row].item() - alone.item()) < 1e-5
            manual = rm.score(rm.model.hidden_states(tokens[row : row + 1, :n])[0][0, -1])
            assert abs(manual.item() - alone.item()) < 1e-6
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert ("model.lm_head.weight" in rm.state_dict()) == tie  # an untied body drops its output projection


def test_body_comes_from_the_policy():
    base = policy(tie=False, seed=3)
    rm = RewardModel.from_policy(base)
    for name, tensor in base.state_dict().items():
        if not name.startswith("lm_head."):
            assert torch.equal(rm.state_dict()[f"model.{name}"], tensor)
    x = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        assert torch.equal(rm.model.hidden_states(x)[0], base(x, return_hidden=True)[2])


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_round_trip(tmp_path, tie):
    rm = RewardModel.from_policy(policy(tie)).eval()
    save_reward_model(rm.state_dict(), rm.cfg, tmp_path, {"mean": 0.25, "std": 2.0})
    again = load_reward_model(tmp_path).eval()
    tokens, lengths = right_padded([5, 8], 8), torch.tensor([5, 8])
    with torch.no_grad():
        assert torch.equal(rm(tokens, lengths)[0], again(tokens, lengths)[0])
    assert reward_stats(tmp_path)["mean"] == 0.25 and (tmp_path / REWARD_FILE).exists()
    save_model(policy().state_dict(), policy().cfg, tmp_path / "policy")
    with pytest.raises(ValueError, match="not a reward model"):
        load_reward_model(tmp_path / "policy")


@pytest.mark.parametrize("tie", [True, False])
def test_reward_export_scores_equal_ours_in_transformers(tmp_path, tie):
    """LlamaForSequenceClassification picks each row's rightmost non-pad token: on right-padded
    batches that is our last real token, so the scores match."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from lmfoundry.model.export import ExportError, export_reward_model

    rm = RewardModel.from_policy(policy(tie)).eval()
    with torch.no_grad():
        for p in rm.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))  # norm gains away from 1 so a mix-up would show
    save_reward_model(rm.state_dict(), rm.cfg, tmp_path / "ours", {"mean": 0.5, "std": 1.5})
    files = export_reward_model(tmp_path / "ours", tmp_path / "hf", max_seq_len=64, special_ids={"pad": PAD, "eos": 0, "bos": 2})
    assert {"config.json", "model.safetensors", REWARD_FILE} <= set(files)
    config = AutoConfig.from_pretrained(tmp_path / "hf")
    assert config.architectures == ["LlamaForSequenceClassification"] and config.num_labels == 1 and config.pad_token_id == PAD
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    lengths = [5, 12, 9, 1]
    tokens = right_padded(lengths, 12, seed=4)
    with torch.no_grad():
        ours = rm(tokens, torch.tensor(lengths))[0]
        theirs = hf(input_ids=tokens).logits.squeeze(-1)
        masked = hf(input_ids=tokens, attention_mask=(tokens != PAD).long()).logits.squeeze(-1)
    assert (ours - theirs).abs().max().item() < 1e-4 and (ours - masked).abs().max().item() < 1e-4, (ours, theirs)
    with pytest.raises(ExportError, match="pad token"):
        export_reward_model(tmp_path / "ours", tmp_path / "hf2", max_seq_len=64, special_ids={})
