"""The config tree: presets, overrides, identity vs execution fields, clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from lmfoundry.infra.config import ConfigError, PipelineConfig, build_config, load_config


def test_demo_preset_loads_and_overrides_apply():
    cfg = load_config(None, ["near_dedup.threshold=0.85", "compute.workers=1"])
    assert cfg.near_dedup.threshold == 0.85
    assert cfg.compute.workers == 1
    assert cfg.ingest.sources, "the demo preset names real sources"


def test_sections_are_frozen_and_strict():
    cfg = PipelineConfig()
    with pytest.raises(Exception):
        cfg.near_dedup.threshold = 0.5  # type: ignore[misc]
    with pytest.raises(ConfigError, match=r"near_dedup\.thresold: Extra inputs are not permitted"):
        build_config({}, ["near_dedup.thresold=0.85"])


def test_invalid_value_names_the_field_path():
    with pytest.raises(ConfigError, match=r"near_dedup\.threshold: Input should be less than or equal to 1"):
        build_config({}, ["near_dedup.threshold=3"])
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        build_config({}, ["near_dedup.threshold"])


def test_missing_or_malformed_preset(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_execution_fields_are_not_identity():
    base = build_config({})
    knobs = build_config({}, ["compute.workers=7", "store.lease_ttl_s=5"])
    assert base.compute.identity() == knobs.compute.identity()
    assert base.store.identity() == knobs.store.identity()
    assert build_config({}, ["exact_dedup.normalize=none"]).exact_dedup.identity() != base.exact_dedup.identity()


@pytest.mark.parametrize("preset", sorted(p.name for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")))
def test_every_shipped_preset_is_valid(preset):
    load_config(Path(__file__).resolve().parents[2] / "configs" / preset)


def test_a_relative_store_resolves_against_the_repository():
    """The CLI, a served flow and a worker in a scratch directory must share one store."""
    from lmfoundry.infra.config import REPO_ROOT, build_config

    assert build_config({"store": {"url": "runs/store"}}).store.url == str(REPO_ROOT / "runs" / "store")
    assert build_config({"store": {"url": "/abs/store"}}).store.url == "/abs/store"
    assert build_config({"store": {"url": "s3://bucket/prefix"}}).store.url == "s3://bucket/prefix"
    assert build_config({}, ["store.url=.lmf/x"]).store.url == str(REPO_ROOT / ".lmf" / "x")


def test_override_typos_name_the_override_and_the_nearest_field():
    from lmfoundry.infra.config import build_config

    with pytest.raises(ConfigError) as typo:
        build_config({}, ["near_dedup.treshold=0.8"], origin="preset.yaml")
    assert "near_dedup.treshold" in str(typo.value) and "did you mean 'threshold'" in str(typo.value)
    assert "from override 'near_dedup.treshold=0.8'" in str(typo.value)
    with pytest.raises(ConfigError) as bad_value:
        build_config({}, ["near_dedup.threshold=high"])
    assert "from override 'near_dedup.threshold=high'" in str(bad_value.value)
    with pytest.raises(ConfigError) as from_file:
        build_config({"near_dedup": {"treshold": 0.8}}, ["exact_dedup.normalize=none"], origin="preset.yaml")
    assert "did you mean 'threshold'" in str(from_file.value) and "from override" not in str(from_file.value)


def test_overrides_index_list_items():
    from lmfoundry.infra.config import build_config

    data = {"ingest": {"sources": [{"name": "a", "paths": ["a/*"]}, {"name": "b", "paths": ["b/*"]}]}}
    cfg = build_config(data, ['ingest.sources.1.paths=["c/*.txt"]'])
    assert [s.paths for s in cfg.ingest.sources] == [["a/*"], ["c/*.txt"]]
    assert data["ingest"]["sources"][1]["paths"] == ["b/*"]  # the caller's data is not changed
    with pytest.raises(ConfigError, match="needs an index below 2"):
        build_config(data, ["ingest.sources.2.paths=[]"])


def test_post_training_is_off_by_default_and_needs_its_data():
    from lmfoundry.infra.config import build_config

    from lmfoundry.flows.pipeline import stage

    default = build_config({})
    assert not any(getattr(default, name).enabled for name in ("sft_data", "preference_data", "sft", "reward_model", "dpo", "ppo"))
    # a stage reading several sections (sft: model + sft) is off when its own section is
    assert not stage("sft").enabled(default) and stage("pretrain").enabled(default)
    with pytest.raises(ConfigError, match="sft is enabled but needs sft_data"):
        build_config({"sft": {"enabled": True}})
    with pytest.raises(ConfigError, match="dpo is enabled but needs preference_data"):
        build_config({"sft_data": {"enabled": True}, "sft": {"enabled": True}, "dpo": {"enabled": True}})
    demo = load_config()  # the demo preset runs the whole pipeline
    assert all(getattr(demo, name).enabled for name in ("sft_data", "preference_data", "sft", "reward_model", "dpo", "ppo"))
    with pytest.raises(ConfigError, match="ppo is enabled but needs reward_model"):
        build_config({"sft_data": {"enabled": True}, "preference_data": {"enabled": True}, "sft": {"enabled": True}, "ppo": {"enabled": True}})
