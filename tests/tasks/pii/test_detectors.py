"""PII detectors (tasks/pii/detectors.py) and the evaluation harness (tasks/pii/evaluate.py)."""
from __future__ import annotations

import json

import pytest

from lmfoundry.bench.pii import labelled_sentences
from lmfoundry.infra.config import ConfigError, PiiConfig, build_config
from lmfoundry.tasks.pii.detectors import find_pii
from lmfoundry.tasks.pii.replace import MissingKeyError, Replacer, mask_value, scrub_text
from lmfoundry.tasks.pii.evaluate import GoldSpan, Scores, evaluate, main, match_text, parse_record

KEY = "test-key-0123456789abcdef"
TEST_LOCALES = ("en_US", "de_DE", "fr_FR", "en_GB", "es_ES", "nl_NL")


def found(text: str, cfg: PiiConfig | None = None) -> list[tuple[str, str]]:
    return [(s.entity_type, text[s.start:s.end]) for s in find_pii(text, cfg or PiiConfig())]


@pytest.fixture(scope="module")
def labelled():
    # a different seed and locale mix from the benchmark's, so the test is not tuned to one sample
    return [parse_record(r, f"sentence {i}") for i, r in enumerate(labelled_sentences(700, seed=7, locales=TEST_LOCALES))]


# --------------------------------------------------------------------------- measured quality


def test_faker_labelled_set_f1_per_type(labelled):
    scores = evaluate(labelled, PiiConfig())
    f1 = scores.f1()
    for entity in ("EMAIL", "IP", "CREDIT_CARD", "IBAN", "PHONE", "US_SSN", "SECRET"):
        assert scores.by_type[entity].tp >= 20, f"too few {entity} examples to measure"
        assert f1[entity] >= 0.95, f"{entity}: {scores.by_type[entity].as_dict()}"


def test_scrubbed_text_has_nothing_left_to_find(labelled):
    cfg = PiiConfig()
    replace = Replacer(cfg)
    for record in labelled:
        scrubbed = scrub_text(record.text, find_pii(record.text, cfg), replace)
        assert find_pii(scrubbed, cfg) == [], scrubbed


# --------------------------------------------------------------------------- false positives

NOT_PII = {
    "version strings": "Python 3.11.4 and numpy 1.26.0; pip install foo==2.0.1.3; v1.2.3.4; Version 10.0.19041.1",
    "section numbers": "4.2.1.1. Redirection of local data\n3.3.3.2. Resolving MRO entries",
    "dates and times": "Released 2023-10-12, updated 12.10.2023 and 05/31/1988 at 14:30:00; 2023-10-12 14:30:00.123456",
    "isbns": "ISBN 978-3-16-148410-0, ISBN-10 0-306-40615-2, 0-241-07570-X and 9783161484100",
    "hex hashes": "commit 3f2a9c1b0d4e5f60718293a4b5c6d7e8f9012345, sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855, uuid 123e4567-e89b-12d3-a456-426614174000",
    "code": "for i in range(10):\n    x[1::2] = a @ b.T + 0x7fff\n    std::vector<int> v; a::b(); password = get_password()\n"
            "def connect(password=None): token = tokens[0]; user.password = form.password.data\n"
            "x = np.linalg.norm(v, ord=2) * 1e-9  # call(0, 100, 1000, 10000)",
    "numeric tables": "year  count  mean\n2019  1523   12.5\n2020  1876   13.1\n"
                      "0.000 0.125 0.250 0.375\n| 001 | 002 | 003 |\n010 011 100 101 110\n0123456789\n"
                      "1 2 3 4 5 6 7 8 9 10\n2147483647 4294967296 3232235521",
    "prices and ids": "Total $1,234.56 (EUR 1.234,56), order 123456789, ZIP 03894-4801, port 8080",
    "placeholder credentials": "password: <your password>, api_key = ${API_KEY}, secret={{ secret }}, pass: ****",
    "mac address and times": "MAC 00:1a:2b:3c:4d:5e at 12:30:45",
    "netmasks and loopback words": "netmask 255.255.255.0 on 0.0.0.0 bind",
}


@pytest.mark.parametrize("kind", sorted(NOT_PII))
def test_not_scrubbed(kind):
    assert found(NOT_PII[kind]) == []


