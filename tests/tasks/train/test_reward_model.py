"""Stage `reward_model` through the stage runner: a separable synthetic preference set is learnt
(held-out accuracy >= 0.9), reward statistics are saved with the model, and the export scores
like ours as LlamaForSequenceClassification."""
from __future__ import annotations

import pytest
import torch

from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.config_posttrain import RewardModelConfig
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.model.chat_loader import PreferenceLoader
from lmfoundry.model.heads import REWARD_FILE, load_reward_model
from tests.model.chat_fixtures import PAD, commit_model, commit_preference_data, separable_pairs

SPEC = StageSpec("reward_model", "lmfoundry.tasks.train.reward_model:run_reward_model", section="reward_model", inputs=("preference_data", "sft"), gpu=True)
SEQ, STEPS = 32, 30


def config(**fields) -> PipelineConfig:
    base = dict(steps=STEPS, lr=3e-3, warmup_steps=3, log_every=5, eval_every=15, checkpoint_every=STEPS, distributed=RewardModelConfig.Distributed(launcher="torchrun"))
    return PipelineConfig(reward_model=RewardModelConfig(**{**base, **fields}))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from lmfoundry.infra.store import Store

    store = Store(str(tmp_path_factory.mktemp("store")))
    refs = [commit_preference_data(store, separable_pairs(160, seed=0), separable_pairs(40, seed=1), SEQ), commit_model(store, "sft", hf_tokenizer=True)]
    return store, refs, run_stage(store, SPEC, config(), refs)


def test_reward_model_learns_the_preference_and_saves_reward_statistics(finished):
    store, refs, outcome = finished
    stats = outcome.stats
    assert outcome.status == "ran" and stats["steps"] == STEPS
    assert stats["val_accuracy"] >= 0.9 and stats["val_margin"] > 0.5, stats
    assert stats["length_baseline_accuracy"] == 0.5  # replies of equal length: the baseline is a coin
    assert stats["train_accuracy"] >= 0.9 and stats["reward_std"] > 0 and stats["pairs"] == 200
    reader = store.reader(outcome.ref)
    for name in ("metrics.jsonl", "plots/loss.png", "model/model.safetensors", f"model/{REWARD_FILE}", "hf/config.json", f"hf/{REWARD_FILE}", "hf/tokenizer.json", "hf/tokenizer_config.json"):
        assert name in reader.files(), name
    saved = reader.read_json(f"model/{REWARD_FILE}")
    assert saved["mean"] == pytest.approx(stats["reward_mean"]) and saved["std"] == pytest.approx(stats["reward_std"]) and saved["samples"] == 320
    assert run_stage(store, SPEC, config(), refs).status == "skipped"
    version = SPEC.version(config(), [r.digest for r in refs])
    assert SPEC.version(config(margin=1.0), [r.digest for r in refs]) != version  # margin changes the model: identity
    assert SPEC.version(config(log_every=1), [r.digest for r in refs]) == version  # logging does not


def test_export_scores_equal_ours_on_right_padded_pairs(finished):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    store, refs, outcome = finished
    reader = store.reader(outcome.ref)
    ours = load_reward_model(reader.local_path("model/model_config.json").rsplit("/", 1)[0]).eval()
    hf_dir = reader.local_path("hf/config.json").rsplit("/", 1)[0]
    hf = AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert AutoTokenizer.from_pretrained(hf_dir).chat_template  # the SFT export's tokenizer came along
    batch = next(PreferenceLoader.from_stage(store, refs[0], "val", batch_size=6, shuffle=False).eval_batches())
    assert (batch["tokens"] == PAD).any()  # some rows are padded
    with torch.no_grad():
        mine = ours(batch["tokens"], batch["lengths"])[0]
        theirs = hf(input_ids=batch["tokens"]).logits.squeeze(-1)
    assert (mine - theirs).abs().max().item() < 1e-4
    assert (mine[:6] > mine[6:]).float().mean() >= 0.9  # the chosen sides score higher
