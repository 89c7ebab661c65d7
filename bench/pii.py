"""Benchmark `pii`: our detectors vs Presidio's pattern recognisers vs datatrove's PIIFormatter.

    lmf bench pii [--n 1000] [--seed 0] [--rounds 3] [--write labelled.jsonl]

All three run in this process, pinned to one core, on the same Faker-made labelled sentences
(seeded, several locales; ``labelled_sentences`` is also what the tests score), and all three
only DETECT (nobody replaces): ours is ``find_pii``; Presidio's AnalyzerEngine is built with
its predefined recognisers for the comparable entity types and a no-op NLP engine (no spaCy
model), its phone recogniser given our config's phone regions at its own default leniency
(phonenumbers' VALID: its POSSIBLE leniency, nearer our ``possible`` validation, drops its
phone F1 from ~0.68 to ~0.23 here, as it has none of our shape checks); datatrove's
formatter's own e-mail and IP regexes and IP validator are run without its replacement step
(it only knows those two types, so its F1 covers them). Every side runs --rounds alternating
passes over all sentences after one warm-up call; the median pass (CPU seconds) counts.
``metric`` is documents (sentences) per second; ``ratio`` is ours / Presidio; ``quality`` holds
every tool's per-type F1 (span match rule: tasks/pii/evaluate.py), and for reference
Presidio's F1 with its own default phone regions (untimed).
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
import sys
from typing import Any, Callable

from lmfoundry.bench._common import alternating_rounds, median_rate, pin_one_core, print_result, rounds_arg, timed
from lmfoundry.infra.config import PiiConfig

LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "nl_NL", "en_CA")
REGEX_TYPES = ("EMAIL", "PHONE", "IP", "CREDIT_CARD", "IBAN", "US_SSN")
PRESIDIO_ENTITIES = ["EMAIL_ADDRESS", "PHONE_NUMBER", "IP_ADDRESS", "CREDIT_CARD", "IBAN_CODE", "US_SSN"]
PRESIDIO_PHONE_LENIENCY = 1  # its PhoneRecognizer default: phonenumbers.Leniency.VALID

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


def presidio_analyzer(phone_regions: list[str] | None = None, phone_leniency: int = PRESIDIO_PHONE_LENIENCY):
    """Presidio with its predefined recognisers and a no-op NLP engine (no spaCy model); with
    `phone_regions`, its phone recogniser tries those regions (at `phone_leniency`) instead of
    its default ones."""
    # its e-mail recogniser calls tldextract, which would fetch the public suffix list over the
    # network on first use; an empty URL list makes it use the snapshot it ships with
    os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NoOpNlpEngine
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    engine = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}])
    registry = RecognizerRegistry(supported_languages=["en"])
    registry.load_predefined_recognizers(languages=["en"], nlp_engine=engine)
    registry.remove_recognizer("SpacyRecognizer")
    if phone_regions is not None:
        registry.remove_recognizer("PhoneRecognizer")
        registry.add_recognizer(PhoneRecognizer(supported_regions=tuple(r.upper() for r in phone_regions), leniency=phone_leniency))
    return AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])


def datatrove_spans(formatter: Any, text: str) -> list[Any]:
    """The spans datatrove's formatter would replace (its own regexes and validator), found
    without replacing them."""
    from lmfoundry.tasks.pii.evaluate import GoldSpan

    spans = [GoldSpan("EMAIL", m.start(), m.end()) for m in formatter.emails_replacer.regex.finditer(text)]
    validate = formatter.ip_replacer.validator
    spans += [GoldSpan("IP", m.start(), m.end()) for m in formatter.ip_replacer.regex.finditer(text)
              if validate is None or validate(m.group())]
    return spans


def one_pass(fn: Callable[[str], Any], texts: list[str]) -> float:
    """CPU seconds of calling fn on every text once."""
    _, timing = timed(lambda: [fn(text) for text in texts])
    return timing.cpu_s


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmf bench pii")
    p.add_argument("--n", type=int, default=1000, help="labelled sentences")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=rounds_arg, default=3, help="alternating timed passes per tool (at least 3; the median counts)")
    p.add_argument("--write", help="also save the labelled set as JSONL here")
    args = p.parse_args(argv)

    from datatrove.pipeline.formatters import PIIFormatter

    from lmfoundry.tasks.pii.detectors import find_pii
    from lmfoundry.tasks.pii.evaluate import parse_record, predict, score

    core = pin_one_core()
    raw = labelled_sentences(args.n, args.seed)
    if args.write:
        with open(args.write, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in raw)
    records = [parse_record(r, f"sentence {i}") for i, r in enumerate(raw)]
    texts = [r.text for r in records]

    cfg = PiiConfig()
    ours = lambda text: find_pii(text, cfg)  # noqa: E731
    analyzer = presidio_analyzer(cfg.phone_regions)
    presidio = lambda text: analyzer.analyze(text, language="en", entities=PRESIDIO_ENTITIES)  # noqa: E731
    formatter = PIIFormatter(only_remove_public_ips=False)  # our default scrubs every IP too
    datatrove = lambda text: datatrove_spans(formatter, text)  # noqa: E731
    sides = {"ours": ours, "presidio": presidio, "datatrove": datatrove}

    for fn in sides.values():  # warm caches and lazy imports outside the timing
        fn(texts[0])
    seconds = alternating_rounds({name: (lambda _, fn=fn: one_pass(fn, texts)) for name, fn in sides.items()}, args.rounds)
    speed = {name: median_rate(len(texts), s) for name, s in seconds.items()}
    regex_types = set(REGEX_TYPES)
    f1 = {
        "ours": score(records, predict(records, ours), types=regex_types | {"SECRET"}),
        "presidio": score(records, predict(records, presidio), types=regex_types),
        "datatrove": score(records, [datatrove(t) for t in texts], types={"EMAIL", "IP"}),
    }
    default_analyzer = presidio_analyzer()
    presidio_default = score(records, predict(records, lambda text: default_analyzer.analyze(text, language="en", entities=PRESIDIO_ENTITIES)), types=regex_types)
    for name in sides:
        print(f"{name:<10} {speed[name]:>10.0f} docs/s  F1 {f1[name].f1()}  cpu s per pass {[round(x, 3) for x in seconds[name]]}", file=sys.stderr)
    ours_f1 = f1["ours"].f1()
    same = {"sentences": len(texts), "seed": args.seed, "rounds": args.rounds, "statistic": "median", "clock": "CPU seconds (process_time + waited-for children)",
            "cores": [core], "warm": True, "operation": "detect only (no replacement)"}
    print_result(
        "pii", "docs_per_s", speed["ours"], "presidio-analyzer (predefined pattern recognisers, no NLP model)", speed["presidio"],
        n=len(texts),
        ratio_digits=2,
        settings={
            "ours": {"detectors": "find_pii, PiiConfig() defaults", "entities": cfg.entities, "phone_regions": cfg.phone_regions, "phone_validation": cfg.phone_validation, **same},
            "presidio": {"entities": PRESIDIO_ENTITIES, "nlp_engine": "none", "phone_regions": cfg.phone_regions, "phone_leniency": "VALID (its default)", **same},
            "datatrove": {"detectors": "PIIFormatter(only_remove_public_ips=False) e-mail and IP regexes + IP validator", "entities": ["EMAIL", "IP"], **same},
        },
        quality={
            "f1": ours_f1,
            "min_regex_f1": min(v for k, v in ours_f1.items() if k in regex_types),
            "precision": {k: round(s.precision, 4) for k, s in sorted(f1["ours"].by_type.items())},
            "recall": {k: round(s.recall, 4) for k, s in sorted(f1["ours"].by_type.items())},
            "presidio_f1": f1["presidio"].f1(),
            "presidio_default_phone_regions_f1": presidio_default.f1(),
            "datatrove_f1": f1["datatrove"].f1(),
            "datatrove_docs_per_s": round(speed["datatrove"], 1),
            "ratio_vs_datatrove": round(speed["ours"] / speed["datatrove"], 2),
            "cpu_s_per_pass": {name: [round(x, 4) for x in s] for name, s in seconds.items()},
            "locales": list(LOCALES),
            "match_rule": "same type, IoU >= 0.5",
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