# --------------------------------------------------------------------------- detectors, one by one


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail Jane.Doe+news@mail.example.co.uk.", [("EMAIL", "Jane.Doe+news@mail.example.co.uk")]),
        ("hosts 10.0.0.1 and 2001:db8::8a2e:370:7334, [fe80::1%eth0]", [("IP", "10.0.0.1"), ("IP", "2001:db8::8a2e:370:7334"), ("IP", "fe80::1")]),
        ("mapped ::ffff:192.0.2.1 here", [("IP", "::ffff:192.0.2.1")]),
        ("visa 4111-1111-1111-1111 amex 3782 822463 10005", [("CREDIT_CARD", "4111-1111-1111-1111"), ("CREDIT_CARD", "3782 822463 10005")]),
        ("Luhn fails: 4111 1111 1111 1112", []),
        ("IBAN GB82 WEST 1234 5698 7654 32 and DE89370400440532013000", [("IBAN", "GB82 WEST 1234 5698 7654 32"), ("IBAN", "DE89370400440532013000")]),
        ("bad checksum DE89370400440532013001", []),
        ("SSN 078-05-1120; not 000-12-3456 or 666-12-3456", [("US_SSN", "078-05-1120")]),
        ("US (415) 555-2671, UK +44 20 7946 0958, DE 030 12345678, FR 01 42 68 53 00",
         [("PHONE", "(415) 555-2671"), ("PHONE", "+44 20 7946 0958"), ("PHONE", "030 12345678"), ("PHONE", "01 42 68 53 00")]),
        ("ext: +1-202-555-0173x1234 and 0049 30 1234567", [("PHONE", "+1-202-555-0173x1234"), ("PHONE", "0049 30 1234567")]),
    ],
)
def test_detectors(text, expected):
    assert found(text) == expected


SECRETS = [
    ("AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789 used", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
    ("gitlab glpat-Ab3dEf6hIj9kLm2nOp5q", "glpat-Ab3dEf6hIj9kLm2nOp5q"),
    ("slack xoxb-1234567890-abcdefghij", "xoxb-1234567890-abcdefghij"),
    ("jwt eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlLWJ5dGVz",
     "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlLWJ5dGVz"),
    ('{"password": "hunter2!x"}', "hunter2!x"),
    ("DB_PASSWORD=s3cr3tValue", "s3cr3tValue"),
    ("client_secret: 'abc123def456'", "abc123def456"),
    ("redis://admin:Tr0ub4dor@cache.internal:6379/0", "admin:Tr0ub4dor"),
    ("Authorization: Bearer abcDEF123456ghiJKL789", "abcDEF123456ghiJKL789"),
]


@pytest.mark.parametrize(("text", "secret"), SECRETS)
def test_secrets(text, secret):
    assert found(text) == [("SECRET", secret)]


def test_private_key_block_is_one_span():
    block = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA1234\nabcd+/==\n-----END RSA PRIVATE KEY-----"
    assert found(f"key:\n{block}\nend") == [("SECRET", block)]


def test_ip_public_only_keeps_private_addresses():
    text = "internal 10.1.2.3, 192.168.0.10, ::1 and fe80::1; public 93.184.216.34 and 2606:2800:220:1:248:1893:25c8:1946"
    public = PiiConfig(ip_public_only=True)
    assert found(text, public) == [("IP", "93.184.216.34"), ("IP", "2606:2800:220:1:248:1893:25c8:1946")]
    assert len(found(text)) == 5  # by default every address goes (::1 is not an address anyone owns)


def test_phone_regions_decide_national_numbers():
    text = "Ruf an: 030 12345678"
    assert found(text, PiiConfig(phone_regions=["DE"])) == [("PHONE", "030 12345678")]
    assert found(text, PiiConfig(phone_regions=["US"])) == []
    assert found("call +49 30 12345678", PiiConfig(phone_regions=["US"])) == [("PHONE", "+49 30 12345678")]


def test_phone_validation_valid_needs_an_assigned_range():
    text = "call +1 537 640 6812"  # right length, but 537 is no North American area code
    assert found(text, PiiConfig(phone_validation="possible")) == [("PHONE", "+1 537 640 6812")]
    assert found(text, PiiConfig(phone_validation="valid")) == []


def test_entities_select_detectors():
    text = "mail a@example.org from 10.0.0.1"
    assert found(text, PiiConfig(entities=["IP"])) == [("IP", "10.0.0.1")]


# --------------------------------------------------------------------------- replacement


def test_placeholders():
    text = "mail a@example.org, call +44 20 7946 0958"
    cfg = PiiConfig()
    assert scrub_text(text, find_pii(text, cfg), Replacer(cfg)) == "mail <EMAIL>, call <PHONE>"


def test_pseudonyms_are_consistent_keyed_and_typed(monkeypatch):
    cfg = PiiConfig(replacement="pseudonym")
    monkeypatch.setenv("LMF_PII_KEY", KEY)
    text = "Bob@Example.org wrote to bob@example.org and eve@example.org; call +44 20 7946 0958 or +44 (0)20 7946 0958"
    scrubbed = scrub_text(text, find_pii(text, cfg), Replacer(cfg))
    tokens = scrubbed.replace(";", "").split()
    assert tokens[0] == tokens[3] != tokens[5]  # case does not matter for e-mail, the address does
    assert tokens[7] == tokens[9]  # the same number written two ways
    assert tokens[0].startswith("<EMAIL_") and tokens[7].startswith("<PHONE_")
    assert KEY not in scrubbed and find_pii(scrubbed, cfg) == []
    monkeypatch.setenv("LMF_PII_KEY", KEY[::-1])
    assert scrub_text(text, find_pii(text, cfg), Replacer(cfg)).split()[0] != tokens[0]


def test_pseudonym_mode_without_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("MY_PII_KEY", raising=False)
    with pytest.raises(MissingKeyError, match="MY_PII_KEY"):
        Replacer(PiiConfig(replacement="pseudonym", key_env="MY_PII_KEY"))
    monkeypatch.setenv("MY_PII_KEY", "short")
    with pytest.raises(MissingKeyError, match="shorter than 16"):
        Replacer(PiiConfig(replacement="pseudonym", key_env="MY_PII_KEY"))


def test_mask_value_hides_the_middle_and_whole_secrets():
    assert mask_value("jane@example.org", "EMAIL") == "j…g [16 chars]"
    assert mask_value("AKIAIOSFODNN7EXAMPLE", "SECRET") == "[20 chars]"
    assert mask_value("1234", "PHONE") == "[4 chars]"


# --------------------------------------------------------------------------- config


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="unknown region"):
        build_config({"pii": {"phone_regions": ["XX"]}})
    with pytest.raises(ConfigError, match="ner_model"):
        build_config({"pii": {"entities": ["PERSON"]}})
    with pytest.raises(ConfigError, match="none of PERSON"):
        build_config({"pii": {"ner_model": "en_core_web_sm"}})


