"""PII and secret detectors: find spans, then replace them with placeholders or keyed pseudonyms.

    from lmfoundry.infra.config import PiiConfig
    from lmfoundry.tasks.pii.detectors import find_pii, scrub_text
    spans = find_pii("mail jane@example.org or call +44 20 7946 0958", PiiConfig())
    scrub_text(text, spans, Replacer(PiiConfig()))   # 'mail <EMAIL> or call <PHONE>'

Every detector is a cheap regular expression that proposes candidates plus a validator that
keeps precision high: phone numbers go through the phonenumbers library (length and country
rules), credit cards through Luhn and card-network prefixes, IBANs through their country
length and mod-97 checksum, IP addresses through ``ipaddress``, e-mail domains through a TLD
check, JWTs by decoding their header. Overlapping candidates are resolved by a fixed priority
(secrets first, phones last), so one character range is reported once.

Person, location and organisation names need a statistical model: they are found through
Presidio with a spaCy model only when ``pii.ner_model`` names one that is installed (or a
path to one); the default path imports neither.

Pseudonyms are ``<TYPE_hex>`` where hex is an HMAC-SHA256 of the canonical value under a key
read from the environment variable ``pii.key_env``; the same value gives the same pseudonym,
and the key itself is never stored anywhere. Pseudonyms are deliberately not realistic fake
values: a fake e-mail address would be detected again, and a model could not tell it apart
from a real one.
"""
from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import hmac
import ipaddress
import json
import os
import re
from functools import lru_cache
from typing import Callable, Iterable, NamedTuple

import phonenumbers

from lmfoundry.infra.config import ConfigError, PiiConfig

REGEX_ENTITIES = ("EMAIL", "PHONE", "IP", "CREDIT_CARD", "IBAN", "US_SSN", "SECRET")
NER_ENTITIES = ("PERSON", "LOCATION", "ORGANIZATION")

# higher first: when two candidates overlap, the one from the more specific detector wins
PRIORITY = {"SECRET": 0, "EMAIL": 1, "IBAN": 2, "CREDIT_CARD": 3, "US_SSN": 4, "IP": 5, "PHONE": 6,
            "PERSON": 7, "ORGANIZATION": 8, "LOCATION": 9}


class PiiSpan(NamedTuple):
    start: int
    end: int
    entity_type: str
    detector: str  # finer kind, e.g. "ipv6" or "aws_access_key"
    canonical: str | None = None  # normalised value for pseudonyms (None: derived from the text)


class MissingKeyError(ConfigError):
    """Pseudonym mode without its HMAC key in the environment."""


# Speed: the regex engine skips quickly to a pattern's first literal or character class, but
# not when the pattern opens with a lookbehind. So "not glued to a word" is checked one
# character late, as `[0-9](?<![\w.][\s\S])`: after the first digit, the character before it.
# Patterns for rare characters (`@`, `:`, `://`) start at that character and extend backwards.

# --------------------------------------------------------------------------- e-mail

_EMAIL_DOMAIN = re.compile(r"@(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+[^\W\d_]{2,24}(?![\w-]|\.[^\W_])")
_EMAIL_LOCAL = re.compile(r"[\w.%+-]{1,64}$")
# two-letter country TLDs are all accepted; longer ones must be known, which stops code such
# as `x@self.weight` (numpy matmul) from looking like an address
_LONG_TLDS = frozenset(
    "com org net edu gov mil int info biz name pro aero coop museum mobi asia tel travel jobs cat "
    "io dev app ai xyz online site tech store shop club cloud email blog news live life world "
    "space website page link agency company digital media network solutions systems services "
    "group team zone today academy center design studio family consulting expert global "
    "social host berlin paris london nyc tokyo swiss bayern wien amsterdam".split()
)


def _valid_email(text: str, start: int, end: int) -> bool:
    local, domain = text[start:end].rsplit("@", 1)
    if ".." in local or local.endswith(".") or ".." in domain:
        return False
    tld = domain.rsplit(".", 1)[1].lower()
    return len(tld) == 2 or tld in _LONG_TLDS or tld.startswith("xn--")


