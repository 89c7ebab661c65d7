"""Whole classes of PII formats, not single examples: recall, false positives and leaks through `pii_scrub`.

The labelled set comes from tests/tasks/pii/labelled_cases.py (deterministic, seeded): every
phonenumbers region in every written form, every card network in its printed groupings, IPv4
and IPv6 forms, e-mails, IBANs and SSNs, each in many wrapping contexts, plus hard negatives.
"""
from __future__ import annotations

from collections import Counter

import phonenumbers
import pytest

from lmfoundry.infra.config import PipelineConfig, PiiConfig
from lmfoundry.infra.docs import iter_docs
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.tasks.pii.detectors import find_pii
from lmfoundry.tasks.pii.evaluate import parse_record, predict, score
from tests.helpers import commit_docs
from tests.tasks.pii.labelled_cases import CONTEXTS, CARD_NETWORKS, labelled_set

SPEC = StageSpec("pii_scrub", "lmfoundry.tasks.pii.scrub:run_pii_scrub", section="pii", inputs=("fixture_docs",))
TYPES = ("PHONE", "CREDIT_CARD", "IP", "EMAIL", "IBAN", "US_SSN")


@pytest.fixture(scope="module")
def cases():
    return labelled_set(seed=0)


def recall_by_type(records: list[dict], cfg: PiiConfig):
    parsed = [parse_record(r, r["kind"]) for r in records]  # spans use the `type` key
    return score(parsed, predict(parsed, lambda text: find_pii(text, cfg)))


def test_the_set_covers_every_region_context_network_and_form(cases):
    texts = [r["text"] for r in cases["positives"]]
    kinds = Counter(r["kind"] for r in cases["positives"])
    assert set(cases["national"]) == phonenumbers.SUPPORTED_REGIONS
    for form in ("e164", "international", "rfc3966"):
        assert kinds[f"PHONE/{form}"] >= len(phonenumbers.SUPPORTED_REGIONS)
    for network in CARD_NETWORKS:
        assert any(k.startswith(f"CREDIT_CARD/{network}/") for k in kinds), network
    for grouping in ("4-4-4-4", "4-6-5", "4-6-4", "4-4-4-3", "none"):
        assert any(grouping in k for k in kinds), grouping
    for form in ("ipv4/port", "ipv4/cidr", "ipv6/full", "ipv6/compressed", "ipv6/ipv4_mapped", "ipv6/bracket_port", "ipv6/after_colon"):
        assert kinds[f"IP/{form}"] > 0, form
    for context in CONTEXTS:  # every wrapping context holds values of every type
        head, tail = context.replace("{{", "{").replace("}}", "}").split("{v}")
        for entity in TYPES:
            assert any(r["text"].startswith(head) and r["text"].endswith(tail) and r["spans"][0]["type"] == entity
                       for r in cases["positives"]), (context, entity)
    assert len(texts) > 3000 and len(cases["negatives"]) > 500


def test_recall_per_type_is_at_least_99_percent(cases):
    scores = recall_by_type(cases["positives"], PiiConfig())
    for entity in TYPES:
        s = scores.by_type[entity]
        assert s.recall >= 0.99 and s.precision >= 0.99, f"{entity}: {s.as_dict()}"


def test_national_numbers_of_every_region_with_that_region_configured(cases):
    """A number written without +country is found when its region is configured; numbers shorter
    than 7 digits or printed without any separator are out of reach (counts, zip codes, IDs)."""
    found = total = out_of_reach = 0
    for region, records in sorted(cases["national"].items()):
        cfg = PiiConfig(phone_regions=[region])
        for r in records:
            span = r["spans"][0]
            value = r["text"][span["start"]:span["end"]]
            digits, groups = sum(c.isdigit() for c in value), len([g for g in value.replace("(", " ").replace(")", " ").replace("-", " ").replace(".", " ").split() if g])
            if digits < 7 or groups < 2:
                out_of_reach += 1
                continue
            total += 1
            found += any(s.entity_type == "PHONE" and s.start <= span["start"] and s.end >= span["end"] for s in find_pii(r["text"], cfg))
    assert total > 850 and out_of_reach < 0.1 * (total + out_of_reach)
    assert found / total >= 0.99, f"{found}/{total}"


