"""Reward-model margin of preference pairs in annotate_pairs (issue 21, review_pairs.reward_model):
the risk term on planted margins, margins of a reward model whose reward is a planted function of
the tokens (computed by hand in the test), the model named as a
directory or as a store version (both in the stage's identity), agreement with reviewers, and
clear errors. A tiny model (d_model 16, one layer): a few seconds on CPU."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lmfoundry.flows.pipeline import stage
from lmfoundry.infra.config import ModelConfig, PipelineConfig
from lmfoundry.infra.stage import run_stage
from lmfoundry.model.heads import RewardModel, save_reward_model
from lmfoundry.model.transformer import resolve
from lmfoundry.tasks.review import labels as L
from lmfoundry.tasks.review.decisions import Batch, Decision, review_stats, write_batch
from lmfoundry.tasks.review.reward import RewardModelError
from tests.helpers import commit_docs
from tests.tasks.chat.conftest import PREFERENCE, read_split

VOCAB = 264  # the tokenizer_ref fixture's vocabulary


def signals(chosen: int, rejected: int, margin: float | None = None, same: bool = False) -> dict:
    out = {"chosen_tokens": chosen, "rejected_tokens": rejected, "length_diff": chosen - rejected, "same_reply": same}
    return out if margin is None else dict(out, rm_margin=margin)


def test_risk_term_of_a_negative_margin_by_hand():
    # 0.5 tanh(2/2) + 0.35 * 8/10: the model prefers the rejected side and the chosen one is shorter
    assert L.pair_risk(signals(2, 10, -2.0))[0] == pytest.approx(0.5 * 0.7615941559557649 + 0.28, abs=1e-6)
    assert L.pair_risk(signals(2, 10, 3.0))[0] == pytest.approx(0.28)  # a positive margin adds nothing
    assert L.pair_risk(signals(10, 2, 5.0))[0] == 0.0
    assert L.pair_risk(signals(4, 4, -1.0))[0] == pytest.approx(0.5 * 0.46211715726000974, abs=1e-6)
    assert L.pair_risk(signals(3, 3, 0.0, same=True))[0] == pytest.approx(0.15)
    risk, why = L.pair_risk(signals(5, 5, -4.0))
    assert why == ["reward model prefers the rejected reply (margin -4.00)"] and risk == pytest.approx(0.5 * math.tanh(2), abs=1e-6)
    # without a margin: the formula versions were committed with, exactly
    assert L.pair_risk(signals(2, 10))[0] == pytest.approx(0.56) and L.pair_risk(signals(3, 3, same=True))[0] == pytest.approx(0.3)


def test_reward_model_agreement_with_reviewers():
    def item(h, margin):
        return {"content_hash": h, "labels": {"preference": "as_given"}, "signals": {"rm_margin": margin}, "share": "risk"}

    sampled = [item("a", 1.0), item("b", -1.0), item("c", 0.5), item("d", -2.0), item("e", 0.0), item("f", 2.0)]
    decided = {
        "a": Decision(item_id="a", content_hash="a", decision="approve", reviewer="r"),  # model agrees (as given)
        "b": Decision(item_id="b", content_hash="b", decision="relabel", labels={"preference": "swapped"}, reviewer="r"),  # agrees (swapped)
        "c": Decision(item_id="c", content_hash="c", decision="reject", reviewer="r"),  # rejected: says nothing
        "d": Decision(item_id="d", content_hash="d", decision="approve", reviewer="r"),  # model prefers the rejected side
        "e": Decision(item_id="e", content_hash="e", decision="approve", reviewer="r"),  # a tie prefers neither
    }  # f: not reviewed
    stats = review_stats(sampled, decided, 6, "pairs")
    assert stats["agreement"]["reward_model"] == pytest.approx(2 / 4)
    assert "reward_model" not in review_stats([dict(it, signals={}) for it in sampled], decided, 6, "pairs")["agreement"]


# ------------------------------------------------------------------ through the stages


SCALE = 1.5  # the head's weight: margins of order 1, where tanh is not flat


def planted_reward_model(directory, sign: float = 1.0, vocab: int = VOCAB) -> RewardModel:
    """A reward model whose reward is a closed-form function of its tokens (planted_reward):
    queries and keys zero, so the last token attends uniformly to every token; the embedding of
    token t is (cos t, sin t, 0...) (constant norm, so the first RMSNorm scales every token
    alike); V and O copy the normed sin t into residual dim 2; the MLP adds nothing; the head
    reads dim 2 after the final RMSNorm."""
    rm = RewardModel(resolve(ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=32), vocab))
    state = {k: torch.zeros_like(v) for k, v in rm.state_dict().items()}
    for k in state:
        if k.endswith("norm.weight"):
            state[k].fill_(1.0)
    t = torch.arange(vocab, dtype=torch.float32)
    state["model.embed_tokens.weight"][:, 0], state["model.embed_tokens.weight"][:, 1] = torch.cos(t), torch.sin(t)
    state["model.lm_head.weight"] = state["model.embed_tokens.weight"]  # tied
    state["model.layers.0.self_attn.v_proj.weight"][0, 1] = 1.0
    state["model.layers.0.self_attn.o_proj.weight"][2, 0] = 1.0
    state["score.weight"][0, 2] = sign * SCALE
    rm.load_state_dict(state)
    save_reward_model(rm.state_dict(), rm.cfg, directory, {"mean": 0.0, "std": 1.0})
    return rm.eval()


def planted_reward(ids: list[int], eps: float = 1e-5) -> float:
    """By hand: the last position holds (cos, sin, k mean_j sin t_j, 0...) with k = 1/rms of an
    embedding row; the final RMSNorm divides by sqrt(mean of squares + eps)."""
    k = 1 / math.sqrt(1 / 16 + eps)
    s = k * sum(math.sin(t) for t in ids) / len(ids)
    return SCALE * s / math.sqrt((1 + s * s) / 16 + eps)


def reference_margin(row: dict) -> float:
    return planted_reward(row["chosen"]) - planted_reward(row["rejected"])


def hand_risk(row: dict, margin: float) -> float:
    chosen, rejected = sum(row["chosen_mask"]), sum(row["rejected_mask"])
    same = [t for t, m in zip(row["chosen"], row["chosen_mask"]) if m] == [t for t, m in zip(row["rejected"], row["rejected_mask"]) if m]
    return 0.5 * max(0.0, math.tanh(-margin / 2)) + 0.35 * min(1.0, max(0.0, (rejected - chosen) / max(chosen, rejected))) + 0.15 * same


def commit_reward_model(store, directory, version: str):
    out = store.open_for_write("reward_model", version)
    for name in ("model.safetensors", "model_config.json", "reward.json"):
        out.put_file(directory / name, f"model/{name}")
    return store.commit(out, {"config": {}})


@pytest.fixture
def pairs(store, tokenizer_ref, tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": "Yes. " * (i % 4 + 1), "rejected": ("No, " if i % 2 else "Okay ") * (7 - i % 5) + "x" * i} for i in range(10)]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"preference_data": {"sources": [{"paths": [str(path)]}], "val_fraction": 0.0}}
    cfg = PipelineConfig.model_validate(dict(base, review_pairs={"enabled": True}))
    return base, run_stage(store, PREFERENCE, cfg, [tokenizer_ref]).ref


def annotate(store, base, pairs_ref, tokenizer_ref, **section):
    cfg = PipelineConfig.model_validate(dict(base, review_pairs={"enabled": True, "top_k": 4, "random_k": 2, **section}))
    out = run_stage(store, stage("annotate_pairs"), cfg, [pairs_ref, tokenizer_ref])
    table = store.reader(out.ref).read_table("annotations.parquet").to_pylist()
    return cfg, out, {r["id"]: dict(r, signals=json.loads(r["signals"])) for r in table}


def test_margins_risk_and_identity_with_a_reward_model(store, tokenizer_ref, pairs, tmp_path):
    base, pairs_ref = pairs
    rows = {r["id"]: r for r in read_split(store, pairs_ref, "train").to_pylist()}
    planted_reward_model(tmp_path / "rm")
    _, plain, plain_items = annotate(store, base, pairs_ref, tokenizer_ref)
    assert all("rm_margin" not in it["signals"] for it in plain_items.values())

    cfg, scored, items = annotate(store, base, pairs_ref, tokenizer_ref, reward_model=str(tmp_path / "rm"))
    assert scored.ref.version != plain.ref.version and cfg.review_pairs.identity()["reward_model"] == str(tmp_path / "rm")
    margins = {i: reference_margin(rows[i]) for i in rows}
    assert sum(m < -0.5 for m in margins.values()) >= 2 and sum(m > 0.5 for m in margins.values()) >= 2  # both signs planted
    for i, it in items.items():
        s = it["signals"]
        assert s["rm_margin"] == pytest.approx(margins[i], abs=1e-4) and s["rm_chosen"] - s["rm_rejected"] == pytest.approx(s["rm_margin"], abs=2e-6)
        assert it["risk"] == pytest.approx(hand_risk(rows[i], margins[i]), abs=1e-4), i
    sample = store.reader(scored.ref).read_json("sample.json")["items"]
    by_hand = sorted(rows, key=lambda i: (-round(hand_risk(rows[i], margins[i]), 6), i))
    assert [it["item_id"] for it in sample[:4]] == by_hand[:4]
    plain_top = [it["item_id"] for it in store.reader(plain.ref).read_json("sample.json")["items"][:4]]
    assert plain_top != by_hand[:4]  # the margin term changed who comes first

    # the same model as a committed store version: the same margins, its own version
    commit_reward_model(store, tmp_path / "rm", "00000000000000aa")
    _, stored, stored_items = annotate(store, base, pairs_ref, tokenizer_ref, reward_model="reward_model@00000000000000aa")
    assert {i: it["signals"] for i, it in stored_items.items()} == {i: it["signals"] for i, it in items.items()}
    assert len({plain.ref.version, scored.ref.version, stored.ref.version}) == 3

    # retrained in place (the head negated): the fingerprint sees it, every margin flips
    planted_reward_model(tmp_path / "rm", sign=-1.0)
    _, flipped, flipped_items = annotate(store, base, pairs_ref, tokenizer_ref, reward_model=str(tmp_path / "rm"))
    assert flipped.ref.version != scored.ref.version and flipped.status == "ran"
    for i, it in flipped_items.items():
        assert it["signals"]["rm_margin"] == pytest.approx(-margins[i], abs=1e-4)

    # a reviewer decides two sampled pairs; the review reports whether the model agreed
    worst = max(items, key=lambda i: -items[i]["signals"]["rm_margin"])
    best = max(items, key=lambda i: items[i]["signals"]["rm_margin"])
    write_batch(store, Batch(kind="pairs", source="test", reviewer="cy", decisions=[
        Decision(item_id=worst, content_hash=worst, decision="relabel", labels={"preference": "swapped"}, reviewer="cy"),  # agrees
        Decision(item_id=best, content_hash=best, decision="approve", reviewer="cy"),  # agrees
    ]))
    reviewed = run_stage(store, stage("review_pairs"), cfg, [pairs_ref, scored.ref])
    sampled = {it["item_id"] for it in sample}
    expected = sum(i in sampled for i in (worst, best))
    assert reviewed.stats["review"]["reviewed"] == expected >= 1 and reviewed.stats["review"]["agreement"]["reward_model"] == 1.0


def test_unreadable_reward_model_errors_name_the_field(store, tokenizer_ref, pairs, tmp_path):
    base, pairs_ref = pairs
    with pytest.raises(RewardModelError, match=r"review_pairs.reward_model: .*nowhere is not a reward model directory \(missing model.safetensors, model_config.json, reward.json\); name a committed version"):
        annotate(store, base, pairs_ref, tokenizer_ref, reward_model=str(tmp_path / "nowhere"))
    with pytest.raises(RewardModelError, match="review_pairs.reward_model: stage 'reward_model' version 0123456789abcdef is not committed in"):
        annotate(store, base, pairs_ref, tokenizer_ref, reward_model="reward_model@0123456789abcdef")
    planted_reward_model(tmp_path / "small", vocab=40)
    with pytest.raises(RewardModelError, match="the reward model's vocabulary has 40: it was trained with another tokenizer"):
        annotate(store, base, pairs_ref, tokenizer_ref, reward_model=str(tmp_path / "small"))
    (tmp_path / "small" / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(RewardModelError, match="review_pairs.reward_model: cannot load the reward model in"):
        annotate(store, base, pairs_ref, tokenizer_ref, reward_model=str(tmp_path / "small"))
    docs_cfg = PipelineConfig.model_validate({"review_docs": {"enabled": True, "reward_model": str(tmp_path / "small")}})
    with pytest.raises(ValueError, match="review_docs.reward_model: a reward model scores preference pairs only"):
        run_stage(store, stage("annotate_docs"), docs_cfg, [commit_docs(store, [[{"id": "a", "text": "hello"}]])])
    assert "reward_model" not in PipelineConfig().review_pairs.identity()  # unset: versions committed before keep their hash