def find_emails(text: str) -> Iterable[PiiSpan]:
    if "@" not in text:
        return
    for m in _EMAIL_DOMAIN.finditer(text):
        local = _EMAIL_LOCAL.search(text, max(0, m.start() - 64), m.start())
        if local is None or (local.start() > 0 and _EMAIL_LOCAL.match(text, local.start() - 1, local.start())):
            continue  # nothing before the @, or a run too long to be a local part
        start = local.start()
        while text[start] == ".":
            start += 1
        if start < m.start() and _valid_email(text, start, m.end()):
            yield PiiSpan(start, m.end(), "EMAIL", "email", text[start:m.end()].lower())


# --------------------------------------------------------------------------- IP addresses

_IPV4 = re.compile(r"[0-9](?<![\w.][\s\S])[0-9]{0,2}\.(?:[0-9]{1,3}\.){2}[0-9]{1,3}(?![\w]|\.[0-9])")
# from the first colon on; up to four hex digits before it are added afterwards
_IPV6_TAIL = re.compile(r":(?=[0-9A-Fa-f:])[0-9A-Fa-f:]{1,38}(?:(?<=:)(?:[0-9]{1,3}\.){3}[0-9]{1,3})?(?![\w:]|\.[0-9])")
_HEX = frozenset("0123456789abcdefABCDEF")
# "Python 3.10.0.1", "v1.2.3.4", "==2.0.1.3": four numbers with dots that are versions
_VERSION_BEFORE = re.compile(r"(?:\b(?:version|release|v)|==|>=|<=|~=|!=)\s?$", re.IGNORECASE)


def _plausible_ipv4(candidate: str) -> bool:
    """Section numbers (4.2.1.1), netmasks (255.255.255.0) and 0.x parse as IPv4 but identify nobody.

    Addresses with four one-digit octets are public resolvers at most (8.8.8.8), never a person."""
    octets = candidate.split(".")
    return octets[0] not in ("0", "255") and any(len(o) > 1 for o in octets)


def _ip_allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address, public_only: bool) -> bool:
    return address.is_global if public_only else True


def find_ipv4(text: str, public_only: bool) -> Iterable[PiiSpan]:
    for m in _IPV4.finditer(text):
        try:
            address = ipaddress.IPv4Address(m.group())
        except ValueError:  # an octet over 255, or a leading zero
            continue
        if not _plausible_ipv4(m.group()) or _VERSION_BEFORE.search(text, max(0, m.start() - 10), m.start()):
            continue
        if _ip_allowed(address, public_only):
            yield PiiSpan(m.start(), m.end(), "IP", "ipv4", str(address))


def _plausible_ipv6(candidate: str) -> bool:
    """Reject slices and scope operators that parse as IPv6: `x[1::2]`, `a::b`."""
    groups = [g for g in candidate.split(":") if g]
    if "::" not in candidate:
        return True
    return len(groups) >= 2 and any(len(g) >= 3 for g in groups) and any(c.isdigit() for c in candidate)


def find_ipv6(text: str, public_only: bool) -> Iterable[PiiSpan]:
    for m in _IPV6_TAIL.finditer(text):
        start = m.start()
        while start > 0 and m.start() - start < 4 and text[start - 1] in _HEX:
            start -= 1
        if start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_:."):
            continue
        candidate = text[start:m.end()]
        if candidate.count(":") < 2 or not _plausible_ipv6(candidate):
            continue
        try:
            address = ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        if _ip_allowed(address, public_only):
            yield PiiSpan(start, m.end(), "IP", "ipv6", address.compressed)


# --------------------------------------------------------------------------- credit cards

_CARD = re.compile(r"[0-9](?<![\w.-][\s\S])[0-9]{3}(?:[ -]?[0-9]){9,15}(?![\w-]|[.,][0-9])")
# how printed card numbers are grouped: 4-4-4-4 (most), 4-6-5 (Amex), 4-6-4 (Diners), longer PANs
_CARD_GROUPS = {(4, 4, 4, 4), (4, 4, 4, 4, 3), (4, 4, 4, 4, 2), (4, 4, 4, 4, 1), (4, 6, 5), (4, 6, 4), (4, 4, 5),
                (4, 3, 3, 3), (4, 4, 4, 1)}


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_network(digits: str) -> str | None:
    """The card network whose prefix and length rules the number fits, else None."""
    n, p2, p4 = len(digits), int(digits[:2]), int(digits[:4])
    p3, p6 = int(digits[:3]), int(digits[:6])
    if digits[0] == "4" and n in (13, 16, 19):
        return "visa"
    if (51 <= p2 <= 55 or 2221 <= p4 <= 2720) and n == 16:
        return "mastercard"
    if p2 in (34, 37) and n == 15:
        return "amex"
    if (p4 == 6011 or p2 == 65 or 644 <= p3 <= 649 or 622126 <= p6 <= 622925) and 16 <= n <= 19:
        return "discover"
    if (300 <= p3 <= 305 or p2 in (36, 38, 39) or p4 == 3095) and 14 <= n <= 19:
        return "diners"
    if (p2 == 35 and 16 <= n <= 19) or (p4 in (1800, 2131) and n == 15):
        return "jcb"
    if p2 == 62 and 16 <= n <= 19:
        return "unionpay"
    if 2200 <= p4 <= 2204 and 16 <= n <= 19:
        return "mir"
    if (p2 == 50 or 56 <= p2 <= 69) and 12 <= n <= 19:
        return "maestro"
    return None


