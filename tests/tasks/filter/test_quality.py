"""The fastText quality classifier: trained by the pipeline, versioned, reloaded, applied."""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import random
import shutil

import pytest

from lmfoundry.infra.config import ConfigError, PipelineConfig, QualityClassifierConfig, SourceConfig, build_config
from lmfoundry.infra.docs import iter_docs
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.tasks.filter.quality import best_threshold, load_model, normalize, pieces, positive_scores
from tests.helpers import commit_docs

TRAIN = StageSpec("train_quality_classifier", "lmfoundry.tasks.filter.quality:run_train_quality_classifier", section="quality")
FILTER = StageSpec("quality_filter", "lmfoundry.tasks.filter.quality:run_quality_filter", section="quality", inputs=("docs", "train_quality_classifier"))

COMMON = "the a of and to in is that for it with as on this be by".split()
REFERENCE = "function returns value argument parameter module object attribute class instance default optional method describes".split()
CRAWL = "buy cheap casino click win free offer deal now bonus limited prize subscribe discount".split()


def fake_docs(vocabulary: list[str], n: int, seed: int, prefix: str) -> list[dict]:
    """Documents half of common words, half of words only their kind uses: a learnable difference."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(COMMON) if rng.random() < 0.5 else rng.choice(vocabulary) for _ in range(rng.randint(30, 80))]
        out.append({"id": f"{prefix}{i}", "text": " ".join(words) + "."})
    return out


@pytest.fixture
def reference_file(tmp_path):
    path = tmp_path / "reference.jsonl"
    path.write_text("\n".join(json.dumps({"text": d["text"]}) for d in fake_docs(REFERENCE, 150, seed=1, prefix="r")))
    return path


def quality_config(reference_file, **fields) -> PipelineConfig:
    cfg = QualityClassifierConfig(enabled=True, positive=SourceConfig(name="reference", paths=[str(reference_file)]), bucket=20_000, dim=16, **fields)
    return PipelineConfig(quality=cfg)


def crawl(store, seed: int = 2):
    """A crawl where some pages look like the reference and most do not."""
    return commit_docs(store, [fake_docs(CRAWL, 120, seed=seed, prefix="c"), fake_docs(REFERENCE, 30, seed=seed + 100, prefix="g")])


def test_classifier_learns_a_learnable_difference(store, reference_file):
    pages = commit_docs(store, [fake_docs(CRAWL, 100, seed=2, prefix="c"), fake_docs(CRAWL, 60, seed=3, prefix="d")])
    outcome = run_stage(store, TRAIN, quality_config(reference_file), [pages])
    stats = outcome.stats
    assert stats["trained"] is True
    assert stats["positive_examples"] == 150 and stats["negative_examples"] == 150
    assert stats["validation_examples"] > 30
    assert stats["f1"] > 0.9
    assert 0.0 < stats["threshold"] < 1.0
    reader = store.reader(outcome.ref)
    assert {"model.bin", "classifier.json", "validation.parquet"} <= set(reader.manifest["files"])
    assert reader.read_json("classifier.json")["threshold"] == pytest.approx(stats["threshold"], abs=1e-6)


def test_training_is_deterministic_and_the_stored_model_scores_identically(tmp_path, reference_file):
    from lmfoundry.infra.store import Store

    moved = tmp_path / "elsewhere" / "reference.jsonl"  # the same reference text at another path
    moved.parent.mkdir()
    shutil.copy(reference_file, moved)
    stores = [Store(str(tmp_path / f"store{i}")) for i in range(2)]
    refs = [run_stage(s, TRAIN, quality_config(path), [crawl(s)]).ref for s, path in zip(stores, [reference_file, moved])]
    models = [s.reader(r).read_bytes("model.bin") for s, r in zip(stores, refs)]
    assert hashlib.sha256(models[0]).digest() == hashlib.sha256(models[1]).digest()
    # the scores the freshly trained model gave (recorded by the training process) are
    # reproduced exactly by the model reloaded from the store in this process
    reader = stores[0].reader(refs[0])
    validation = reader.read_table("validation.parquet").to_pylist()
    model = load_model(reader.local_path("model.bin"))
    rescored = positive_scores(model, [row["text"] for row in validation], "__label__hq")
    assert rescored == [row["score"] for row in validation]


def test_filter_scores_new_data_with_a_stored_classifier(store, reference_file):
    root = quality_config(reference_file)
    classifier = run_stage(store, TRAIN, root, [crawl(store, seed=2)]).ref
    newer = crawl(store, seed=7)  # a later version of the data, scored by the classifier trained before
    outcome = run_stage(store, FILTER, root, [newer, classifier])
    kept = list(iter_docs(store, [outcome.ref]))
    stats = outcome.stats
    assert stats["model"] == f"train_quality_classifier/{classifier.version}"
    assert stats["docs_in"] == 150 and stats["docs_out"] == len(kept)
    assert stats["dropped"] == {"low_quality_score": 150 - len(kept)}
    good = {d["id"] for d in kept if d["id"].startswith("g")}
    assert len(good) >= 27 and len(kept) - len(good) <= 12  # reference-like pages kept, crawl pages mostly dropped
    model = load_model(store.reader(classifier).local_path("model.bin"))
    for doc in kept:
        score = json.loads(doc["meta"])["quality_score"]
        assert score >= stats["threshold"]
        assert score == round(positive_scores(model, [normalize(doc["text"])], "__label__hq")[0], 6)
    reader = store.reader(outcome.ref)
    removed = [r for p in reader.files("removed/") for r in reader.read_table(p).to_pylist()]
    assert len(removed) == 150 - len(kept) and {r["reason"] for r in removed} == {"low_quality_score"}
    assert run_stage(store, FILTER, root, [newer, classifier]).status == "skipped"


def test_keep_top_fraction(store, reference_file):
    root = quality_config(reference_file, keep_top_fraction=0.25)
    docs_ref = crawl(store)
    classifier = run_stage(store, TRAIN, root, [docs_ref]).ref
    stats = run_stage(store, FILTER, root, [docs_ref, classifier]).stats
    assert stats["mode"] == "top_fraction"
    assert stats["docs_out"] >= math.ceil(0.25 * 150)  # ties at the cut are all kept
    assert stats["docs_out"] <= math.ceil(0.25 * 150) + 3


def test_model_path_replaces_training(store, tmp_path, reference_file):
    trained = run_stage(store, TRAIN, quality_config(reference_file), [crawl(store)]).ref
    external = tmp_path / "external.bin"
    shutil.copy(store.reader(trained).local_path("model.bin"), external)
    root = PipelineConfig(quality=QualityClassifierConfig(enabled=True, model_path=str(external), threshold=0.5))
    docs_ref = crawl(store, seed=9)
    skipped = run_stage(store, TRAIN, root, [docs_ref])
    assert skipped.stats["trained"] is False and "model_path" in skipped.stats["note"]
    assert "model.bin" not in store.reader(skipped.ref).manifest["files"]
    outcome = run_stage(store, FILTER, root, [docs_ref, skipped.ref])
    assert outcome.stats["model"] == str(external) and outcome.stats["threshold"] == 0.5
    model = load_model(str(external))
    expected = sum(s >= 0.5 for s in positive_scores(model, [normalize(d["text"]) for d in iter_docs(store, [docs_ref])], "__label__hq"))
    assert outcome.stats["docs_out"] == expected


def test_enabling_needs_a_positive_source_or_a_model():
    assert PipelineConfig().quality.enabled is False
    with pytest.raises(ConfigError, match="quality.positive"):
        build_config({"quality": {"enabled": True}})
    with pytest.raises(ConfigError, match="not both"):
        build_config({"quality": {"model_path": "m.bin", "threshold": 0.5, "keep_top_fraction": 0.5}})


def test_filter_only_settings_do_not_retrain(reference_file):
    from lmfoundry.flows.pipeline import stage

    spec = stage("train_quality_classifier")  # the pipeline's own row
    base = quality_config(reference_file)
    tuned = base.model_copy(update={"quality": base.quality.model_copy(update={"keep_top_fraction": 0.3})})
    assert spec.version(base, ["d"]) == spec.version(tuned, ["d"])
    retrained = base.model_copy(update={"quality": base.quality.model_copy(update={"epochs": 3})})
    assert spec.version(base, ["d"]) != spec.version(retrained, ["d"])


def test_best_threshold_and_pieces():
    metrics = best_threshold([0.9, 0.8, 0.7, 0.2, 0.1], [True, True, False, True, False])
    assert metrics["threshold"] == 0.2 and metrics["recall"] == 1.0 and metrics["precision"] == 0.75
    assert best_threshold([0.9, 0.9, 0.1], [True, False, False])["threshold"] == 0.9  # a cut never splits a tie
    text = "\n\n".join(["para " * 30] * 5)
    parts = pieces(text, 400)
    assert all(len(p) <= 400 for p in parts) and "".join(parts).count("para") == 150


def test_a_classifier_that_rejects_nearly_all_the_data_is_flagged():
    from lmfoundry.tasks.filter.quality import degenerate_scores

    below = np.linspace(0.0, 0.2, 100)  # every document under the validated threshold 0.8
    share, warnings = degenerate_scores(below, 0.8)
    assert share == 0.0 and len(warnings) == 1 and "0.800" in warnings[0]
    share, warnings = degenerate_scores(np.linspace(0.0, 1.0, 100), 0.8)
    assert 0.19 <= share <= 0.21 and warnings == []
    assert degenerate_scores(np.array([0.1] * 5), 0.8)[1] == []  # too few documents to judge
