"""The issue-20 architecture options through the real pretrain stage (DeepSpeed launcher
subprocess, ZeRO-1, one CPU rank): LSH attention, shared layers and every:2 checkpointing
together train, commit, count the unique parameters, save one copy per shared
group, and skip the Hugging Face export with the reason.

    .venv/bin/pytest -q tests/tasks/train/test_architecture_options.py
"""
from __future__ import annotations

from lmfoundry.infra.config import ModelConfig, PipelineConfig, PretrainConfig
from lmfoundry.infra.stage import run_stage
from lmfoundry.infra.store import Store
from lmfoundry.model.transformer import load_model
from tests.tasks.train.test_pretrain import SPEC, inputs


def test_lsh_shared_layers_and_selective_checkpointing_through_the_stage(tmp_path):
    store = Store(str(tmp_path / "store"))
    model = ModelConfig(d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, attention="lsh", lsh_bucket_size=4, share_layers=2)
    pretrain = PretrainConfig(
        steps=12, global_batch_size=8, lr=1e-2, warmup_steps=2, log_every=1, eval_every=6, checkpoint_every=12,
        distributed=PretrainConfig.Distributed(zero_stage=1, activation_checkpointing="every:2"),
    )
    outcome = run_stage(store, SPEC, PipelineConfig(model=model, pretrain=pretrain), inputs(store))
    stats = outcome.stats
    assert outcome.status == "ran" and stats["steps"] == 12
    assert stats["val_ppl"] < stats["first_val_ppl"], stats
    assert stats["exported"].startswith("skipped: LSH attention"), stats["exported"]
    reader = store.reader(outcome.ref)
    files = reader.files()
    assert "hf/config.json" not in files
    for name in ("model_config.json", "model.safetensors"):
        (tmp_path / "model").mkdir(exist_ok=True)
        (tmp_path / "model" / name).write_bytes(reader.read_bytes(f"model/{name}"))
    trained = load_model(tmp_path / "model")
    assert trained.cfg.attention == "lsh" and trained.layers[0] is trained.layers[1] and trained.layers[2] is trained.layers[3]
    assert stats["parameters"] == trained.num_parameters()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert {k.split(".")[1] for k in saved if k.startswith("layers.")} == {"0", "2"}
    assert not any("k_proj" in k for k in saved)  # shared QK