def find_credit_cards(text: str) -> Iterable[PiiSpan]:
    for m in _CARD.finditer(text):
        raw = m.group()
        separators = {c for c in raw if not c.isdigit()}
        if len(separators) > 1:
            continue
        if separators and tuple(len(g) for g in re.split(r"[ -]", raw)) not in _CARD_GROUPS:
            continue
        digits = raw.replace(" ", "").replace("-", "")
        network = card_network(digits) if 13 <= len(digits) <= 19 and luhn_ok(digits) else None
        if network:
            yield PiiSpan(m.start(), m.end(), "CREDIT_CARD", network, digits)


# --------------------------------------------------------------------------- IBAN

# total IBAN length per country (the SWIFT IBAN registry)
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21,
    "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28,
    "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}
_IBAN = re.compile(r"[A-Z](?<![\w][\s\S])[A-Z][0-9]{2}(?: ?[A-Z0-9]){11,30}")


def iban_checksum_ok(iban: str) -> bool:
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _iban_end(text: str, start: int, stop: int, length: int) -> int | None:
    """Where the first `length` alphanumerics from `start` end, if that is a group boundary."""
    count = 0
    for i in range(start, stop):
        if text[i] != " ":
            count += 1
            if count == length:
                end = i + 1
                return end if end == len(text) or not text[end].isalnum() else None
    return None


def find_ibans(text: str) -> Iterable[PiiSpan]:
    for m in _IBAN.finditer(text):
        length = IBAN_LENGTHS.get(m.group()[:2])
        if length is None:
            continue
        end = _iban_end(text, m.start(), m.end(), length)
        if end is None:
            continue
        compact = text[m.start():end].replace(" ", "")
        if iban_checksum_ok(compact):
            yield PiiSpan(m.start(), end, "IBAN", "iban", compact)


# --------------------------------------------------------------------------- US social security numbers

_SSN = re.compile(r"[0-9](?<![\w-][\s\S])[0-9]{2}([- ])[0-9]{2}\1[0-9]{4}(?![\w]|-[0-9])")


def find_us_ssns(text: str) -> Iterable[PiiSpan]:
    for m in _SSN.finditer(text):
        area, group, serial = m.group()[:3], m.group()[4:6], m.group()[7:]
        if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
            continue
        yield PiiSpan(m.start(), m.end(), "US_SSN", "us_ssn", area + group + serial)


# --------------------------------------------------------------------------- phone numbers

# a run of digits with single separators and parentheses, plus an optional extension
_PHONE_RUN = re.compile(
    r"[0-9+(](?<![\w+/.\-][\s\S])(?:(?<=[0-9])|(?<=\+)(?=[0-9])|(?<=\()\+?(?=[0-9]))(?:[0-9()]|[ .\-/](?=[0-9(]))*"
    r"(?:\s?(?:x|ext\.?|extension)\s?[0-9]{1,6})?(?![\w@]|[.\-/,][0-9]|-\w)"
)
_EXTENSION = re.compile(r"\s?(?:x|ext\.?|extension)\s?[0-9]{1,6}$")
_PARENS = re.compile(r"\(\+?[0-9]{1,5}\)")
_NANP_SHAPE = re.compile(r"^(?:1[ .\-]?)?(?:\([0-9]{3}\)[ .\-]?|[0-9]{3}[ .\-])[0-9]{3}[ .\-][0-9]{4}$")
_DATE_OR_TIME = re.compile(
    r"(?:^|\D)(?:[0-9]{4}[-./][01]?[0-9][-./][0-3]?[0-9]|[0-3]?[0-9][-./][0-3]?[0-9][-./](?:1[89]|20)[0-9]{2})(?:\D|$)"
)
_COUNTING = "01234567890123456789"
_ZIP_PLUS_4 = re.compile(r"^[0-9]{5}-[0-9]{4}$")
_DOTTED_QUAD = re.compile(r"^[0-9]{1,3}(?:\.[0-9]{1,3}){3}$")
NANP_REGIONS = frozenset({"US", "CA", "AG", "AI", "AS", "BB", "BM", "BS", "DM", "DO", "GD", "GU", "JM", "KN", "KY",
                          "LC", "MP", "MS", "PR", "SX", "TC", "TT", "VC", "VG", "VI"})


