"""Stage `ppo` through the stage runner: launcher subprocess, actor + critic engines, commit and
reuse, samples and the export; kill -9 mid-run then resume to bit-identical weights and metrics;
prompts files; inputs that are missing or malformed are named."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmfoundry.infra.config import ModelConfig, PipelineConfig
from lmfoundry.infra.config_posttrain import PpoConfig
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.infra.store import Store
from lmfoundry.model.transformer import load_model
from lmfoundry.tasks.chat.readers import ChatDataError
from lmfoundry.tasks.train.launch import TrainInputError, committed_checkpoints
from lmfoundry.tasks.train.ppo import PpoError
from tests.model.chat_fixtures import commit_chat_tokenizer, commit_model, commit_preference_data, separable_pairs

SPEC = StageSpec("ppo", "lmfoundry.tasks.train.ppo:run_ppo", section="ppo", inputs=("preference_data", "sft", "reward_model", "train_tokenizer"), gpu=True)
SEQ, STEPS, EVERY = 32, 4, 2


def config(**fields) -> PipelineConfig:
    base = dict(steps=STEPS, rollout_batch_size=16, global_batch_size=8, max_new_tokens=6, lr=1e-3, critic_lr=1e-3, log_every=1, eval_every=EVERY,
                checkpoint_every=EVERY, sample_every=EVERY, samples_logged=2, eval_samples=8, distributed=PpoConfig.Distributed(launcher="torchrun"))
    return PipelineConfig(ppo=PpoConfig(**{**base, **fields}))


def commit_reward_model(store: Store, seed: int = 0) -> object:
    """A committed reward_model stage: the fixture policy's body under a seeded head, reward.json with mean/std."""
    from lmfoundry.model.heads import RewardModel, save_reward_model
    from lmfoundry.model.transformer import Transformer, resolve

    version = f"rm{seed}"
    if store.is_committed("reward_model", version):
        return store.ref("reward_model", version)
    torch.manual_seed(seed)
    rm = RewardModel.from_policy(Transformer(resolve(ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2), 64)))
    out = store.open_for_write("reward_model", version)
    with tempfile.TemporaryDirectory() as tmp:
        save_reward_model(rm.state_dict(), rm.cfg, tmp, {"mean": 0.1, "std": 0.5})
        for path in sorted(Path(tmp).iterdir()):
            out.put_file(path, f"model/{path.name}")
    return store.commit(out, {"stats": {}})


def inputs(store):
    return [
        commit_preference_data(store, separable_pairs(48, seed=0), separable_pairs(8, seed=1), SEQ),
        commit_model(store, "sft"), commit_reward_model(store), commit_chat_tokenizer(store),
    ]


def records(store, outcome, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in store.reader(outcome.ref).read_bytes(name).decode().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("store")))
    refs = inputs(store)
    return store, refs, run_stage(store, SPEC, config(), refs)