def test_ner_through_presidio_with_a_local_spacy_pipeline(tmp_path):
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("entity_ruler").add_patterns([
        {"label": "PERSON", "pattern": "Ada Lovelace"},
        {"label": "GPE", "pattern": "London"},
        {"label": "ORG", "pattern": "Analytical Society"},
    ])
    nlp.to_disk(tmp_path / "model")
    cfg = PiiConfig(entities=["EMAIL", "PERSON", "LOCATION", "ORGANIZATION"], ner_model=str(tmp_path / "model"))
    text = "Ada Lovelace of the Analytical Society wrote from London to ada@example.org."
    assert sorted(found(text, cfg)) == [("EMAIL", "ada@example.org"), ("LOCATION", "London"),
                                        ("ORGANIZATION", "Analytical Society"), ("PERSON", "Ada Lovelace")]
    with pytest.raises(ConfigError, match="not an installed spaCy model"):
        find_pii(text, PiiConfig(entities=["PERSON"], ner_model=str(tmp_path / "missing")))


# --------------------------------------------------------------------------- evaluation harness


def test_match_rule_same_type_and_iou():
    gold = [GoldSpan("PHONE", 0, 20), GoldSpan("EMAIL", 30, 40)]
    scores = Scores()
    # 15 of 20 chars (IoU 0.75) matches; an EMAIL prediction on the PHONE span does not
    match_text(gold, [GoldSpan("PHONE", 0, 15), GoldSpan("EMAIL", 0, 20)], 0.5, scores)
    assert (scores.by_type["PHONE"].tp, scores.by_type["EMAIL"].fp, scores.by_type["EMAIL"].fn) == (1, 1, 1)
    strict = Scores()
    match_text(gold[:1], [GoldSpan("PHONE", 0, 5)], 0.5, strict)  # IoU 0.25: too partial
    assert (strict.by_type["PHONE"].tp, strict.by_type["PHONE"].fp, strict.by_type["PHONE"].fn) == (0, 1, 1)


def test_lmf_eval_pii_prints_table(tmp_path, capsys):
    path = tmp_path / "labelled.jsonl"
    rows = [
        {"text": "mail bob@example.org now", "spans": [{"entity_type": "EMAIL_ADDRESS", "start": 5, "end": 20}]},
        {"full_text": "call +44 20 7946 0958", "spans": [{"entity_type": "PHONE_NUMBER", "start_position": 5, "end_position": 21}]},
        {"text": "nothing 10.0.0.1", "spans": []},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(path), "--json"]) == 0
    out = capsys.readouterr().out
    assert "precision" in out and "EMAIL" in out
    scores = json.loads(out.strip().splitlines()[-1])
    assert scores["EMAIL"]["f1"] == 1.0 and scores["PHONE"]["f1"] == 1.0
    assert scores["IP"]["fp"] == 1 and scores["ALL"]["tp"] == 2


def test_lmf_eval_pii_rejects_malformed_file(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "abc", "spans": [{"entity_type": "EMAIL", "start": 0, "end": 99}]}\n')
    assert main([str(path)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.jsonl")]) == 2