def _isbn_ok(raw: str) -> bool:
    chars = [c for c in raw if c.isdigit() or c in "Xx"]
    if len(chars) == 10:
        total = sum((10 - i) * (10 if c in "Xx" else int(c)) for i, c in enumerate(chars))
        return total % 11 == 0
    if len(chars) == 13 and raw[:3] in ("978", "979"):
        total = sum((1 if i % 2 == 0 else 3) * int(c) for i, c in enumerate(chars))
        return total % 10 == 0
    return False


def _looks_like_other_number(main: str) -> bool:
    """Dates, times, dotted quads, ISBNs, decimals in a row: digit runs that are not phones."""
    if _DATE_OR_TIME.search(main) or _DOTTED_QUAD.match(main):
        return True
    if "." in main and " " in main:  # "0.000 0.125": numbers in a table row
        return True
    if main.count("-") >= 3 and _isbn_ok(main):
        return True
    if main.count(".") == 1 and not any(c in main for c in " -/()"):  # "0.315994": a decimal
        return True
    if _ZIP_PLUS_4.match(main):
        return True
    digits = "".join(c for c in main if c.isdigit())
    if len(set(digits)) <= 3 or digits in _COUNTING:  # "010 011 100 101", "0123456789": sequences
        return True
    groups = re.split(r"[ .\-/()]+", main.replace("(0)", " ").strip("+() "))
    if main.lstrip("(").startswith("+"):
        groups = groups[1:]  # a country code such as +1 or +7 is one digit
    if len(groups) >= 4 and len({len(g) for g in groups}) == 1 and len(groups[0]) >= 3:
        return True  # "012 013 023 123": a row of equal numbers; no plan writes phones that way
    return sum(1 for g in groups if len(g) == 1) >= 2  # "0 1 2 3 4 5": a sequence, not a number