def test_stage_runs_ppo_commits_samples_exports_and_is_reused(finished):
    store, refs, outcome = finished
    stats = outcome.stats
    assert outcome.status == "ran" and stats["steps"] == STEPS and stats["advantage"] == "gae" and stats["resumed_from_step"] is None
    assert stats["prompts"] == 48 and stats["val_prompts"] == 8 and stats["prompts_too_long"] == 0 and stats["exported"] == "hf"
    files = store.reader(outcome.ref).files()
    for name in ("metrics.jsonl", "samples.jsonl", "plots/ppo.png", "model/model.safetensors", "model/model_config.json", "hf/model.safetensors", "hf/tokenizer.json"):
        assert name in files, name
    rows = records(store, outcome)
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1)) and [r["step"] for r in rows if r["kind"] == "val"] == [0, EVERY, STEPS]
    assert all(r["rollouts"] == 16 and 1 <= r["response_length"] <= 6 and "value_loss" in r for r in train)
    assert train[0]["logprob_drift"] < 1e-4 and train[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the start
    from lmfoundry.infra.report import curve_panels

    panels = curve_panels(rows)  # what lmf report and the Prefect artifact draw
    assert sorted(panels["reward"]) == ["reward", "val_reward"] and panels["kl"] == ["kl"]
    samples = records(store, outcome, "samples.jsonl")
    assert [s["step"] for s in samples] == [2, 2, 4, 4]
    assert samples[0]["prompt_text"].startswith("<|bos|>") and samples[0]["prompt_text"].endswith("<|assistant|>")
    assert samples[0]["response"] and len(samples[0]["response_text"].split()) == len(samples[0]["response"])  # word-level fixture tokenizer
    # the policy changed, and the export is the policy
    final = load_model(store.reader(outcome.ref).local_path("model/model_config.json").rsplit("/", 1)[0]).eval()
    start = load_model(store.reader(refs[1]).local_path("model/model_config.json").rsplit("/", 1)[0])
    assert not torch.equal(final.lm_head.weight, start.lm_head.weight)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(store.reader(outcome.ref).local_path("hf/config.json").rsplit("/", 1)[0], dtype=torch.float32).eval()
    x = torch.tensor([[2, 4, 9, 12, 6, 5]])
    with torch.no_grad():
        assert (final(x)[0] - hf(x).logits).abs().max().item() < 1e-4
    assert run_stage(store, SPEC, config(), refs).status == "skipped"
    assert run_stage(store, SPEC, config(log_every=2, eval_samples=4), refs).status == "skipped"  # execution knobs


def test_kill_9_mid_run_then_resume_gives_bit_identical_weights_and_metrics(finished, store, monkeypatch):
    reference_store, _, reference = finished
    refs = inputs(store)
    monkeypatch.setenv("LMF_FAULT", f"ppo:after_checkpoint:{EVERY}:kill")  # SIGKILL rank 0 right after checkpoint 2
    with pytest.raises(PpoError, match=f"step-{EVERY:07d} is kept"):
        run_stage(store, SPEC, config(), refs)
    version = SPEC.version(config(), [r.digest for r in refs])
    assert committed_checkpoints(store.open_for_write("ppo", version)) == [f"step-{EVERY:07d}"]
    monkeypatch.delenv("LMF_FAULT")
    resumed = run_stage(store, SPEC, config(), refs)
    assert resumed.status == "ran" and resumed.stats["resumed_from_step"] == EVERY
    a = load_file(store.reader(resumed.ref).local_path("model/model.safetensors"))
    b = load_file(reference_store.reader(reference.ref).local_path("model/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timing = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]
    assert timing(records(store, resumed)) == timing(records(reference_store, reference))
    assert records(store, resumed, "samples.jsonl") == records(reference_store, reference, "samples.jsonl")


def test_prompts_file_rows_become_templated_prompts_with_a_stable_val_split(store, tmp_path):
    from lmfoundry.model.chat import prompt_ids
    from lmfoundry.tasks.chat.common import ChatTokenizer
    from lmfoundry.tasks.train.ppo_prompts import file_prompts
    from tests.model.chat_fixtures import SPECIAL, encode

    rows = [{"prompt": f"t{7 + i % 40} t{9 + i % 30}"} for i in range(30)]
    rows += [
        {"prompt": "t20", "system": "t8"},
        {"messages": [{"role": "user", "content": "t12 t13"}, {"role": "assistant", "content": "t14"}, {"role": "user", "content": "t15"}, {"role": "assistant", "content": "t16"}]},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = ChatTokenizer.from_inputs(store, [commit_chat_tokenizer(store)], "ppo")
    train, val = file_prompts(PpoConfig(prompts_file=str(path)), tok)
    expected = [prompt_ids([{"role": "user", "content": r["prompt"]}], encode, SPECIAL) for r in rows[:30]]
    expected += [prompt_ids([{"role": "system", "content": "t8"}, {"role": "user", "content": "t20"}], encode, SPECIAL)]
    expected += [prompt_ids(rows[-1]["messages"][:3], encode, SPECIAL)]  # the trailing reply is dropped
    assert sorted(train + val) == sorted(expected) and 1 <= len(val) <= 4
    reordered = tmp_path / "reordered.jsonl"
    reordered.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    assert sorted(file_prompts(PpoConfig(prompts_file=str(reordered)), tok)[1]) == sorted(val)  # the split depends on content only


def test_missing_or_malformed_inputs_are_named(store, tmp_path):
    refs = inputs(store)
    with pytest.raises(TrainInputError, match="a trained reward model"):
        run_stage(store, SPEC, config(), [refs[0], refs[1], refs[3]])
    with pytest.raises(TrainInputError, match="a trained language model"):
        run_stage(store, SPEC, config(), [refs[0], refs[2], refs[3]])
    with pytest.raises(TrainInputError, match="ppo needs prompts"):
        run_stage(store, SPEC, config(), [refs[1], refs[2], refs[3]])
    with pytest.raises(TrainInputError, match="ppo.prompt_max_len 4"):
        run_stage(store, SPEC, config(prompt_max_len=4), refs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "t9"}\n{"messages": [{"role": "user", "content": "t9"}, {"role": "robot", "content": "t9"}]}\n')
    with pytest.raises(ChatDataError, match=r"bad.jsonl:2: field messages\[1\].role: is 'robot'"):
        run_stage(store, SPEC, config(prompts_file=str(bad)), refs)
    with pytest.raises(ChatDataError, match="ppo.prompts_file .* matched no files"):
        run_stage(store, SPEC, config(prompts_file=str(tmp_path / "none.jsonl")), refs)
    with pytest.raises(TrainInputError, match="needs the train_tokenizer input"):
        run_stage(store, SPEC, config(prompts_file=str(bad)), refs[:3])
