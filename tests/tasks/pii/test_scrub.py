"""Stage `pii_scrub` through the stage runner: outputs, counts in the manifest, audit, keys, resume."""
from __future__ import annotations

import json

import pytest

from lmfoundry.infra.config import PipelineConfig, build_config
from lmfoundry.infra.docs import iter_docs
from lmfoundry.infra.faults import InjectedFault
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.tasks.pii.detectors import find_pii
from lmfoundry.tasks.pii.replace import MissingKeyError
from tests.helpers import commit_docs, docs

SPEC = StageSpec("pii_scrub", "lmfoundry.tasks.pii.scrub:run_pii_scrub", section="pii", inputs=("fixture_docs",))
KEY = "stage-test-key-0123456789"

SHARD_0 = docs(
    "Write to jane.doe@example.org or call +44 20 7946 0958.",
    "Python 3.11.4 was released on 2023-06-06; nothing personal here.",
    "aws_secret_access_key = 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY' from 203.0.113.7",
    prefix="a",
)
SHARD_1 = docs("Card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00, mail JANE.DOE@example.org", prefix="b")
SHARD_1.append({"id": "b_missing", "text": None})
SHARD_1.append({"id": "b_url", "text": "see the link", "url": "https://bob:hunter22@example.org/x"})


def all_values() -> list[str]:
    return ["jane.doe@example.org", "+44 20 7946 0958", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "203.0.113.7",
            "4111 1111 1111 1111", "DE89 3704 0044 0532 0130 00", "JANE.DOE", "bob:hunter22"]


def read_docs(store, ref) -> dict[str, dict]:
    return {d["id"]: d for d in iter_docs(store, [ref])}


def test_stage_scrubs_counts_and_reuses(store):
    ref = commit_docs(store, [SHARD_0, SHARD_1])
    cfg = PipelineConfig()
    outcome = run_stage(store, SPEC, cfg, [ref])
    out = read_docs(store, outcome.ref)

    assert out["a0"]["text"] == "Write to <EMAIL> or call <PHONE>."
    assert out["a1"]["text"] == SHARD_0[1]["text"] and json.loads(out["a1"]["meta"]) == {}
    assert out["a2"]["text"] == "aws_secret_access_key = '<SECRET>' from <IP>"
    assert out["b0"]["text"] == "Card <CREDIT_CARD>, IBAN <IBAN>, mail <EMAIL>"
    assert out["b_url"]["url"] == "https://<SECRET>@example.org/x"
    assert "b_missing" not in out
    assert json.loads(out["a0"]["meta"])["pii"] == {"EMAIL": 1, "PHONE": 1}
    for doc in out.values():  # what later stages read holds nothing the detectors find
        assert find_pii(doc["text"], cfg.pii) == [] and find_pii(doc["url"], cfg.pii) == []

    stats = outcome.stats
    assert stats["entities"] == {"CREDIT_CARD": 1, "EMAIL": 2, "IBAN": 1, "IP": 1, "PHONE": 1, "SECRET": 2}
    assert stats["detectors"]["SECRET/url_credentials"] == 1 and stats["detectors"]["SECRET/password"] == 1
    assert (stats["docs_in"], stats["docs_out"], stats["docs_with_pii"]) == (6, 5, 4)
    assert stats["skipped"] == {"missing_text": 1}

    manifest = store.manifest("pii_scrub", outcome.ref.version)
    assert manifest["files"]["data/part-00000.parquet"]["pii"] == {"EMAIL": 1, "IP": 1, "PHONE": 1, "SECRET": 1}
    assert manifest["files"]["data/part-00001.parquet"]["pii"] == {"CREDIT_CARD": 1, "EMAIL": 1, "IBAN": 1, "SECRET": 1}

    reader = store.reader(outcome.ref)
    audit = [json.loads(line) for p in reader.files("audit/") for line in reader.read_bytes(p).decode().splitlines()]
    assert len(audit) == stats["audit_samples"] == 7  # values found in text; the url's one is counted, not sampled
    assert {"doc_id", "entity_type", "detector", "masked_value", "replacement", "context"} <= set(audit[0])
    assert any(a["masked_value"] == "j…g [20 chars]" for a in audit)
    everything_written = json.dumps(manifest) + json.dumps(audit)
    for value in all_values():
        assert value not in everything_written

    again = run_stage(store, SPEC, cfg, [ref])
    assert again.status == "skipped" and again.ref == outcome.ref


def test_pseudonym_stage_keeps_the_key_out_and_versions_by_key(store, monkeypatch):
    ref = commit_docs(store, [SHARD_0, SHARD_1])
    cfg = build_config({"pii": {"replacement": "pseudonym", "key_env": "TEST_PII_KEY"}})
    monkeypatch.delenv("TEST_PII_KEY", raising=False)
    with pytest.raises(MissingKeyError, match="TEST_PII_KEY"):
        run_stage(store, SPEC, cfg, [ref])

    monkeypatch.setenv("TEST_PII_KEY", KEY)
    outcome = run_stage(store, SPEC, cfg, [ref])
    out = read_docs(store, outcome.ref)
    email_a = out["a0"]["text"].split()[2]
    assert email_a.startswith("<EMAIL_") and email_a in out["b0"]["text"]  # same address in another shard and case
    manifest_text = json.dumps(store.manifest("pii_scrub", outcome.ref.version))
    reader = store.reader(outcome.ref)
    audit_text = "".join(reader.read_bytes(p).decode() for p in reader.files("audit/"))
    assert KEY not in manifest_text + audit_text and "pseudonym-key:" in manifest_text

    monkeypatch.setenv("TEST_PII_KEY", KEY + "-rotated")
    rotated = run_stage(store, SPEC, cfg, [ref])
    assert rotated.status == "ran" and rotated.ref.version != outcome.ref.version
    assert read_docs(store, rotated.ref)["a0"]["text"].split()[2] != email_a


def test_stage_resumes_after_a_crash(store, monkeypatch):
    ref = commit_docs(store, [SHARD_0, SHARD_1])
    cfg = build_config({"compute": {"workers": 1}})  # one shard at a time, so the crash point is exact
    monkeypatch.setenv("LMF_FAULT", "pii_scrub:after_file:2:fail")  # after shard 0's audit and data files
    with pytest.raises(InjectedFault):
        run_stage(store, SPEC, cfg, [ref])
    monkeypatch.delenv("LMF_FAULT")
    outcome = run_stage(store, SPEC, cfg, [ref])
    assert store.manifest("pii_scrub", outcome.ref.version)["resumed_files"] == 2
    assert outcome.stats["docs_in"] == 6 and outcome.stats["entities"]["EMAIL"] == 2


def test_url_column_keeps_its_host_but_loses_credentials_and_emails(store):
    rows = [
        {"id": "u1", "text": "plain page", "url": "http://203.0.113.7:8080/docs/index.html"},
        {"id": "u2", "text": "plain page", "url": "https://bob:hunter22@example.org/x"},
        {"id": "u3", "text": "plain page", "url": "https://example.org/contact?to=jane.doe@example.org"},
    ]
    ref = commit_docs(store, [rows])
    out = read_docs(store, run_stage(store, SPEC, PipelineConfig(), [ref]).ref)
    assert out["u1"]["url"] == "http://203.0.113.7:8080/docs/index.html"  # provenance kept
    assert "hunter22" not in out["u2"]["url"] and "jane.doe" not in out["u3"]["url"]
    strict = build_config({}, ["pii.url_entities=[EMAIL, SECRET, IP]"])
    out = read_docs(store, run_stage(store, SPEC, strict, [ref]).ref)
    assert "203.0.113.7" not in out["u1"]["url"]
