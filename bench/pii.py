"""Benchmark `pii`: our detectors vs Presidio's pattern recognisers vs datatrove's PIIFormatter.

    lmf bench pii [--n 1000] [--seed 0] [--repeats 3] [--write labelled.jsonl]

All three run in this process on the same Faker-made labelled sentences (seeded, several
locales; ``labelled_sentences`` is also what the tests score). Presidio's AnalyzerEngine is
built with its predefined recognisers for the comparable entity types and a no-op NLP engine,
so no spaCy model is loaded or needed. datatrove's formatter only knows e-mail and IP, so its
F1 covers those two. ``metric`` is documents (sentences) per second; ``ratio`` is ours /
Presidio; ``quality`` holds every tool's per-type F1 (span match rule: tasks/pii/evaluate.py).
``--write FILE`` saves the labelled set as JSONL for ``lmf eval pii FILE``.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import string
import time
from typing import Any, Callable

from lmfoundry.bench._common import print_result
from lmfoundry.infra.config import PiiConfig

LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "nl_NL", "en_CA")
REGEX_TYPES = ("EMAIL", "PHONE", "IP", "CREDIT_CARD", "IBAN", "US_SSN")
PRESIDIO_ENTITIES = ["EMAIL_ADDRESS", "PHONE_NUMBER", "IP_ADDRESS", "CREDIT_CARD", "IBAN_CODE", "US_SSN"]

# {TYPE} slots are labelled, {lower} slots are unlabelled distractors that must not be scrubbed
TEMPLATES = {
    "EMAIL": [
        "Please send the signed form to {EMAIL} before {date}.",
        "For questions about release {version}, write to {EMAIL}.",
        "Contact: {EMAIL}",
        "Schreiben Sie uns an {EMAIL}, wir antworten innerhalb von {small} Tagen.",
        "Vous pouvez écrire à {EMAIL} pour toute question.",
        "From: {EMAIL}\nSubject: order {order} shipped",
    ],
    "PHONE": [
        "Call us at {PHONE} if the parcel has not arrived by {date}.",
        "Tel.: {PHONE}",
        "Our office number is {PHONE}; the ticket id is {order}.",
        "Rufen Sie uns unter {PHONE} an.",
        "Appelez le {PHONE} du lundi au vendredi.",
        "Phone {PHONE}, fax {PHONE}.",
    ],
    "IP": [
        "The request came from {IP} at {time}.",
        "Set the gateway to {IP} and restart the service.",
        "Blocked {IP} after {small} failed logins.",
        "server listening on {IP} port {port}",
    ],
    "CREDIT_CARD": [
        "Charged {price} to card {CREDIT_CARD} on {date}.",
        "Card number: {CREDIT_CARD}",
        "Please do not share your card {CREDIT_CARD} with anyone.",
    ],
    "IBAN": [
        "Wire the amount to {IBAN} by {date}.",
        "IBAN: {IBAN}",
        "Bitte überweisen Sie {price} auf das Konto {IBAN}.",
        "Virement sur le compte {IBAN}, référence {order}.",
    ],
    "US_SSN": [
        "Applicant SSN: {US_SSN}",
        "Her social security number is {US_SSN}, issued in {year}.",
    ],
    "SECRET": [
        "export AWS_ACCESS_KEY_ID={aws_key}",
        "token = '{github}'",
        'password = "{password}"',
        "DATABASE_URL=postgres://{userinfo}@db.{domain}/app",
        "Authorization: Bearer {jwt}",
    ],
    "MIXED": [
        "Reach {EMAIL} or {PHONE} for invoice {order}.",
        "Login from {IP} by {EMAIL} at {time}.",
        "Refund {price} to {IBAN} or card {CREDIT_CARD}.",
    ],
    "NONE": [
        "Version {version} was released on {date} with {small} fixes.",
        "ISBN {isbn} lists at {price}.",
        "commit {sha1} fixed issue {order}",
        "Table: {year} {small} {small}.{small} | {year} {small} {small}.{small}",
        "for i in range({small}): x[i] = {small} * i + {small}",
        "The meeting moved to {date} at {time}.",
        "Build {build} ran {small} tests in {decimal} s.",
        "{sentence}",
    ],
}
# how often each kind of sentence is drawn (the labelled types dominate, as they are scored)
WEIGHTS = {"EMAIL": 3, "PHONE": 4, "IP": 2, "CREDIT_CARD": 2, "IBAN": 2, "US_SSN": 1, "SECRET": 1, "MIXED": 2, "NONE": 3}
CARD_TYPES = ("visa16", "mastercard", "amex", "discover", "jcb16", "diners", "visa13")


def _fakers(locales: tuple[str, ...], seed: int) -> dict[str, Any]:
    from faker import Faker

    fakers = {}
    for i, locale in enumerate(locales):
        fake = Faker(locale)
        fake.seed_instance(seed * 1000 + i)
        fakers[locale] = fake
    return fakers


def _grouped(value: str, sizes: list[int], sep: str) -> str:
    parts, i = [], 0
    for size in sizes:
        if i >= len(value):
            break
        parts.append(value[i:i + size])
        i += size
    if i < len(value):
        parts.append(value[i:])
    return sep.join(parts)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _slot(name: str, fake: Any, us_fake: Any, rng: random.Random) -> str:
    """The text for one template slot."""
    letters = string.ascii_letters + string.digits
    if name == "EMAIL":
        return rng.choice([fake.email, fake.company_email, fake.free_email, fake.safe_email])()
    if name == "PHONE":
        return fake.phone_number()
    if name == "IP":
        return rng.choice([fake.ipv4, fake.ipv4_public, fake.ipv4_private, fake.ipv6])()
    if name == "CREDIT_CARD":
        card_type = rng.choice(CARD_TYPES)
        number = fake.credit_card_number(card_type=card_type)
        style = rng.random()
        if style < 0.5:
            return number
        sizes = [4, 6, 5] if card_type == "amex" else [4, 6, 4] if card_type == "diners" else [4] * 5
        return _grouped(number, sizes, " " if style < 0.8 else "-")
    if name == "IBAN":
        iban = fake.iban()
        return iban if rng.random() < 0.5 else _grouped(iban, [4] * 9, " ")
    if name == "US_SSN":
        return us_fake.ssn()
    if name == "aws_key":
        return "AKIA" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16))
    if name == "github":
        return "ghp_" + "".join(rng.choice(letters) for _ in range(36))
    if name == "password":
        return fake.password(length=rng.randint(10, 16), special_chars=False)
    if name == "jwt":
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64(json.dumps({"sub": str(rng.randint(1, 10**6)), "iat": rng.randint(10**9, 2 * 10**9)}).encode())
        return f"{header}.{payload}.{_b64(rng.randbytes(32))}"
    if name == "userinfo":  # user name and password of a URL: both are credentials
        return f"{fake.user_name()}:{fake.password(length=rng.randint(10, 16), special_chars=False)}"
    if name == "domain":
        return fake.domain_name()
    if name == "date":
        return rng.choice([fake.date(), fake.date(pattern="%d.%m.%Y"), fake.date(pattern="%m/%d/%Y"), fake.date(pattern="%B %d, %Y")])
    if name == "time":
        return fake.time()
    if name == "version":
        return ".".join(str(rng.randint(0, 20)) for _ in range(rng.choice([2, 3, 4])))
    if name == "isbn":
        return rng.choice([fake.isbn13, fake.isbn10])()
    if name == "sha1":
        return fake.sha1()
    if name == "order":
        return str(rng.randint(10**5, 10**9))
    if name == "build":
        return f"{rng.randint(2015, 2030)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}.{rng.randint(1, 99)}"
    if name == "price":
        return fake.pricetag()
    if name == "small":
        return str(rng.randint(0, 99))
    if name == "decimal":
        return f"{rng.random() * 100:.3f}"
    if name == "year":
        return str(rng.randint(1990, 2030))
    if name == "port":
        return str(rng.randint(1024, 65535))
    if name == "sentence":
        return fake.sentence()
    raise KeyError(name)


SECRET_SLOTS = {"aws_key", "github", "password", "jwt", "userinfo"}


def _render(template: str, fake: Any, us_fake: Any, rng: random.Random) -> dict[str, Any]:
    text, spans = "", []
    for i, piece in enumerate(re.split(r"\{(\w+)\}", template)):
        if i % 2 == 0:
            text += piece
            continue
        value = _slot(piece, fake, us_fake, rng)
        labelled = piece.upper() == piece or piece in SECRET_SLOTS
        if labelled:
            spans.append({"entity_type": "SECRET" if piece in SECRET_SLOTS else piece, "start": len(text), "end": len(text) + len(value)})
        text += value
    return {"text": text, "spans": spans}


def labelled_sentences(n: int = 1000, seed: int = 0, locales: tuple[str, ...] = LOCALES) -> list[dict[str, Any]]:
    """`n` sentences with gold spans (Presidio evaluator JSON), deterministic for a seed."""
    rng = random.Random(seed)
    fakers = _fakers(locales, seed)
    us_fake = fakers.get("en_US") or _fakers(("en_US",), seed)["en_US"]
    kinds = [k for k, w in WEIGHTS.items() for _ in range(w)]
    records = []
    for i in range(n):
        locale = locales[i % len(locales)]
        template = rng.choice(TEMPLATES[rng.choice(kinds)])
        record = _render(template, fakers[locale], us_fake, rng)
        record["locale"] = locale
        records.append(record)
    return records


# --------------------------------------------------------------------------- the contenders


def presidio_analyzer():
    """Presidio with its predefined recognisers and a no-op NLP engine (no spaCy model)."""
    # its e-mail recogniser calls tldextract, which would fetch the public suffix list over the
    # network on first use; an empty URL list makes it use the snapshot it ships with
    os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NoOpNlpEngine

    engine = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}])
    registry = RecognizerRegistry(supported_languages=["en"])
    registry.load_predefined_recognizers(languages=["en"], nlp_engine=engine)
    registry.remove_recognizer("SpacyRecognizer")
    return AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])


def datatrove_spans(formatter: Any, text: str) -> list[Any]:
    """The spans datatrove's formatter would replace (its own regexes and validator)."""
    from lmfoundry.tasks.pii.evaluate import GoldSpan

    spans = [GoldSpan("EMAIL", m.start(), m.end()) for m in formatter.emails_replacer.regex.finditer(text)]
    validate = formatter.ip_replacer.validator
    spans += [GoldSpan("IP", m.start(), m.end()) for m in formatter.ip_replacer.regex.finditer(text)
              if validate is None or validate(m.group())]
    return spans


