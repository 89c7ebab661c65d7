"""A deterministic, broad labelled set for the PII detectors: formats real text uses, in many contexts.

    from tests.tasks.pii.labelled_cases import labelled_set
    cases = labelled_set(seed=0)   # {"positives": [...], "national": {region: [...]}, "negatives": [...]}

Each record is ``{"text", "spans": [{"type", "start", "end"}], "kind"}`` (the span format
``lmf eval pii`` reads). Positives cover, per entity type:

- PHONE: every ``phonenumbers`` region, a fixed-line and a mobile number each, in E.164,
  international and RFC 3966 form; national form (which needs the region configured) goes
  under ``national[region]``;
- CREDIT_CARD: every network the detector knows, each length it issues, printed in its
  standard groupings (4-4-4-4, 4-6-5, 4-6-4, 4-4-4-3, 4-3-3-3, 4-4-4-4-3, none) with spaces
  and dashes;
- IP: IPv4 plain, with a port, with a CIDR suffix, in a URL; IPv6 full, compressed,
  IPv4-mapped, with a zone, bracketed with a port, in a URL and right after a `key:` colon;
- EMAIL, IBAN (every registry country, compact and grouped), US_SSN.

Every value is wrapped in contexts drawn round-robin from ``CONTEXTS`` (brackets, quotes,
`tel:`/`mailto:`/`key:` prefixes, HTML attributes and cells, code comments, table rows...), so
every context meets every type. Negatives are hard ones: versions, dates and times, ISBNs,
UUIDs, hashes, order and ticket numbers, Luhn-invalid card numbers in card groupings.
"""
from __future__ import annotations

import ipaddress
import random
import re
import string
from typing import Any, Iterable

import phonenumbers
from phonenumbers import PhoneNumberFormat, PhoneNumberType
from stdnum import iban as stdnum_iban
from stdnum import luhn

from lmfoundry.tasks.pii.validators import IBAN_LENGTHS

# `{v}` is the labelled value; each context is used for every entity type
CONTEXTS = [
    "Contact {v} for details.",
    "Reach us ({v}) any time.",
    "see [{v}] below",
    "value {{{v}}} set",
    'He said "{v}" twice.',
    "the field '{v}' is set",
    "Sie schrieb „{v}“ auf.",
    "«{v}»",
    "“{v}”",
    "key:{v}",
    "owner: {v}",
    "<{v}>",
    '<span data-value="{v}">x</span>',
    "<td>{v}</td>",
    "<li>{v}</li>",
    "// maintainer {v}",
    "# contact: {v}",
    "/* {v} */",
    "<!-- {v} -->",
    "| Jane Roe | {v} | active |",
    "jane,{v},berlin",
    '{{"value": "{v}"}}',
    "**{v}**",
    "`{v}`",
    "{v}",
    "Line one\n{v}\nline three",
    "Ends with {v}.",
    "First {v}, then the rest.",
    "list: {v}; more",
    "\t{v}\t",
]
# contexts only one type uses, as real text does
TYPE_CONTEXTS = {
    "PHONE": ['<a href="tel:{v}">call</a>', "tel:{v}", "Tel.: {v}", "Phone: {v} (mobile)"],
    "EMAIL": ['<a href="mailto:{v}">mail</a>', "mailto:{v}", "From: Jane Roe <{v}>"],
    "IP": ["ssh root@{v}", "ping -c 3 {v}", "mailto:{v}"],
    "CREDIT_CARD": ["Card: {v} exp 12/27", "cc={v}&cvv=123"],
    "IBAN": ["IBAN: {v}", "Konto {v} (Sparkasse)"],
    "US_SSN": ["SSN: {v}", "ssn={v}"],
}


def record(text: str, spans: list[tuple[str, int, int]], kind: str) -> dict[str, Any]:
    return {"text": text, "spans": [{"type": t, "start": s, "end": e} for t, s, e in spans], "kind": kind}


def place(template: str, value: str, entity: str, kind: str, label: tuple[int, int] | None = None) -> dict[str, Any]:
    """The template with `value` in it, labelled at `label` (a slice of value; default all of it)."""
    before = template.split("{v}")[0].replace("{{", "{").replace("}}", "}")
    text = template.replace("{v}", "\x00").replace("{{", "{").replace("}}", "}").replace("\x00", value)
    lo, hi = label or (0, len(value))
    return record(text, [(entity, len(before) + lo, len(before) + hi)] if entity else [], kind)


