"""Review stages (issue 21): risk formulas on planted items, the sample, applying decisions to
documents and preference pairs, the agreement / remainder-error report, Label Studio round trip,
and versions downstream unchanged while review is off."""
from __future__ import annotations

import json
import random
import xml.etree.ElementTree as ET

import pytest

from lmfoundry.flows.pipeline import stage
from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.docs import iter_docs
from lmfoundry.infra.stage import StageSpec, plan, run_stage
from lmfoundry.tasks.review import labels as L
from lmfoundry.tasks.review.decisions import Batch, Decision, read_batches, wilson, write_batch
from lmfoundry.tasks.review.label_studio import export_tasks, import_annotations, labeling_config
from lmfoundry.tasks.train.launch import input_kind
from tests.flows.corpus import sentence
from tests.helpers import commit_docs
from tests.tasks.chat.conftest import PREFERENCE, read_split


def prose(seed: int) -> str:
    """Text that passes the default heuristic rules (distinct plain sentences, one per line)."""
    return "\n".join(sentence(random.Random(seed * 100 + i)) for i in range(8))


def meta(q=0.9, ls=0.99, language="en", pii=None):
    return {"quality_score": q, "language_score": ls, "language": language, **({"pii": pii} if pii else {})}


PLANTED = [  # id, text, meta; risks by the formula in tasks/review/__init__.py, by hand:
    ("clean", prose(1), meta()),  # 0.35*0.1 + 0.15*0.01 = 0.0365
    ("pii", prose(2), meta(pii={"EMAIL": 2, "PHONE": 1})),  # 0.0365 + 0.25*min(1, 3/3) = 0.2865
    ("lowq", prose(3), meta(q=0.1)),  # 0.35*0.9 + 0.0015 = 0.3165
    ("spam", "buy now " * 40, meta()),  # 0.0365 + 0.25 (fails gopher_top_2gram) = 0.2865
    ("nometa", prose(4), {}),  # unknown scores count 0.5: 0.175 + 0.075 = 0.25
]
RISK = {"clean": 0.0365, "pii": 0.2865, "lowq": 0.3165, "spam": 0.2865, "nometa": 0.25}


def review_config(**section) -> PipelineConfig:
    return PipelineConfig.model_validate({"review_docs": {"enabled": True, **section}, "review_pairs": {"enabled": True, **section}})


def test_doc_risk_and_labels_of_planted_documents():
    for item_id, text, m in PLANTED:
        signals = L.doc_signals(text, m)
        risk, why = L.doc_risk(signals)
        assert risk == pytest.approx(RISK[item_id]), item_id
    signals = L.doc_signals(PLANTED[3][1], PLANTED[3][2])
    assert signals["heuristic"] == "gopher_top_2gram" and "fails default rule: gopher_top_2gram" in L.doc_risk(signals)[1]
    assert L.doc_labels(meta(q=0.1, language="de"), L.doc_signals("x", meta(q=0.1))) == {"language": "de", "quality": "low"}
    assert L.doc_labels({}, L.doc_signals("x", {})) == {"language": "unknown", "quality": "unknown"}


def test_pair_risk_planted():
    # chosen 2 tokens, rejected 10: 0.7 * 8/10
    assert L.pair_risk(L.pair_signals([1, 2], list(range(10))))[0] == pytest.approx(0.56)
    assert L.pair_risk(L.pair_signals(list(range(10)), [1, 2]))[0] == 0.0
    assert L.pair_risk(L.pair_signals([5, 6], [5, 6]))[0] == pytest.approx(0.3)


def test_sample_is_top_risk_then_a_seeded_random_share_independent_of_order():
    items = [{"item_id": f"i{k}", "content_hash": f"h{k:03d}", "risk": k / 100} for k in range(60)]
    batch = L.sample(items, top_k=5, random_k=7, seed=3)
    assert [it["item_id"] for it in batch[:5]] == ["i59", "i58", "i57", "i56", "i55"]
    assert [it["share"] for it in batch] == ["risk"] * 5 + ["random"] * 7 and [it["n"] for it in batch] == list(range(1, 13))
    randoms = {it["item_id"] for it in batch[5:]}
    assert len(randoms) == 7 and not randoms & {f"i{k}" for k in range(55, 60)}
    shuffled = items[:]
    random.Random(9).shuffle(shuffled)
    assert L.sample(shuffled, 5, 7, seed=3) == batch
    assert {it["item_id"] for it in L.sample(items, 5, 7, seed=4)[5:]} != randoms  # the seed draws


