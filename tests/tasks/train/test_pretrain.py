"""Stage `pretrain` through the stage runner: DeepSpeed launcher subprocess, commit, reuse,
kill-and-resume, divergence, export to transformers."""
from __future__ import annotations

import json

import pytest
import torch

from lmfoundry.infra.config import ModelConfig, PipelineConfig, PretrainConfig
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.model.transformer import load_model
from lmfoundry.tasks.train.pretrain import PretrainError, PretrainInputError, committed_checkpoints, split_inputs
from tests.model.token_fixtures import commit_tokenizer, commit_tokens, markov_tokens

SPEC = StageSpec("pretrain", "lmfoundry.tasks.train.pretrain:run_pretrain", section=("model", "pretrain"), inputs=("tokenize", "train_tokenizer"), gpu=True)
VOCAB, SEQ = 48, 16
STEPS, EVERY = 40, 20


def config(**pretrain) -> PipelineConfig:
    fields = dict(
        steps=STEPS, global_batch_size=8, lr=1e-2, warmup_steps=2, log_every=1, eval_every=EVERY, checkpoint_every=EVERY,
        distributed=PretrainConfig.Distributed(zero_stage=1),
    )
    fields.update(pretrain)
    return PipelineConfig(model=ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2), pretrain=PretrainConfig(**fields))


def inputs(store):
    train, val = markov_tokens(128, SEQ, VOCAB, seed=0), markov_tokens(16, SEQ, VOCAB, seed=1)
    return [commit_tokens(store, train, val, VOCAB), commit_tokenizer(store, VOCAB)]


def metrics(store, outcome) -> list[dict]:
    text = store.reader(outcome.ref).read_bytes("metrics.jsonl").decode()
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted run of the stage, shared by the tests below."""
    from lmfoundry.infra.store import Store

    store = Store(str(tmp_path_factory.mktemp("store")))
    refs = inputs(store)
    outcome = run_stage(store, SPEC, config(), refs)
    return store, refs, outcome


def test_stage_trains_commits_and_is_reused(finished):
    store, refs, outcome = finished
    assert outcome.status == "ran"
    stats = outcome.stats
    assert stats["steps"] == STEPS and stats["resumed_from_step"] is None and stats["world_size"] == 1
    # two successors per token: context beats the unigram baseline by far
    assert stats["val_ppl"] < 0.5 * stats["unigram_val_ppl"], stats
    assert stats["val_ppl"] < stats["first_val_ppl"]
    assert stats["parameters"] > 0 and stats["flops_per_token"] > 6 * stats["parameters"] * 0.5
    files = store.reader(outcome.ref).files()
    for name in ("metrics.jsonl", "plots/loss.png", "model/model.safetensors", "model/model_config.json", "hf/config.json", "hf/model.safetensors", "hf/tokenizer.json"):
        assert name in files
    assert committed_checkpoints_of(files) == [f"step-{STEPS:07d}"]  # keep_checkpoints=1: older ones removed
    assert [r["step"] for r in metrics(store, outcome) if r["kind"] == "train"] == list(range(1, STEPS + 1))
    again = run_stage(store, SPEC, config(), refs)
    assert again.status == "skipped" and again.ref == outcome.ref
    # execution knobs (ranks, ZeRO stage, logging) are not part of the version
    knobs = config(log_every=5, distributed=PretrainConfig.Distributed(procs=2, zero_stage=3))
    assert run_stage(store, SPEC, knobs, refs).status == "skipped"


def committed_checkpoints_of(files: list[str]) -> list[str]:
    return sorted({f.split("/")[1] for f in files if f.startswith("checkpoints/") and f.endswith("/COMPLETE.json")})


def test_export_loads_in_transformers_with_the_same_logits(finished):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store, _, outcome = finished
    reader = store.reader(outcome.ref)
    ours = load_model(reader.local_path("model/model_config.json").rsplit("/", 1)[0]).eval()
    hf_dir = reader.local_path("hf/config.json").rsplit("/", 1)[0]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenizer("t3 t7 t9 t11", return_tensors="pt").input_ids
    assert ids.tolist() == [[3, 7, 9, 11]] and tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 1
    x = torch.randint(3, VOCAB, (2, SEQ))
    with torch.no_grad():
        assert (ours(x)[0] - hf(x).logits).abs().max().item() < 1e-4


def test_killed_run_resumes_to_the_same_loss(finished, store, monkeypatch):
    _, _, reference = finished
    refs = inputs(store)
    monkeypatch.setenv("LMF_FAULT", f"pretrain:after_checkpoint:{EVERY}:kill")  # SIGKILL rank 0 after step k
    with pytest.raises(PretrainError, match=f"step-{EVERY:07d} is kept"):
        run_stage(store, SPEC, config(), refs)
    version = SPEC.version(config(), [r.digest for r in refs])
    assert not store.is_committed("pretrain", version)
    assert committed_checkpoints(store.open_for_write("pretrain", version)) == [f"step-{EVERY:07d}"]
    monkeypatch.delenv("LMF_FAULT")
    resumed = run_stage(store, SPEC, config(), refs)
    assert resumed.status == "ran" and resumed.stats["resumed_from_step"] == EVERY
    loss = {r["step"]: r["loss"] for r in metrics(store, resumed) if r["kind"] == "train"}
    ref_store = finished[0]
    expected = {r["step"]: r["loss"] for r in metrics(ref_store, reference) if r["kind"] == "train"}
    assert sorted(loss) == list(range(1, STEPS + 1))  # metrics before the kill were kept, later ones rewritten
    assert abs(loss[STEPS] - expected[STEPS]) < 1e-6, (loss, expected)
    assert abs(resumed.stats["val_loss"] - reference.stats["val_loss"]) < 1e-6


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(store):
    refs = inputs(store)
    diverging = config(lr=1e30, min_lr=0.0, warmup_steps=0, checkpoint_every=1, steps=6)
    with pytest.raises(PretrainError, match=r"(loss|gradient norm) became (nan|inf) at step \d.*diverged") as caught:
        run_stage(store, SPEC, diverging, refs)
    version = SPEC.version(diverging, [r.digest for r in refs])
    kept = committed_checkpoints(store.open_for_write("pretrain", version))
    assert kept and f"committed checkpoint {kept[-1]} is kept" in str(caught.value)
    assert not store.is_committed("pretrain", version)


def test_inputs_without_token_shards_are_rejected(store):
    from tests.helpers import commit_docs, docs

    tokenizer = commit_tokenizer(store, VOCAB)
    out = store.open_for_write("pretrain", "x")
    with pytest.raises(PretrainInputError, match="tokenize"):
        split_inputs(out, [commit_docs(store, [docs("a")]), tokenizer])


def test_metrics_table_for_artifacts(finished):
    from lmfoundry.infra.report import metrics_table, training_metrics

    store, _, outcome = finished
    rows = metrics_table(training_metrics(store, outcome.ref))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[EVERY - 1]["val_ppl"] is not None and rows[0]["val_ppl"] is None


def test_the_first_launch_says_it_compiles(tmp_path, monkeypatch):
    """DeepSpeed compiles its CPU communication op on the first launch of a machine: known from the cache."""
    from lmfoundry.tasks.train.launch import shm_op_built

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not shm_op_built()
    (tmp_path / "py311_cpu" / "deepspeed_shm_comm").mkdir(parents=True)
    (tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    assert shm_op_built()