class PhoneMatcher:
    """Validates digit runs as phone numbers with the phonenumbers library.

    `validation="possible"`: the length fits the country's numbering plan (unassigned area
    codes pass, as they do in most real and synthetic text); `"valid"`: the number is in an
    assigned range. National numbers (no +/00) must also look like one: a trunk 0, an area
    code in parentheses, or the North American 3-3-4 shape, which keeps IDs, timestamps and
    table rows out.
    """

    def __init__(self, regions: list[str], validation: str):
        self.regions = [r.upper() for r in regions]
        self.nanp_regions = [r for r in self.regions if r in NANP_REGIONS]
        self.other_regions = [r for r in self.regions if r not in NANP_REGIONS]
        self.check = phonenumbers.is_valid_number if validation == "valid" else self._possible

    @staticmethod
    def _possible(number: phonenumbers.PhoneNumber) -> bool:
        return phonenumbers.is_possible_number_with_reason(number) == phonenumbers.ValidationResult.IS_POSSIBLE

    def _accept(self, text: str, region: str | None) -> str | None:
        try:
            number = phonenumbers.parse(text, region)
        except phonenumbers.NumberParseException:
            return None
        return f"+{number.country_code}{number.national_number}" if self.check(number) else None

    def canonical(self, run: str) -> str | None:
        """E.164 form of a phone number written as `run`, or None if it is not one."""
        main = _EXTENSION.sub("", run)
        if main.count("(") != main.count(")") or _PARENS.sub("", main).count("(") or len(_PARENS.findall(main)) > 2:
            return None
        digits = "".join(c for c in main if c.isdigit())
        stripped = main.lstrip("(")
        international = stripped.startswith("+") or stripped.startswith("00")
        if stripped.startswith("00"):
            digits = digits[2:]
        if not 7 <= len(digits) <= 15 or _looks_like_other_number(main):
            return None
        if international:
            return self._accept("+" + main.replace("00", "", 1) if stripped.startswith("00") else main, None)
        if _NANP_SHAPE.match(main):
            regions = self.nanp_regions
        elif (main.startswith("(") or main.startswith("0")) and len(digits) >= 8:
            regions = self.other_regions + self.nanp_regions
        else:
            return None
        for region in regions:
            found = self._accept(main, region)
            if found:
                return found
        return None

    def find(self, text: str) -> Iterable[PiiSpan]:
        for m in _PHONE_RUN.finditer(text):
            yield from self._spans(m.group(), m.start())

    def _spans(self, run: str, offset: int) -> Iterable[PiiSpan]:
        if len(run) < 7:
            return
        found = self.canonical(run) if sum(c.isdigit() for c in run) >= 7 else None
        if found:
            yield PiiSpan(offset, offset + len(run), "PHONE", "phone", found)
        elif " " in run and sum(c.isdigit() for c in run) > 15:
            yield from self._split(run, offset)

    MAX_SPLIT_WORDS = 12  # a longer run of spaced numbers is a table row, not a list of phones
    MAX_PHONE_WORDS = 6  # "+44 (0) 20 7946 0958 x12": no plan writes more groups

    def _split(self, run: str, offset: int) -> Iterable[PiiSpan]:
        """Two numbers separated by one space: try the longest word windows from the left."""
        words = [(m.start(), m.end()) for m in re.finditer(r"\S+", run)]
        if len(words) > self.MAX_SPLIT_WORDS:
            return
        i = 0
        while i < len(words):
            for j in range(min(len(words), i + self.MAX_PHONE_WORDS), i, -1):
                start, end = words[i][0], words[j - 1][1]
                found = self.canonical(run[start:end])
                if found:
                    yield PiiSpan(offset + start, offset + end, "PHONE", "phone", found)
                    i = j
                    break
            else:
                i += 1


# --------------------------------------------------------------------------- secrets

# (kind, a substring every match contains, pattern): the substring test skips most texts at
# memory speed; most patterns also start with a literal, which the regex engine searches fast
_SECRET_PATTERNS: list[tuple[str, str, re.Pattern]] = [
    ("private_key", "PRIVATE KEY", re.compile(
        r"-----BEGIN[A-Z0-9 ]{0,30} PRIVATE KEY(?: BLOCK)?-----"
        r"(?:[\s\S]{0,20000}?-----END[A-Z0-9 ]{0,30} PRIVATE KEY(?: BLOCK)?-----|(?:\r?\n[A-Za-z0-9+/=:\- ]*)*)")),
    ("aws_access_key", "A", re.compile(r"A(?<![A-Za-z0-9][\s\S])(?:KIA|SIA|BIA|CCA|GPA|IDA|ROA|IPA|NPA|NVA|PKA)[A-Z0-9]{16}(?![A-Za-z0-9])")),
    ("github_token", "gh", re.compile(r"gh(?<![\w][\s\S]{2})[pousr]_[A-Za-z0-9]{36,251}(?![\w])")),
    ("github_token", "github_pat_", re.compile(r"github_pat_(?<![\w][\s\S]{11})[A-Za-z0-9_]{22,255}(?![\w])")),
    ("gitlab_token", "gl", re.compile(r"gl(?<![\w][\s\S]{2})(?:pat|dt|rt|ptt|soat|ft|cbt)-[A-Za-z0-9_\-]{20,}(?![\w-])")),
    ("slack_token", "xox", re.compile(r"xox(?<![\w][\s\S]{3})[abposre]-[A-Za-z0-9-]{10,}(?![\w-])")),
    ("slack_webhook", "hooks.slack.com", re.compile(r"https://hooks\.slack\.com/services/T[A-Za-z0-9_]+/B[A-Za-z0-9_]+/[A-Za-z0-9_]+")),
    ("stripe_key", "_live_", re.compile(r"[sr]k_live_(?<![\w][\s\S]{8})[A-Za-z0-9]{20,}(?![\w])")),
    ("google_api_key", "AIza", re.compile(r"AIza(?<![\w-][\s\S]{4})[A-Za-z0-9_\-]{35}(?![\w-])")),
    ("jwt", "eyJ", re.compile(r"eyJ(?<![\w-][\s\S]{3})[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}(?![\w-])")),
]

