"""Stage `dpo` through the stage runner: reference log-probs computed once and stored in the stage,
the preference learnt, the export loadable; kill -9 mid-run, then the resumed run reuses the
stored reference and ends bit-identical to an uninterrupted one."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.config_posttrain import DpoConfig
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.model.chat_loader import PreferenceLoader
from lmfoundry.model.losses import sequence_logprobs
from lmfoundry.model.transformer import load_model
from lmfoundry.tasks.train.dpo import DpoError
from tests.model.chat_fixtures import commit_chat_tokenizer, commit_model, commit_preference_data, separable_pairs

SPEC = StageSpec("dpo", "lmfoundry.tasks.train.dpo:run_dpo", section="dpo", inputs=("preference_data", "sft", "train_tokenizer"), gpu=True)
SEQ, STEPS, EVERY = 32, 16, 8


def config(**fields) -> PipelineConfig:
    base = dict(steps=STEPS, lr=3e-3, warmup_steps=2, log_every=1, eval_every=EVERY, checkpoint_every=EVERY, distributed=DpoConfig.Distributed(launcher="torchrun"))
    return PipelineConfig(dpo=DpoConfig(**{**base, **fields}))


def inputs(store):
    return [commit_preference_data(store, separable_pairs(96, seed=0), separable_pairs(32, seed=1), SEQ), commit_model(store, "sft"), commit_chat_tokenizer(store)]


def reference_computed(caplog) -> bool:
    return any("reference log-probs of" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from lmfoundry.infra.store import Store

    store = Store(str(tmp_path_factory.mktemp("store")))
    refs = inputs(store)
    return store, refs, run_stage(store, SPEC, config(), refs)


def test_dpo_stores_reference_log_probs_and_learns_the_preference(finished):
    store, refs, outcome = finished
    stats = outcome.stats
    assert outcome.status == "ran" and stats["beta"] == 0.1 and stats["exported"] == "hf"
    assert stats["val_accuracy"] >= 0.9 and stats["val_margin"] > 0 and stats["val_chosen_reward"] > stats["val_rejected_reward"], stats
    reader = store.reader(outcome.ref)
    for name in ("reference/train.arrow", "reference/val.arrow", "reference/COMPLETE.json", "model/model.safetensors", "hf/model.safetensors", "hf/tokenizer.json", "plots/loss.png"):
        assert name in reader.files(), name
    # the stored reference is the starting model's summed reply log-probs, pair by pair
    table = pa.ipc.open_file(pa.memory_map(reader.local_path("reference/val.arrow"))).read_all()
    start = load_model(store.reader(refs[1]).local_path("model/model_config.json").rsplit("/", 1)[0]).eval()
    val = PreferenceLoader.from_stage(store, refs[0], "val", batch_size=32, shuffle=False)
    assert table.column("id").to_pylist() == val.ids()
    batch = next(val.eval_batches())
    with torch.no_grad():
        logps = sequence_logprobs(start(batch["tokens"][:, :-1])[0], batch["tokens"][:, 1:], batch["mask"][:, 1:])
    stored = np.concatenate([table.column("chosen").to_numpy(), table.column("rejected").to_numpy()])
    assert np.abs(logps.numpy() - stored).max() < 1e-4
    records = [json.loads(line) for line in reader.read_bytes("metrics.jsonl").decode().splitlines()]
    first = next(r for r in records if r["kind"] == "train")
    assert abs(first["loss"] - math.log(2)) < 1e-4  # step 1: policy == reference


def test_kill_9_then_resume_reuses_the_reference_and_is_bit_identical(finished, store, monkeypatch, caplog):
    reference_store, _, reference = finished
    refs = inputs(store)
    caplog.set_level(logging.INFO, logger="lmfoundry")
    monkeypatch.setenv("LMF_FAULT", f"dpo:after_checkpoint:{EVERY}:kill")
    with pytest.raises(DpoError, match=f"step-{EVERY:07d} is kept"):
        run_stage(store, SPEC, config(), refs)
    assert reference_computed(caplog)
    caplog.clear()
    monkeypatch.delenv("LMF_FAULT")
    resumed = run_stage(store, SPEC, config(), refs)
    assert resumed.stats["resumed_from_step"] == EVERY
    assert not reference_computed(caplog)  # read back from the stage, not recomputed by the trained model
    a = load_file(store.reader(resumed.ref).local_path("model/model.safetensors"))
    b = load_file(reference_store.reader(reference.ref).local_path("model/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_ranks_give_the_same_reference_and_training(finished, tmp_path):
    """2 CPU ranks (ZeRO-2, 8 pairs each) == 1 rank with 16: the reference log-probs are gathered
    from both ranks into one file, held-out numbers are reduced over ranks."""
    from lmfoundry.infra.store import Store

    reference_store, _, reference = finished
    store = Store(str(tmp_path / "store"))
    two = config(distributed=DpoConfig.Distributed(launcher="torchrun", procs=2, zero_stage=2))
    outcome = run_stage(store, SPEC, two, inputs(store))
    for split in ("train", "val"):
        a = pa.ipc.open_file(pa.memory_map(store.reader(outcome.ref).local_path(f"reference/{split}.arrow"))).read_all()
        b = pa.ipc.open_file(pa.memory_map(reference_store.reader(reference.ref).local_path(f"reference/{split}.arrow"))).read_all()
        assert a.column("id").equals(b.column("id"))
        assert np.abs(a.column("chosen").to_numpy() - b.column("chosen").to_numpy()).max() < 1e-4
    for key in ("val_loss", "val_accuracy", "val_margin"):
        assert abs(outcome.stats[key] - reference.stats[key]) < 1e-4, key
    a = load_file(store.reader(outcome.ref).local_path("model/model.safetensors"))
    b = load_file(reference_store.reader(reference.ref).local_path("model/model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
