"""Stage `sft` through the stage runner: DeepSpeed launcher subprocess, commit, reuse, export with
the chat template, and kill -9 mid-run then resume to bit-identical weights."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.config_posttrain import SftConfig
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.model.chat import render
from lmfoundry.model.transformer import load_model
from lmfoundry.tasks.train.launch import TrainInputError, committed_checkpoints
from lmfoundry.tasks.train.sft import SftError
from tests.model.chat_fixtures import SPECIAL, commit_chat_tokenizer, commit_model, commit_sft_data, conversation, encode

SPEC = StageSpec("sft", "lmfoundry.tasks.train.sft:run_sft", section=("model", "sft"), inputs=("sft_data", "pretrain", "train_tokenizer"), gpu=True)
SEQ, STEPS, EVERY = 32, 12, 6


def config(**sft) -> PipelineConfig:
    fields = dict(steps=STEPS, lr=3e-3, warmup_steps=2, log_every=1, eval_every=EVERY, checkpoint_every=EVERY, distributed=SftConfig.Distributed(launcher="torchrun"))
    return PipelineConfig(sft=SftConfig(**{**fields, **sft}))


def inputs(store, val: int = 6):
    chats = [conversation(1 + i % 2, seed=i, length=(2, 6)) for i in range(40 + val)]
    return [commit_sft_data(store, chats[:40], chats[40:], SEQ), commit_model(store, "pretrain"), commit_chat_tokenizer(store)]


def metrics(store, outcome) -> list[dict]:
    return [json.loads(line) for line in store.reader(outcome.ref).read_bytes("metrics.jsonl").decode().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted run of the stage, shared by the tests below."""
    from lmfoundry.infra.store import Store

    store = Store(str(tmp_path_factory.mktemp("store")))
    refs = inputs(store)
    return store, refs, run_stage(store, SPEC, config(), refs)


def test_stage_trains_on_assistant_tokens_commits_and_is_reused(finished):
    store, refs, outcome = finished
    assert outcome.status == "ran"
    stats = outcome.stats
    assert stats["steps"] == STEPS and stats["resumed_from_step"] is None and stats["conversations"] == 46
    assert stats["val_loss"] < stats["first_val_loss"] and stats["val_ppl"] < stats["first_val_ppl"]
    assert stats["exported"] == "hf" and stats["tokens_trained"] == STEPS * 8 * SEQ
    files = store.reader(outcome.ref).files()
    for name in ("metrics.jsonl", "plots/loss.png", "model/model.safetensors", "model/model_config.json", "hf/config.json", "hf/model.safetensors", "hf/tokenizer.json"):
        assert name in files
    records = metrics(store, outcome)
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if r["kind"] == "val"] == [EVERY, STEPS]
    assert run_stage(store, SPEC, config(), refs).status == "skipped"
    assert run_stage(store, SPEC, config(log_every=3, distributed=SftConfig.Distributed(procs=2, zero_stage=2)), refs).status == "skipped"


def test_export_gives_our_logits_and_our_chat_template_in_transformers(finished):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store, _, outcome = finished
    reader = store.reader(outcome.ref)
    ours = load_model(reader.local_path("model/model_config.json").rsplit("/", 1)[0]).eval()
    hf_dir = reader.local_path("hf/config.json").rsplit("/", 1)[0]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    messages = conversation(2, seed=99, system=True)
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert list(ids) == render(messages, encode, SPECIAL)[0]  # the exported template renders what we trained on
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (ours(x)[0] - hf(x).logits).abs().max().item() < 1e-4


def test_kill_9_mid_run_then_resume_gives_bit_identical_weights(finished, store, monkeypatch):
    reference_store, _, reference = finished
    refs = inputs(store)
    monkeypatch.setenv("LMF_FAULT", f"sft:after_checkpoint:{EVERY}:kill")  # SIGKILL rank 0 right after checkpoint k
    with pytest.raises(SftError, match=f"step-{EVERY:07d} is kept"):
        run_stage(store, SPEC, config(), refs)
    version = SPEC.version(config(), [r.digest for r in refs])
    assert committed_checkpoints(store.open_for_write("sft", version)) == [f"step-{EVERY:07d}"]
    monkeypatch.delenv("LMF_FAULT")
    resumed = run_stage(store, SPEC, config(), refs)
    assert resumed.status == "ran" and resumed.stats["resumed_from_step"] == EVERY
    a = load_file(store.reader(resumed.ref).local_path("model/model.safetensors"))
    b = load_file(reference_store.reader(reference.ref).local_path("model/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("tokens_per_s", "mfu", "tokens_per_s_wall", "mfu_wall")  # timings differ between runs
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]
    assert strip(metrics(store, resumed)) == strip(metrics(reference_store, reference))


def test_missing_or_empty_inputs_are_named(store):
    refs = inputs(store)
    with pytest.raises(TrainInputError, match="a trained language model"):
        run_stage(store, SPEC, config(), [refs[0], refs[2]])
    no_val = inputs(store, val=0)
    with pytest.raises(TrainInputError, match="val split .* is empty: raise sft_data.val_fraction"):
        run_stage(store, SPEC, config(), no_val)