def test_relabel_parsing_names_the_item_and_the_allowed_values():
    assert L.parse_relabel(" language = de , quality=low ", "docs", "item 1") == {"language": "de", "quality": "low"}
    assert L.parse_relabel("", "pairs", "item 1") == {}
    with pytest.raises(ValueError, match="item 7: relabel 'colour=red' is not LABEL=VALUE with LABEL one of language, quality"):
        L.parse_relabel("colour=red", "docs", "item 7")
    with pytest.raises(ValueError, match="item 2: preference=better is not allowed; preference is one of as_given, swapped"):
        L.parse_relabel("preference=better", "pairs", "item 2")


def test_wilson_interval_known_values():
    assert wilson(2, 10) == pytest.approx((0.0567, 0.5098), abs=1e-4)  # the textbook 2/10 interval
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(0, 0) is None


def _decide(item_id, text, decision, reviewer="ana", **labels):
    return Decision(item_id=item_id, content_hash=L.text_hash(text), decision=decision, labels=labels, reason=f"because {item_id}", reviewer=reviewer)


def test_documents_annotated_sampled_and_decisions_applied(store):
    docs_ref = commit_docs(store, [[{"id": i, "text": t, "meta": m} for i, t, m in PLANTED[:3]], [{"id": i, "text": t, "meta": m} for i, t, m in PLANTED[3:]]])
    cfg = review_config(top_k=2, random_k=2, seed=0)
    annotated = run_stage(store, stage("annotate_docs"), cfg, [docs_ref])
    sample = store.reader(annotated.ref).read_json("sample.json")
    assert sample["population"] == 5 and [it["item_id"] for it in sample["items"][:2]] == ["lowq", "spam" if L.text_hash(PLANTED[3][1]) < L.text_hash(PLANTED[1][1]) else "pii"]
    assert [it["share"] for it in sample["items"]] == ["risk", "risk", "random", "random"]
    assert annotated.stats["labels"]["quality"] == {"high": 3, "low": 1, "unknown": 1}
    texts = {i: t for i, t, _ in PLANTED}
    # a reviewer: reject pii, relabel lowq, approve the rest of the sample; an old batch overruled
    write_batch(store, Batch(kind="docs", source="test", reviewer="bo", decisions=[_decide("pii", texts["pii"], "approve", "bo")]))
    decisions = [_decide("pii", texts["pii"], "reject"), _decide("lowq", texts["lowq"], "relabel", language="de", quality="high")]
    decisions += [_decide(it["item_id"], texts[it["item_id"]], "approve") for it in sample["items"] if it["item_id"] not in ("pii", "lowq")]
    write_batch(store, Batch(kind="docs", source="test", reviewer="ana", decisions=decisions))
    reviewed = run_stage(store, stage("review_docs"), cfg, [docs_ref, annotated.ref])
    out = {d["id"]: d for d in iter_docs(store, [reviewed.ref])}
    assert sorted(out) == ["clean", "lowq", "nometa", "spam"]  # pii rejected, the rest kept
    lowq = json.loads(out["lowq"]["meta"])
    assert lowq["labels"] == {"language": "de", "quality": "high"} and lowq["review"]["reviewer"] == "ana"
    assert lowq["quality_score"] == 0.1  # the machine's score stays beside the reviewer's label
    stats = reviewed.stats
    assert stats["items_in"] == 5 and stats["items_out"] == stats["docs_out"] == 4 and stats["rejected"] == 1 and stats["relabelled"] == 1
    sampled_ids = [it["item_id"] for it in sample["items"]]
    n_reviewed = sum(i in sampled_ids for i in texts if i in {d.item_id for d in decisions})
    assert stats["review"]["reviewed"] == n_reviewed == 4
    # keep: 1 of 4 rejected; language: lowq relabelled of the 3 not rejected; quality: lowq low -> high
    assert stats["review"]["agreement"] == {"keep": 0.75, "language": pytest.approx(2 / 3, abs=1e-6), "quality": pytest.approx(2 / 3, abs=1e-6)}
    randoms = [it["item_id"] for it in sample["items"] if it["share"] == "random"]
    errors = sum(i in ("pii", "lowq") for i in randoms)
    assert stats["review"]["random_reviewed"] == 2 and stats["review"]["random_errors"] == errors
    assert stats["review"]["remainder_error_ci95"] == list(wilson(errors, 2)) and stats["review"]["remainder_items"] == 1
    recorded = store.reader(reviewed.ref).read_json("decisions.json")["applied"]
    assert {(d["item_id"], d["decision"], d["reviewer"]) for d in recorded} >= {("pii", "reject", "ana"), ("lowq", "relabel", "ana")}
    assert all(d["decided_at"] and d["batch"] for d in recorded)

    # the same text again (a new id, another shard layout): the decision is reused by content hash
    again = commit_docs(store, [[{"id": "pii-copy", "text": texts["pii"]}, {"id": "fresh", "text": prose(9)}]])
    annotated2 = run_stage(store, stage("annotate_docs"), cfg, [again])
    reviewed2 = run_stage(store, stage("review_docs"), cfg, [again, annotated2.ref])
    assert [d["id"] for d in iter_docs(store, [reviewed2.ref])] == ["fresh"]