def docs_per_second(fn: Callable[[str], Any], texts: list[str], repeats: int) -> float:
    """Best of `repeats` passes (the least disturbed by other load on a shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for text in texts:
            fn(text)
        best = min(best, time.perf_counter() - start)
    return len(texts) / best


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmf bench pii")
    p.add_argument("--n", type=int, default=1000, help="labelled sentences")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per tool (best is kept)")
    p.add_argument("--write", help="also save the labelled set as JSONL here")
    args = p.parse_args(argv)

    from datatrove.pipeline.formatters import PIIFormatter

    from lmfoundry.tasks.pii.detectors import find_pii
    from lmfoundry.tasks.pii.evaluate import parse_record, predict, score

    raw = labelled_sentences(args.n, args.seed)
    if args.write:
        with open(args.write, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in raw)
    records = [parse_record(r, f"sentence {i}") for i, r in enumerate(raw)]
    texts = [r.text for r in records]

    cfg = PiiConfig()
    ours = lambda text: find_pii(text, cfg)  # noqa: E731
    analyzer = presidio_analyzer()
    presidio = lambda text: analyzer.analyze(text, language="en", entities=PRESIDIO_ENTITIES)  # noqa: E731
    formatter = PIIFormatter(only_remove_public_ips=False)  # our default scrubs every IP too

    for fn in (ours, presidio, formatter.format):  # warm caches and lazy imports outside the timing
        fn(texts[0])
    speed = {
        "ours": docs_per_second(ours, texts, args.repeats),
        "presidio": docs_per_second(presidio, texts, args.repeats),
        "datatrove": docs_per_second(formatter.format, texts, args.repeats),
    }
    regex_types = set(REGEX_TYPES)
    f1 = {
        "ours": score(records, predict(records, ours), types=regex_types | {"SECRET"}),
        "presidio": score(records, predict(records, presidio), types=regex_types),
        "datatrove": score(records, [datatrove_spans(formatter, t) for t in texts], types={"EMAIL", "IP"}),
    }
    for name in ("ours", "presidio", "datatrove"):
        print(f"{name:<10} {speed[name]:>10.0f} docs/s  F1 {f1[name].f1()}")
    ours_f1 = f1["ours"].f1()
    same = {"sentences": len(texts), "seed": args.seed, "repeats": args.repeats, "statistic": "best pass", "warm": True}
    print_result(
        "pii", "docs_per_s", speed["ours"], "presidio-analyzer (predefined pattern recognisers, no NLP model)", speed["presidio"],
        n=len(texts),
        ratio_digits=2,
        settings={
            "ours": {"detectors": "find_pii, PiiConfig() defaults", **same},
            "presidio": {"entities": PRESIDIO_ENTITIES, "nlp_engine": "none", **same},
            "datatrove": {"formatter": "PIIFormatter(only_remove_public_ips=False)", **same},
        },
        quality={
            "f1": ours_f1,
            "min_regex_f1": min(v for k, v in ours_f1.items() if k in regex_types),
            "precision": {k: round(s.precision, 4) for k, s in sorted(f1["ours"].by_type.items())},
            "recall": {k: round(s.recall, 4) for k, s in sorted(f1["ours"].by_type.items())},
            "presidio_f1": f1["presidio"].f1(),
            "datatrove_f1": f1["datatrove"].f1(),
            "datatrove_docs_per_s": round(speed["datatrove"], 1),
            "locales": list(LOCALES),
            "match_rule": "same type, IoU >= 0.5",
        },
    )
    return 0
