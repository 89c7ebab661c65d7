"""The objectives through the real run loop (model/train.py Trainer, a DeepSpeed engine on CPU),
in this process as a world of one rank: SFT, reward model, DPO on tiny models and fixture data.

Launchers, several ranks, kill/resume and exports are tested at the stage level
(tests/tasks/train/test_posttrain.py); here each run takes about a second.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmfoundry.infra.config import ModelConfig
from lmfoundry.infra.config_posttrain import DpoConfig, RewardModelConfig, SftConfig
from lmfoundry.infra.store import Store
from lmfoundry.model.objectives import assistant_ce
from lmfoundry.model.transformer import Transformer, load_model, resolve, save_model
from tests.model.chat_fixtures import VOCAB, commit_preference_data, commit_sft_data, conversation, separable_pairs
from tests.model.conftest import one_rank_world

SEQ = 32


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One rank in this process (what a launcher sets up); the environment is restored afterwards."""
    with one_rank_world():
        root = tmp_path_factory.mktemp("objectives")
        torch.manual_seed(0)
        base = Transformer(resolve(ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2), VOCAB))
        save_model(base.state_dict(), base.cfg, root / "base")
        yield Store(str(root / "store")), root


def run(world, objective: str, data, cfg, name: str, options: dict | None = None, init: Path | None = None) -> tuple[dict, list[dict], Path]:
    from lmfoundry.model.train import Trainer, TrainJob

    store, root = world
    work = root / name
    job = TrainJob(objective=objective, recipe=cfg.recipe(), store_url=store.url, data=data, init_from=str(init or root / "base"), options=options or {}, work_dir=str(work))
    summary = Trainer(job).run()
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    return summary, records, work


def recipe(cls, **fields):
    fields.setdefault("distributed", cls.Distributed(zero_stage=0))
    return cls(**{"log_every": 1, "eval_every": 1000, "checkpoint_every": 1000, **fields})


def test_assistant_loss_ignores_prompt_targets_exactly():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 13, requires_grad=True)
    targets = torch.randint(0, 13, (2, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1]])
    results = []
    for t in (targets, torch.where(mask.bool(), targets, (targets + 5) % 13)):  # perturb prompt targets only
        logits.grad = None
        loss = assistant_ce(logits, t, mask)
        loss.backward()
        results.append((loss.detach(), logits.grad.clone()))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)
    assert (grad_a[mask == 0] == 0).all()  # prompt positions get exactly zero gradient
    expected = -sum(logits[b, t].log_softmax(-1)[targets[b, t]] for b, t in mask.nonzero().tolist())
    assert torch.allclose(loss_a, expected.detach(), atol=1e-5)


def test_sft_overfits_one_conversation(world):
    store, _ = world
    chat = conversation(2, seed=5, length=(4, 6))
    data = commit_sft_data(store, [chat] * 16, [chat], SEQ)
    summary, records, work = run(world, "sft", data, recipe(SftConfig, steps=60, lr=1e-2, warmup_steps=5, eval_every=30), "overfit")
    vals = [r for r in records if r["kind"] == "val"]
    assert vals[-1]["val_loss"] < 0.05, vals  # assistant tokens memorised
    assert vals[0]["val_loss"] > vals[-1]["val_loss"] and vals[-1]["val_ppl"] == pytest.approx(math.exp(vals[-1]["val_loss"]))
    assert vals[-1]["val_tokens"] == sum(len(m["content"].split()) + 1 for m in chat if m["role"] == "assistant")
    assert summary["objective"] == "sft" and (work / "final/model.safetensors").exists()


def test_sft_step_is_the_mean_over_every_assistant_token_of_the_global_batch(world):
    """Rows hold different numbers of assistant tokens, yet 4 accumulated micro batches of 2 give
    the same step as one batch of 8: each micro batch is scaled by the step's total count."""
    store, _ = world
    chats = [conversation(int(1 + i % 2), seed=i, length=(1, 6)) for i in range(24)]
    data = commit_sft_data(store, chats, chats[:3], SEQ)
    results = []
    for micro in (0, 2):
        cfg = recipe(SftConfig, steps=3, distributed=SftConfig.Distributed(zero_stage=0, micro_batch_size=micro))
        _, records, work = run(world, "sft", data, cfg, f"micro{micro}")
        results.append(([r["loss"] for r in records if r["kind"] == "train"], load_model(work / "final")))
    (loss_a, model_a), (loss_b, model_b) = results
    assert max(abs(a - b) for a, b in zip(loss_a, loss_b)) < 1e-5, (loss_a, loss_b)
    assert all(torch.allclose(p, q, atol=1e-5) for p, q in zip(model_a.parameters(), model_b.parameters()))


def test_reward_model_separates_a_synthetic_preference_set(world):
    store, _ = world
    data = commit_preference_data(store, separable_pairs(160, seed=0), separable_pairs(40, seed=1), SEQ)
    cfg = recipe(RewardModelConfig, steps=30, lr=3e-3, eval_every=15)
    summary, records, work = run(world, "reward", data, cfg, "reward", {"margin": 0.0, "center_coef": 0.0})
    vals = [r for r in records if r["kind"] == "val"]
    assert vals[-1]["val_accuracy"] >= 0.9 and vals[-1]["val_margin"] > 0.5, vals
    assert vals[-1]["val_length_baseline_accuracy"] == 0.5  # both replies equally long: length says nothing
    assert summary["reward_samples"] == 320 and summary["reward_std"] > 0
    from lmfoundry.model.heads import load_reward_model, reward_stats

    stats = reward_stats(work / "final")
    assert stats["mean"] == pytest.approx(summary["reward_mean"]) and stats["std"] == pytest.approx(summary["reward_std"])
    assert load_reward_model(work / "final").score.weight.shape == (1, 32)


def test_reward_margin_and_centering_options_reach_the_loss(world):
    store, _ = world
    data = commit_preference_data(store, separable_pairs(16, seed=2), separable_pairs(8, seed=3), SEQ)
    first = {}
    for name, options in (("plain", {}), ("margin", {"margin": 2.0}), ("centred", {"center_coef": 10.0})):
        _, records, _ = run(world, "reward", data, recipe(RewardModelConfig, steps=1), f"opt-{name}", options)
        first[name] = records[0]["loss"]
    assert first["margin"] > first["plain"] + 0.5  # the same scores owe 2 more nats of margin
    assert first["centred"] > first["plain"]


def test_dpo_starts_at_log2_and_learns_the_preference(world):
    store, _ = world
    data = commit_preference_data(store, separable_pairs(160, seed=0), separable_pairs(40, seed=1), SEQ)
    cfg = recipe(DpoConfig, steps=30, lr=3e-3, eval_every=30)
    summary, records, work = run(world, "dpo", data, cfg, "dpo", {"beta": 0.1})
    train = [r for r in records if r["kind"] == "train"]
    assert abs(train[0]["loss"] - math.log(2)) < 1e-4 and abs(train[0]["margin"]) < 1e-4  # policy == reference
    val = [r for r in records if r["kind"] == "val"][-1]
    assert val["val_accuracy"] >= 0.9 and val["val_margin"] > 0 and val["val_chosen_reward"] > val["val_rejected_reward"]
    assert (work / "reference/COMPLETE.json").exists() and (work / "reference/train.arrow").exists()