def test_preference_pairs_rejected_dropped_and_swapped(store, tokenizer_ref, tmp_path):
    rows = [
        {"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Green, always and forever, I am sure."},  # chosen much shorter: riskiest
        {"prompt": "Two plus two?", "chosen": "Four, of course it is four.", "rejected": "Five."},
        {"prompt": "Capital of France?", "chosen": "Paris is the capital.", "rejected": "Rome."},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = PipelineConfig.model_validate({"preference_data": {"sources": [{"paths": [str(path)]}], "val_fraction": 0.0}, "review_pairs": {"enabled": True, "top_k": 1, "random_k": 1}})
    pairs = run_stage(store, PREFERENCE, cfg, [tokenizer_ref])
    annotated = run_stage(store, stage("annotate_pairs"), cfg, [pairs.ref, tokenizer_ref])
    sample = store.reader(annotated.ref).read_json("sample.json")
    first = sample["items"][0]
    assert first["preview"]["chosen"].startswith("Blue.") and first["preview"]["rejected"].startswith("Green, always") and "Sky colour?" in first["preview"]["prompt"]
    assert first["risk"] > 0.5 and first["signals"]["length_diff"] < 0
    before = read_split(store, pairs.ref, "train").to_pylist()
    by_text = {it["preview"]["prompt"]: it for it in store.reader(annotated.ref).read_json("sample.json")["items"]}
    assert len(by_text) == 2
    all_items = {r["id"]: r for r in before}
    swap_id = first["content_hash"]
    reject_id = next(i for i in all_items if i != swap_id and i in {it["content_hash"] for it in sample["items"]})
    write_batch(store, Batch(kind="pairs", source="test", reviewer="cy", decisions=[
        Decision(item_id=swap_id, content_hash=swap_id, decision="relabel", labels={"preference": "swapped"}, reviewer="cy"),
        Decision(item_id=reject_id, content_hash=reject_id, decision="reject", reason="nonsense", reviewer="cy"),
    ]))
    reviewed = run_stage(store, stage("review_pairs"), cfg, [pairs.ref, annotated.ref])
    after = {r["id"]: r for r in read_split(store, reviewed.ref, "train").to_pylist()}
    assert set(after) == set(all_items) - {reject_id}
    assert after[swap_id]["chosen"] == all_items[swap_id]["rejected"] and after[swap_id]["rejected_mask"] == all_items[swap_id]["chosen_mask"]
    kept = next(i for i in after if i != swap_id)
    assert after[kept] == all_items[kept]
    index = store.reader(reviewed.ref).read_json("index.json")
    assert index["pairs"] == 2 and index["format"] == "preference" and index["seq_len"] == store.reader(pairs.ref).read_json("index.json")["seq_len"]
    assert input_kind(store.open_for_write("probe", "v"), reviewed.ref) == "preference_data"  # the trainers take it as their pairs
    assert reviewed.stats["review"]["agreement"]["preference"] == 0.0 and reviewed.stats["review"]["agreement"]["keep"] == 0.5


def test_label_studio_round_trip():
    sample = {"kind": "docs", "population": 9, "items": [
        {"n": 1, "item_id": "a", "content_hash": "ha", "share": "risk", "risk": 0.4, "why": ["x"], "labels": {"language": "en", "quality": "low"}, "signals": {}, "preview": {"url": "", "text": "Alpha"}},
        {"n": 2, "item_id": "b", "content_hash": "hb", "share": "random", "risk": 0.1, "why": [], "labels": {"language": "en", "quality": "high"}, "signals": {}, "preview": {"url": "", "text": "Beta"}},
        {"n": 3, "item_id": "c", "content_hash": "hc", "share": "random", "risk": 0.1, "why": [], "labels": {"language": "en", "quality": "high"}, "signals": {}, "preview": {"url": "", "text": "Gamma"}},
    ]}
    tasks = export_tasks(sample)
    assert tasks[0] == {"id": 1, "data": {"item_id": "a", "content_hash": "ha", "share": "risk", "risk": 0.4, "why": "x", "machine_labels": "language=en, quality=low", "url": "", "text": "Alpha"}}
    config = ET.fromstring(labeling_config("docs"))
    names = {el.get("name"): el.tag for el in config.iter() if el.get("name")}
    assert names == {"text": "Text", "decision": "Choices", "reason": "TextArea", "relabel": "TextArea"}
    assert [c.get("value") for c in config.iter("Choice")] == ["approve", "reject", "relabel"]
    assert {el.get("name") for el in ET.fromstring(labeling_config("pairs")).iter("Text")} == {"prompt", "chosen", "rejected"}

    def result(name, kind, value):
        return {"from_name": name, "to_name": "text", "type": kind, "value": {kind: [value]}}

    # what Label Studio's JSON export holds: the tasks with their annotations
    export = [
        dict(tasks[0], annotations=[{"completed_by": {"email": "dee@example.org"}, "was_cancelled": False, "result": [
            result("decision", "choices", "relabel"), result("relabel", "text", "quality=high"), result("reason", "text", "reads well")]}]),
        dict(tasks[1], annotations=[
            {"completed_by": 7, "was_cancelled": False, "result": [result("decision", "choices", "approve")]},
            {"completed_by": 8, "was_cancelled": False, "result": [result("decision", "choices", "reject")]},
            {"completed_by": 9, "was_cancelled": True, "result": [result("decision", "choices", "approve")]}]),
        dict(tasks[2], annotations=[]),  # not annotated yet
    ]
    decisions = import_annotations(json.loads(json.dumps(export)), "docs", "export.json")
    assert [(d.item_id, d.content_hash, d.decision, d.labels, d.reason, d.reviewer) for d in decisions] == [
        ("a", "ha", "relabel", {"quality": "high"}, "reads well", "dee@example.org"),
        ("b", "hb", "reject", {}, "", "8"),  # the latest annotation that was not cancelled
    ]
    bad = [dict(tasks[0], annotations=[{"result": [result("decision", "choices", "maybe")]}])]
    with pytest.raises(ValueError, match=r"export.json task 0 \(id 1\): field 'decision' is 'maybe'"):
        import_annotations(bad, "docs", "export.json")
    with pytest.raises(ValueError, match=r"task 0 \(id 1\): relabel needs the corrected labels"):
        import_annotations([dict(tasks[0], annotations=[{"result": [result("decision", "choices", "relabel")]}])], "docs", "export.json")


def test_decision_log_keeps_every_batch_in_order(store):
    write_batch(store, Batch(kind="pairs", source="a", reviewer="x", created_at="2026-01-01T00:00:00+00:00"))
    write_batch(store, Batch(kind="pairs", source="b", reviewer="y", created_at="2026-01-02T00:00:00+00:00"))
    assert [b.source for b in read_batches(store, "pairs")] == ["a", "b"] and read_batches(store, "docs") == []
    with pytest.raises(ValueError, match="colour=red is not a docs label"):
        write_batch(store, Batch(kind="docs", source="c", reviewer="z", decisions=[Decision(item_id="i", content_hash="h", decision="relabel", labels={"colour": "red"}, reviewer="z")]))


def test_versions_downstream_unchanged_while_review_is_off(store, tmp_path):
    """The tokenizer reads review_docs now; with review off its planned version is the one it had
    reading pii_scrub directly (same config, same committed inputs), through infra/stage.plan."""
    (tmp_path / "a.txt").write_text(prose(1))
    base = {"store": {"url": store.url}, "ingest": {"sources": [{"name": "t", "paths": [str(tmp_path / "*.txt")]}]}}
    cfg = PipelineConfig.model_validate(base)
    ingest, pii = stage("ingest"), StageSpec("pii_scrub", stage("pii_scrub").run, section="pii", inputs=("ingest",))
    pii_ref = run_stage(store, pii, cfg, [run_stage(store, ingest, cfg, []).ref]).ref
    old_tokenizer = StageSpec("train_tokenizer", stage("train_tokenizer").run, section="tokenizer", inputs=("pii_scrub",))
    with_review = [ingest, pii, *(stage(name) for name in ("annotate_docs", "review_docs", "train_tokenizer"))]
    assert stage("train_tokenizer").inputs == ("review_docs",) and stage("reward_model").inputs[0] == "review_pairs"
    assert stage("review_pairs").inputs[0] == "preference_data"  # off: the trainers get preference_data's ref

    def planned(table, config):
        rows = {r.stage: r for r in plan(store, table, config)}
        return rows["train_tokenizer"].version, {name: r.action for name, r in rows.items()}

    before, _ = planned([ingest, pii, old_tokenizer], cfg)
    after, actions = planned(with_review, cfg)
    assert before == old_tokenizer.version(cfg, [pii_ref.digest]) and after == before
    assert actions["annotate_docs"] == actions["review_docs"] == "disabled"
    on, actions_on = planned(with_review, PipelineConfig.model_validate({**base, "review_docs": {"enabled": True}}))
    assert actions_on["annotate_docs"] == "run" and actions_on["review_docs"] == "run (upstream changes)" and on is None  # review on: the tokenizer waits for the review's output