class Contexts:
    """Hands out contexts round-robin per type, so every context is used by every type."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.next: dict[str, int] = {}

    def take(self, entity: str, n: int) -> list[str]:
        pool = CONTEXTS + TYPE_CONTEXTS.get(entity, [])
        start = self.next.get(entity, 0)
        self.next[entity] = start + n
        return [pool[(start + i) % len(pool)] for i in range(n)]


# --------------------------------------------------------------------------- phones


def region_numbers(region: str, rng: random.Random) -> list[phonenumbers.PhoneNumber]:
    """A fixed-line and a mobile number of the region, varied from its example numbers."""
    numbers = []
    for kind in (PhoneNumberType.FIXED_LINE, PhoneNumberType.MOBILE):
        example = phonenumbers.example_number_for_type(region, kind)
        if example is None:
            continue
        national = str(example.national_number)
        number = example
        for _ in range(30):  # vary the last digits while the number stays valid
            tail = "".join(rng.choice(string.digits) for _ in range(min(4, len(national) - 2)))
            candidate = phonenumbers.PhoneNumber(country_code=example.country_code, national_number=int(national[: -len(tail)] + tail))
            if phonenumbers.is_valid_number_for_region(candidate, region):
                number = candidate
                break
        numbers.append(number)
    return numbers


def phone_records(rng: random.Random, contexts: Contexts) -> tuple[list[dict], dict[str, list[dict]]]:
    positives, national = [], {}
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for number in region_numbers(region, rng):
            e164 = phonenumbers.format_number(number, PhoneNumberFormat.E164)
            intl = phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL)
            rfc = phonenumbers.format_number(number, PhoneNumberFormat.RFC3966).removeprefix("tel:")
            for form, value in (("e164", e164), ("international", intl), ("rfc3966", rfc)):
                for template in contexts.take("PHONE", 2):
                    positives.append(place(template, value, "PHONE", f"PHONE/{form}"))
            value = phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL)
            national.setdefault(region, []).extend(
                place(t, value, "PHONE", "PHONE/national") for t in contexts.take("PHONE", 2)
            )
    return positives, national


# --------------------------------------------------------------------------- payment cards

# network -> (prefixes, lengths)
CARD_NETWORKS = {
    "visa": (["4"], [13, 16, 19]),
    "mastercard": (["51", "52", "53", "54", "55", "2221", "2720", "2500"], [16]),
    "amex": (["34", "37"], [15]),
    "discover": (["6011", "65", "644", "649", "622126", "622925"], [16, 19]),
    "diners": (["300", "305", "36", "38", "39"], [14, 16]),
    "jcb": (["3528", "3589"], [16, 19]),
    "unionpay": (["62"], [16, 17, 18, 19]),
    "mir": (["2200", "2204"], [16]),
    "maestro": (["50", "56", "58", "67", "69"], [13, 16, 19]),
}
# how each length is printed (besides unseparated)
CARD_GROUPINGS = {13: [(4, 3, 3, 3), (4, 4, 5)], 14: [(4, 6, 4)], 15: [(4, 6, 5), (4, 4, 4, 3)], 16: [(4, 4, 4, 4)],
                  17: [(4, 4, 4, 4, 1)], 18: [(4, 4, 4, 4, 2)], 19: [(4, 4, 4, 4, 3)]}


def card_number(prefix: str, length: int, rng: random.Random, valid: bool = True) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    check = luhn.calc_check_digit(body)
    if not valid:
        check = str((int(check) + rng.randint(1, 9)) % 10)
    return body + check


def group(digits: str, groups: tuple[int, ...], sep: str) -> str:
    parts, at = [], 0
    for g in groups:
        parts.append(digits[at:at + g])
        at += g
    return sep.join(parts)


def printed_cards(rng: random.Random, valid: bool) -> Iterable[tuple[str, str]]:
    """(network/grouping, printed number) for every network, length, grouping and separator."""
    for network, (prefixes, lengths) in CARD_NETWORKS.items():
        for length in lengths:
            for prefix in prefixes:
                digits = card_number(prefix, length, rng, valid)
                yield f"{network}/{length}/none", digits
                for grouping in CARD_GROUPINGS[length]:
                    for sep in " -":
                        name = "-".join(map(str, grouping))
                        yield f"{network}/{length}/{name}{sep!r}", group(card_number(prefix, length, rng, valid), grouping, sep)


def card_records(rng: random.Random, contexts: Contexts) -> list[dict]:
    return [place(t, value, "CREDIT_CARD", f"CREDIT_CARD/{kind}")
            for kind, value in printed_cards(rng, valid=True) for t in contexts.take("CREDIT_CARD", 2)]


# --------------------------------------------------------------------------- IP addresses


def ipv4(rng: random.Random) -> str:
    while True:
        a = ipaddress.IPv4Address(rng.getrandbits(32))
        octets = str(a).split(".")
        if octets[0] not in ("0", "255", "127") and any(len(o) > 1 for o in octets) and not a.is_multicast:
            return str(a)


def ipv6(rng: random.Random) -> ipaddress.IPv6Address:
    groups = [rng.choice([rng.getrandbits(16), rng.getrandbits(8), rng.getrandbits(4)]) for _ in range(8)]
    groups[0] = rng.choice([0x2001, 0x2a03, 0x2606, 0xfe80, 0x2400, 0xfd12])
    zeros = rng.randint(0, 4)  # a run of zero groups, so compression happens
    at = rng.randint(1, 8 - zeros)
    groups[at:at + zeros] = [0] * zeros
    return ipaddress.IPv6Address(":".join(f"{g:x}" for g in groups))


def ip_values(rng: random.Random) -> Iterable[tuple[str, str, tuple[int, int]]]:
    """(form, printed text, label slice) for every IP form."""
    for _ in range(8):
        a = ipv4(rng)
        yield "ipv4", a, (0, len(a))
        yield "ipv4/port", f"{a}:{rng.choice([22, 80, 443, 8080, 51234])}", (0, len(a))
        yield "ipv4/cidr", f"{a}/{rng.randint(8, 32)}", (0, len(a))
        yield "ipv4/url", f"http://{a}:8080/index.html", (7, 7 + len(a))
        b = ipv6(rng)
        yield "ipv6/full", b.exploded, (0, len(b.exploded))
        yield "ipv6/compressed", b.compressed, (0, len(b.compressed))
        mapped = f"::ffff:{ipv4(rng)}"
        yield "ipv6/ipv4_mapped", mapped, (0, len(mapped))
        zoned = f"fe80::{rng.getrandbits(16):x}:{rng.getrandbits(16):x}"
        yield "ipv6/zone", zoned + "%eth0", (0, len(zoned))
        c = b.compressed
        yield "ipv6/bracket_port", f"[{c}]:{rng.choice([443, 8443])}", (1, 1 + len(c))
        yield "ipv6/url", f"https://[{c}]:8080/api", (9, 9 + len(c))
        yield "ipv6/after_colon", f"addr:{c}", (5, 5 + len(c))


def ip_records(rng: random.Random, contexts: Contexts) -> list[dict]:
    return [place(t, value, "IP", f"IP/{form}", label)
            for form, value, label in ip_values(rng) for t in contexts.take("IP", 3)]


# --------------------------------------------------------------------------- e-mail, IBAN, SSN

NAMES = ["jane", "li", "oscar", "amelie", "noah", "sofia", "mateo", "yuki", "zoe", "ahmed"]
DOMAINS = ["example.com", "mail.example.org", "uni-berlin.de", "example.co.uk", "startup.io", "example.info", "post.example.fr"]


def email_values(rng: random.Random) -> Iterable[str]:
    for i in range(40):
        a, b = rng.choice(NAMES), rng.choice(NAMES)
        local = [f"{a}.{b}", f"{a}_{b}{rng.randint(1, 99)}", f"{a}+news", f"{a[0]}{b}", f"{a.upper()}.{b.title()}"][i % 5]
        yield f"{local}@{rng.choice(DOMAINS)}"


def iban_value(country: str, rng: random.Random) -> str:
    structure = re.findall(r"(\d+)!([nac])", iban_structures()[country])
    alphabet = {"n": string.digits, "a": string.ascii_uppercase, "c": string.digits + string.ascii_uppercase}
    bban = "".join(rng.choice(alphabet[kind]) for n, kind in structure for _ in range(int(n)))
    return country + stdnum_iban.calc_check_digits(country + "00" + bban) + bban


def iban_structures() -> dict[str, str]:
    from stdnum import numdb

    return {cc: props["bban"] for _, cc, _, props, _ in numdb.get("iban").prefixes if len(cc) == 2 and "bban" in props}


def other_records(rng: random.Random, contexts: Contexts) -> list[dict]:
    out = [place(t, v, "EMAIL", "EMAIL") for v in email_values(rng) for t in contexts.take("EMAIL", 2)]
    for country in sorted(IBAN_LENGTHS):
        compact = iban_value(country, rng)
        grouped = " ".join(compact[i:i + 4] for i in range(0, len(compact), 4))
        out += [place(t, compact, "IBAN", "IBAN/compact") for t in contexts.take("IBAN", 1)]
        out += [place(t, grouped, "IBAN", "IBAN/grouped") for t in contexts.take("IBAN", 1)]
    for _ in range(40):
        area = rng.choice([n for n in range(1, 900) if n != 666])
        ssn = f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
        out += [place(t, ssn, "US_SSN", "US_SSN") for t in contexts.take("US_SSN", 1)]
    return out


# --------------------------------------------------------------------------- hard negatives


def isbn10(rng: random.Random) -> str:
    body = [rng.randint(0, 9) for _ in range(9)]
    check = (11 - sum((10 - i) * d for i, d in enumerate(body)) % 11) % 11
    return "".join(map(str, body)) + ("X" if check == 10 else str(check))


def isbn13(rng: random.Random) -> str:
    body = [9, 7, rng.choice([8, 9])] + [rng.randint(0, 9) for _ in range(9)]
    check = (10 - sum((1 if i % 2 == 0 else 3) * d for i, d in enumerate(body)) % 10) % 10
    return "".join(map(str, body)) + str(check)


def negative_values(rng: random.Random) -> Iterable[tuple[str, str]]:
    r = rng.randint
    for _ in range(12):
        yield "version", f"v{r(0, 20)}.{r(0, 30)}.{r(0, 99)}"
        yield "version", f"Python {r(2, 3)}.{r(0, 13)}.{r(0, 20)}"
        yield "version", f"Version {r(1, 12)}.{r(0, 9)}.{r(10000, 22000)}.{r(1, 999)}"
        yield "version", f"pip install pkg=={r(0, 9)}.{r(0, 9)}.{r(0, 9)}.{r(0, 9)}"
        yield "version", f"build {r(1, 9)}.{r(0, 99)}.{r(0, 9999)}-rc.{r(1, 9)}"
        yield "date", f"{r(1990, 2030)}-{r(1, 12):02d}-{r(1, 28):02d}"
        yield "date", f"{r(1, 28):02d}/{r(1, 12):02d}/{r(1990, 2030)}"
        yield "date", f"{r(1, 28):02d}.{r(1, 12):02d}.{r(1990, 2030)}"
        yield "date", f"{r(1990, 2030)}-{r(1, 12):02d}-{r(1, 28):02d}T{r(0, 23):02d}:{r(0, 59):02d}:{r(0, 59):02d}Z"
        yield "date", f"{r(1990, 2030)}-{r(1, 12):02d}-{r(1, 28):02d} {r(0, 23):02d}:{r(0, 59):02d}:{r(0, 59):02d}.{r(0, 999999):06d}"
        yield "date", f"{r(1990, 2030)}{r(1, 12):02d}{r(1, 28):02d}"
        yield "time", f"{r(0, 23):02d}:{r(0, 59):02d}:{r(0, 59):02d}"
        i10, i13 = isbn10(rng), isbn13(rng)
        yield "isbn", f"ISBN {i10[0]}-{i10[1:4]}-{i10[4:9]}-{i10[9]}"
        yield "isbn", f"ISBN {i10}"
        yield "isbn", f"ISBN {i13[:3]}-{i13[3]}-{i13[4:6]}-{i13[6:12]}-{i13[12]}"
        yield "isbn", f"ISBN-13: {i13}"
        yield "uuid", str(__import__("uuid").UUID(int=rng.getrandbits(128)))
        yield "hash", f"{rng.getrandbits(128):032x}"
        yield "hash", f"sha1:{rng.getrandbits(160):040x}"
        yield "hash", f"commit {rng.getrandbits(28):07x}"
        yield "hash", f"sha256:{rng.getrandbits(256):064x}"
        yield "order", f"Order #{r(100000, 99999999)}"
        yield "order", f"order {r(100, 999)}-{r(1000000, 9999999)}-{r(1000000, 9999999)}"
        yield "order", f"PO-{r(2000, 2030)}-{r(0, 99999):05d}"
        yield "order", f"INV-{r(0, 999999):06d}"
        yield "order", f"ticket #{r(1000, 999999)}"
        yield "order", f"tracking 1Z{r(100, 999)}AA{r(10**9, 10**10 - 1)}"
        yield "order", f"order {r(10, 99)}-{r(10000, 99999)}-{r(10000, 99999)}"
        yield "number", f"${r(1, 99)},{r(100, 999)}.{r(0, 99):02d}"
        yield "number", f"{r(0, 90)}.{r(1000, 9999)}, {r(0, 179)}.{r(1000, 9999)}"
        yield "number", f"{r(100, 4000)}x{r(100, 3000)} pixels"
    for kind, value in printed_cards(rng, valid=False):
        yield f"luhn_invalid/{kind.split('/', 1)[0]}", value


def negative_records(rng: random.Random) -> list[dict]:
    contexts = Contexts(rng)
    return [place(t, value, "", f"negative/{kind}") for kind, value in negative_values(rng) for t in contexts.take("NEGATIVE", 1)]


def labelled_set(seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    contexts = Contexts(rng)
    phones, national = phone_records(rng, contexts)
    positives = phones + card_records(rng, contexts) + ip_records(rng, contexts) + other_records(rng, contexts)
    return {"positives": positives, "national": national, "negatives": negative_records(rng)}