def test_hard_negatives_stay_below_half_a_percent(cases):
    cfg = PiiConfig()
    hits = [(r["kind"], r["text"], [r["text"][s.start:s.end] for s in find_pii(r["text"], cfg)]) for r in cases["negatives"]]
    hits = [h for h in hits if h[2]]
    kinds = Counter(r["kind"].split("/")[1] for r in cases["negatives"])
    assert {"version", "date", "isbn", "uuid", "hash", "order", "luhn_invalid"} <= set(kinds)
    assert len(hits) <= 0.005 * len(cases["negatives"]), hits[:10]


def test_nothing_labelled_leaks_through_the_pii_scrub_stage(store, cases):
    default_regions = set(PiiConfig().phone_regions)
    records = cases["positives"] + [r for region in sorted(default_regions) for r in cases["national"][region]]
    records += cases["negatives"]
    docs = [{"id": f"r{i}", "text": r["text"]} for i, r in enumerate(records)]
    ref = commit_docs(store, [docs[i::4] for i in range(4)])
    outcome = run_stage(store, SPEC, PipelineConfig(), [ref])
    out = {d["id"]: d["text"] for d in iter_docs(store, [outcome.ref])}
    assert len(out) == len(docs)
    leaks = []
    for i, r in enumerate(records):
        for span in r["spans"]:
            value = r["text"][span["start"]:span["end"]]
            if value in out[f"r{i}"]:
                leaks.append((r["kind"], out[f"r{i}"]))
    assert leaks == []
    changed = [r["text"] for i, r in enumerate(records) if not r["spans"] and out[f"r{i}"] != r["text"]]
    assert len(changed) <= 0.005 * len(cases["negatives"]), changed[:10]
    assert outcome.stats["entities"]["PHONE"] >= len([r for r in records if r["spans"] and r["spans"][0]["type"] == "PHONE"])


# --------------------------------------------------------------------------- the classes, one example each


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Llámenos (+34 842 30 79 80) hoy", ("PHONE", "+34 842 30 79 80")),
        ("see [+1-202-555-0173]", ("PHONE", "+1-202-555-0173")),
        ('<a href="tel:+442079460958">', ("PHONE", "+442079460958")),
        ("Amex 3782 8224 6310 005 on file", ("CREDIT_CARD", "3782 8224 6310 005")),
        ("Amex 3782-8224-6310-005 on file", ("CREDIT_CARD", "3782-8224-6310-005")),
        ("mailto:2001:db8::8a2e:370:7334", ("IP", "2001:db8::8a2e:370:7334")),
        ("key:fe80::1234:5678", ("IP", "fe80::1234:5678")),
        ("scheme:2a03:2880:f12f:83:face:b00c::25de", ("IP", "2a03:2880:f12f:83:face:b00c::25de")),
        ("Tel. +992 372 12 5477", ("PHONE", "+992 372 12 5477")),  # not an SSN inside a phone number
    ],
)
def test_each_class_from_the_issue(text, expected):
    assert [(s.entity_type, text[s.start:s.end]) for s in find_pii(text, PiiConfig())] == [expected]


@pytest.mark.parametrize("text", ["5500 0055 5555 5558", "4532 0151 1283 0367", "6011 0009 9013 9425 12/25", "ISBN 0306406152"])
def test_card_like_and_isbn_digits_are_no_phone(text):
    assert find_pii(text, PiiConfig()) == []


def test_eval_reads_type_as_well_as_entity_type():
    for key in ("type", "entity_type"):
        record = parse_record({"text": "Mail bob@example.org", "spans": [{key: "EMAIL_ADDRESS", "start": 5, "end": 20}]}, "line 1")
        assert record.spans[0].entity_type == "EMAIL"
