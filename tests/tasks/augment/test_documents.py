"""Stage `augment_docs`: originals kept, variants linked to their source and independent of the
shard layout; near_dedup reports what became of the variants; the review gate shows the link."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.docs import iter_docs
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.tasks.dedup.near_dedup import NEAR_DUPLICATE, augmented_outcomes
from lmfoundry.tasks.review.labels import doc_signals
from tests.helpers import commit_docs

AUGMENT_DOCS = StageSpec("augment_docs", "lmfoundry.tasks.augment.documents:run_augment_docs", section="augment_docs")
NEAR = StageSpec("near_dedup", "lmfoundry.tasks.dedup.near_dedup:run_near_dedup", section="near_dedup")
CAR = "i really want to buy a large car quickly"  # six replaceable words (tests/tasks/augment/test_conversations.py)


def corpus(n: int) -> list[dict]:
    # long enough for many shingles; numbers are protected, so they stay and tell documents apart
    return [{"id": f"doc{i}", "text": " ".join(f"{CAR} on day {i * 100 + k} ." for k in range(30)), "meta": {"language": "en"}} for i in range(n)]


def config(**augment) -> PipelineConfig:
    return PipelineConfig.model_validate({"augment_docs": {"enabled": True, **augment}, "compute": {"workers": 1, "progress": False}})


def test_variants_follow_their_sources_and_do_not_depend_on_the_shard_layout(store):
    docs = corpus(4)
    cfg = config(copies=2, synonym_rate=0.5)
    one = run_stage(store, AUGMENT_DOCS, cfg, [commit_docs(store, [docs])])
    two = run_stage(store, AUGMENT_DOCS, cfg, [commit_docs(store, [docs[:1], docs[1:]])])
    by_id = lambda ref: {d["id"]: d for d in iter_docs(store, [ref])}  # noqa: E731
    a, b = by_id(one.ref), by_id(two.ref)
    assert a == b and one.stats["variants"] == {"synonyms": 8} and one.stats["docs_out"] == 12
    for doc in docs:
        assert a[doc["id"]]["text"] == doc["text"]  # originals unchanged
        for copy in (0, 1):
            variant = a[f"{doc['id']}#aug-synonyms-{copy}"]
            assert json.loads(variant["meta"]) == {"language": "en", "augmented_from": doc["id"], "augmentation": "synonyms"}
            assert variant["text"] != doc["text"]
            # only the replaceable words moved: the protected numbers are all still there, in order
            assert [w for w in variant["text"].split() if w.isdigit()] == [w for w in doc["text"].split() if w.isdigit()]
    assert a["doc0#aug-synonyms-0"]["text"] != a["doc0#aug-synonyms-1"]["text"]


def test_near_dedup_says_which_variants_were_too_light_to_keep(store):
    source = commit_docs(store, [corpus(3)])
    light = run_stage(store, AUGMENT_DOCS, config(synonym_rate=0.01, seed=3), [source])
    heavy = run_stage(store, AUGMENT_DOCS, config(synonym_rate=1.0), [source])
    near_cfg = PipelineConfig.model_validate({"compute": {"workers": 1, "progress": False}})
    assert light.stats["variants"]["synonyms"] == 3  # a few words each: still near-duplicates
    light_near = run_stage(store, NEAR, near_cfg, [light.ref])
    assert light_near.stats["augmented"] == {"removed_near_own_source": 3}
    assert light_near.stats["docs_out"] == 3
    heavy_near = run_stage(store, NEAR, near_cfg, [heavy.ref])  # every car sentence rewritten: new documents
    assert heavy_near.stats["augmented"] == {"kept": 3} and heavy_near.stats["docs_out"] == 6
    assert run_stage(store, NEAR, near_cfg, [source]).stats["augmented"] == {}


def test_augmented_outcomes_count_each_kind_once():
    ids = pa.chunked_array([["a", "a#aug-synonyms-0", "b#aug-synonyms-0", "c#aug-synonyms-0", "d", "e"]])
    reason = np.array(["", NEAR_DUPLICATE, NEAR_DUPLICATE, "", NEAR_DUPLICATE, NEAR_DUPLICATE], object)
    keeper = np.array([None, "a", "x", None, "d#aug-synonyms-1", "f"], object)
    assert augmented_outcomes(ids, reason, keeper) == {"removed_near_own_source": 2, "removed_near_other": 1, "kept": 1}


def test_the_review_gate_sees_the_link():
    signals = doc_signals(CAR, {"augmented_from": "doc7", "augmentation": "synonyms"})
    assert signals["augmented_from"] == "doc7" and signals["augmentation"] == "synonyms"
    assert "augmented_from" not in doc_signals(CAR, {})


def test_off_by_default_and_near_dedup_then_reads_exact_dedup():
    from lmfoundry.flows.pipeline import stage

    assert not stage("augment_docs").enabled(PipelineConfig())
    assert stage("near_dedup").inputs == ("augment_docs",) and stage("augment_docs").inputs == ("exact_dedup",)


def test_backtranslated_documents_are_the_models_round_trip(store, translation_models):
    from tests.tasks.augment.conftest import direct_round_trip

    forward, backward = translation_models
    docs = [{"id": "d0", "text": "how do i reset my password ?"}, {"id": "d1", "text": "run it again ! 42"}]
    cfg = config(methods=["backtranslation"], copies=3, backtranslation={"forward": forward, "backward": backward, "max_new_tokens": 12})
    outcome = run_stage(store, AUGMENT_DOCS, cfg, [commit_docs(store, [docs])])
    got = {d["id"]: d["text"] for d in iter_docs(store, [outcome.ref])}
    expected = {"d0#aug-backtranslation-0": direct_round_trip(forward, backward, docs[0]["text"]),
                "d1#aug-backtranslation-0": direct_round_trip(forward, backward, "run it again !") + " 42"}
    assert {k: v for k, v in got.items() if "#aug-" in k} == {k: v for k, v in expected.items() if v != docs[int(k[1])]["text"]}
    assert outcome.stats["variants"].get("backtranslation", 0) + outcome.stats["unchanged"].get("backtranslation", 0) == 2  # greedy: one copy