# `password = "hunter2"`, `"api_key": "..."`, `DB_PASSWORD=s3cr3t`: the value is the secret. The
# key is searched in a lower-cased copy (a case-insensitive alternation is ten times slower).
_ASSIGNMENT_KEYS = [
    re.compile(key + r"[a-z0-9_]*['\"]?[ \t]*(?::=|=>|=|:)[ \t]*")
    for key in (r"pass(?:word|wd|phrase)", "secret", r"api[_-]?(?:key|token)", r"access[_-]?(?:key|token)",
                r"private[_-]?key", r"auth[_-]?token")
]
_ASSIGNED_VALUE = re.compile(r"(?P<quote>['\"]?)(?P<value>[^\s'\"]{4,200})(?P=quote)")
_BEARER_KEYS = [re.compile(r"authorization[\"']?[ \t]*[:=][ \t]*[\"']?(?:bearer|basic|token)[ \t]+"), re.compile(r"bearer[ \t]+")]
_BEARER_VALUE = re.compile(r"(?=[A-Za-z\-._~+/]*[0-9])[A-Za-z0-9\-._~+/]{16,}=*(?![\w-])")
_URL_CREDENTIALS = re.compile(r"://(?P<value>[^\s/?#@:'\"<>]+:[^\s/?#@'\"<>]+)@")
_CODE_VALUE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*(?:\(.*|\[.*)?[,;)]?$")
_PLACEHOLDER_VALUE = re.compile(
    r"^(?:<.*|\$\{.*|\$\(.*|\{\{.*|%\(.*|\*+|x+|\.\.\.+|null|none|true|false|changeme|password|passwd|pass|"
    r"secret|\$[A-Za-z_]+)$",
    re.IGNORECASE,
)
_TRAILING_PUNCTUATION = re.compile(r"[)\],;.:¶]+$")


def _secret_value_ok(value: str, quoted: bool) -> bool:
    """Literal secrets only: variables, calls and placeholders such as `<password>` are code."""
    if _PLACEHOLDER_VALUE.match(value):
        return False
    if quoted or not _CODE_VALUE.match(value):
        return True
    # an unquoted identifier is a variable (`password=pw`) unless it mixes in digits (`hunter2`);
    # attributes, calls and subscripts (`self.pw`, `get_pw()`, `env["PW"]`) are always code
    return any(c.isdigit() for c in value) and not any(c in value for c in ".([")


def _jwt_ok(token: str) -> bool:
    header = token.split(".", 1)[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return False
    return isinstance(decoded, dict) and ("alg" in decoded or "typ" in decoded)


def _lower_same_length(text: str) -> str | None:
    """A lower-cased copy whose offsets match the text (None if a character's case expands)."""
    lowered = text.lower()
    return lowered if len(lowered) == len(text) else None


def find_secrets(text: str) -> Iterable[PiiSpan]:
    for kind, hint, pattern in _SECRET_PATTERNS:
        if hint not in text:
            continue
        for m in pattern.finditer(text):
            if kind != "jwt" or _jwt_ok(m.group()):
                yield PiiSpan(m.start(), m.end(), "SECRET", kind)
    for m in _URL_CREDENTIALS.finditer(text):
        if not _PLACEHOLDER_VALUE.match(m.group("value").split(":", 1)[1]):
            yield PiiSpan(m.start("value"), m.end("value"), "SECRET", "url_credentials")
    lowered = _lower_same_length(text)
    keys = text if lowered is None else lowered  # rare case-expanding text: keys must be lower-case there
    for key in (k for pattern in _ASSIGNMENT_KEYS for k in pattern.finditer(keys)):
        m = _ASSIGNED_VALUE.match(text, key.end())
        if m is None:
            continue
        value, quoted = m.group("value"), bool(m.group("quote"))
        if not quoted:  # `password=None)` in a signature, `pwd: abc123.` ending a sentence
            value = _TRAILING_PUNCTUATION.sub("", value)
        if len(value) >= 4 and _secret_value_ok(value, quoted):
            yield PiiSpan(m.start("value"), m.start("value") + len(value), "SECRET", "password")
    for key in (k for pattern in _BEARER_KEYS for k in pattern.finditer(keys)):
        m = _BEARER_VALUE.match(text, key.end())
        if m is not None:
            yield PiiSpan(m.start(), m.end(), "SECRET", "bearer_token")


# --------------------------------------------------------------------------- optional NER


class NerDetector:
    """Names, locations and organisations through Presidio's spaCy recogniser (loaded lazily)."""

    CHUNK_CHARS = 100_000  # spaCy refuses texts over nlp.max_length; chunks keep memory flat

    def __init__(self, model: str, entities: list[str]):
        self.entities = [e for e in entities if e in NER_ENTITIES]
        self.analyzer = _presidio_analyzer(model)

    def find(self, text: str) -> Iterable[PiiSpan]:
        for offset, chunk in _chunks(text, self.CHUNK_CHARS):
            for r in self.analyzer.analyze(chunk, language="en", entities=self.entities):
                yield PiiSpan(offset + r.start, offset + r.end, r.entity_type, "ner")


def _chunks(text: str, size: int) -> Iterable[tuple[int, str]]:
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind("\n", start + size // 2, end)
            end = cut + 1 if cut > 0 else end
        yield start, text[start:end]
        start = end


@lru_cache(maxsize=4)
def _presidio_analyzer(model: str):
    from pathlib import Path

    try:
        import spacy
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine
        from presidio_analyzer.predefined_recognizers import SpacyRecognizer
    except ImportError as exc:
        raise ConfigError(
            f"pii.ner_model is set to '{model}' but presidio-analyzer/spaCy are not installed ({exc}); "
            "install them (`pip install presidio-analyzer spacy`) or unset pii.ner_model"
        ) from exc
    # Presidio downloads a missing model by itself; a pipeline stage must not reach the network
    if not (spacy.util.is_package(model) or Path(model).exists()):
        raise ConfigError(
            f"pii.ner_model '{model}' is not an installed spaCy model or a model directory; "
            f"install it first (`python -m spacy download {model}`) or unset pii.ner_model"
        )
    mapping = {"PERSON": "PERSON", "PER": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION", "FAC": "LOCATION",
               "ORG": "ORGANIZATION"}
    engine = SpacyNlpEngine(
        models=[{"lang_code": "en", "model_name": model}],
        ner_model_configuration=NerModelConfiguration(model_to_presidio_entity_mapping=mapping, labels_to_ignore=[]),
    )
    registry = RecognizerRegistry(supported_languages=["en"])
    registry.add_recognizer(SpacyRecognizer(supported_language="en", supported_entities=list(NER_ENTITIES)))
    return AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])


# --------------------------------------------------------------------------- scanning


class Scanner:
    """All detectors a config enables, built once per config."""

    def __init__(self, cfg: PiiConfig):
        enabled = set(cfg.entities)
        self.detectors: list[Callable[[str], Iterable[PiiSpan]]] = []
        if "SECRET" in enabled:
            self.detectors.append(find_secrets)
        if "EMAIL" in enabled:
            self.detectors.append(find_emails)
        if "IBAN" in enabled:
            self.detectors.append(find_ibans)
        if "CREDIT_CARD" in enabled:
            self.detectors.append(find_credit_cards)
        if "US_SSN" in enabled:
            self.detectors.append(find_us_ssns)
        if "IP" in enabled:
            public = cfg.ip_public_only
            self.detectors.append(lambda text: find_ipv4(text, public))
            self.detectors.append(lambda text: find_ipv6(text, public))
        if "PHONE" in enabled:
            self.detectors.append(PhoneMatcher(cfg.phone_regions, cfg.phone_validation).find)
        if enabled.intersection(NER_ENTITIES):
            self.detectors.append(NerDetector(cfg.ner_model, cfg.entities).find)

    def find(self, text: str) -> list[PiiSpan]:
        candidates = [span for detect in self.detectors for span in detect(text)]
        return resolve_overlaps(candidates) if len(candidates) > 1 else candidates


def resolve_overlaps(spans: list[PiiSpan]) -> list[PiiSpan]:
    """Keep the highest-priority (then longest) span of any overlapping group; sorted by start."""
    ranked = sorted(spans, key=lambda s: (PRIORITY[s.entity_type], s.start - s.end, s.start))
    starts: list[int] = []  # kept spans never overlap, so sorting by start also sorts their ends
    kept: list[PiiSpan] = []
    for span in ranked:
        i = bisect.bisect_right(starts, span.start)
        if (i > 0 and kept[i - 1].end > span.start) or (i < len(kept) and kept[i].start < span.end):
            continue
        starts.insert(i, span.start)
        kept.insert(i, span)
    return kept


@lru_cache(maxsize=16)
def _scanner(cfg_json: str) -> Scanner:
    return Scanner(PiiConfig.model_validate_json(cfg_json))


_RECENT: dict[int, tuple[PiiConfig, Scanner]] = {}  # by id: skips serialising the config per text


def scanner_for(cfg: PiiConfig) -> Scanner:
    """The detectors for a config, built once per distinct config (configs are frozen)."""
    recent = _RECENT.get(id(cfg))
    if recent is not None and recent[0] is cfg:  # the entry holds cfg, so its id is not reused
        return recent[1]
    scanner = _scanner(cfg.model_dump_json())
    if len(_RECENT) >= 16:
        _RECENT.clear()
    _RECENT[id(cfg)] = (cfg, scanner)
    return scanner


def find_pii(text: str, cfg: PiiConfig) -> list[PiiSpan]:
    """Every PII span the config's detectors find in `text`: sorted, non-overlapping."""
    return scanner_for(cfg).find(text)


# --------------------------------------------------------------------------- replacing


def read_key(cfg: PiiConfig) -> bytes:
    """The HMAC key for pseudonyms, from the environment variable the config names."""
    key = os.environ.get(cfg.key_env, "")
    if not key:
        raise MissingKeyError(
            f"pii.replacement is 'pseudonym' but the environment variable {cfg.key_env} is not set; "
            f"export {cfg.key_env} with a secret of at least 16 characters (keep it out of configs), "
            "or set pii.replacement=placeholder"
        )
    if len(key) < 16:
        raise MissingKeyError(f"the pseudonym key in {cfg.key_env} is shorter than 16 characters; use a longer random secret")
    return key.encode()


def key_fingerprint(cfg: PiiConfig) -> str:
    """Identifies which key made the pseudonyms (so a new key means a new stage version)
    without revealing it: an HMAC under the key of a fixed label, not a hash of the key."""
    return hmac.new(read_key(cfg), b"lmfoundry pii key id", hashlib.sha256).hexdigest()[:16]


def canonical_value(span: PiiSpan, text: str) -> str:
    if span.canonical is not None:
        return span.canonical
    value = text[span.start:span.end]
    return value.casefold().strip() if span.entity_type in NER_ENTITIES else value


class Replacer:
    """Typed placeholders (`<EMAIL>`) or keyed pseudonyms (`<EMAIL_5f1c0e9a2b>`)."""

    def __init__(self, cfg: PiiConfig):
        self.key = read_key(cfg) if cfg.replacement == "pseudonym" else None

    def __call__(self, span: PiiSpan, text: str) -> str:
        if self.key is None:
            return f"<{span.entity_type}>"
        message = f"{span.entity_type}\x00{canonical_value(span, text)}".encode("utf-8", "surrogatepass")
        return f"<{span.entity_type}_{hmac.new(self.key, message, hashlib.sha256).hexdigest()[:10]}>"


def replace_spans(text: str, spans: list[PiiSpan], replace: Replacer) -> tuple[str, list[tuple[int, int]]]:
    """The text with every (sorted, non-overlapping) span replaced, and where each replacement landed."""
    parts, placed, last, length = [], [], 0, 0
    for span in spans:
        parts.append(text[last:span.start])
        length += span.start - last
        replacement = replace(span, text)
        parts.append(replacement)
        placed.append((length, length + len(replacement)))
        length += len(replacement)
        last = span.end
    parts.append(text[last:])
    return "".join(parts), placed


def scrub_text(text: str, spans: list[PiiSpan], replace: Replacer) -> str:
    return replace_spans(text, spans, replace)[0]


def mask_value(value: str, entity_type: str) -> str:
    """An audit-safe view of a found value: first and last character and the length.

    Secrets show only their length: even two characters of a key are more than a reviewer needs.
    """
    if entity_type == "SECRET" or len(value) < 6:
        return f"[{len(value)} chars]"
    return f"{value[0]}…{value[-1]} [{len(value)} chars]"
