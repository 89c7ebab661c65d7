"""PII and secret detectors: find typed spans in text (replacing them: tasks/pii/replace.py).

    from lmfoundry.infra.config import PiiConfig
    from lmfoundry.tasks.pii.detectors import find_pii
    find_pii("mail jane@example.org or call +44 20 7946 0958", PiiConfig())   # [EMAIL span, PHONE span]

Every detector is a cheap regular expression that proposes candidates plus a validator that
keeps precision high (tasks/pii/validators.py): phone numbers go through the phonenumbers
library (tasks/pii/phones.py), credit cards through Luhn and card-network prefixes, IBANs
through the country's format and mod-97 checksum, IP addresses through ``ipaddress``, e-mail
domains through a TLD check, JWTs by decoding their header (secrets: tasks/pii/credentials.py).
Overlapping candidates are resolved by a fixed priority (secrets first, phones last), so one
character range is reported once.

Person, location and organisation names need a statistical model: they are found through
Presidio with a spaCy model only when ``pii.ner_model`` names one that is installed
(tasks/pii/ner.py); the default path imports neither.
"""
from __future__ import annotations

import bisect
import ipaddress
import re
from functools import lru_cache
from typing import Callable, Iterable

from lmfoundry.infra.config import PiiConfig
from lmfoundry.tasks.pii.credentials import find_secrets
from lmfoundry.tasks.pii.ner import NerDetector
from lmfoundry.tasks.pii.phones import PhoneMatcher
from lmfoundry.tasks.pii.spans import NER_ENTITIES, PRIORITY, REGEX_ENTITIES, PiiSpan  # noqa: F401 (re-exported)
from lmfoundry.tasks.pii.validators import (
    IBAN_LENGTHS,
    card_grouping_ok,
    card_network,
    email_ok,
    iban_ok,
    ip_allowed,
    luhn_ok,
    plausible_ipv4,
    plausible_ipv6,
)

# --------------------------------------------------------------------------- e-mail

_EMAIL_DOMAIN = re.compile(r"@(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+[^\W\d_]{2,24}(?![\w-]|\.[^\W_])")
_EMAIL_LOCAL = re.compile(r"[\w.%+-]{1,64}$")


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
        if start < m.start() and email_ok(text[start:m.end()]):
            yield PiiSpan(start, m.end(), "EMAIL", "email", text[start:m.end()].lower())


# --------------------------------------------------------------------------- IP addresses

_IPV4 = re.compile(r"[0-9](?<![\w.][\s\S])[0-9]{0,2}\.(?:[0-9]{1,3}\.){2}[0-9]{1,3}(?![\w]|\.[0-9])")
# from the first colon on; up to four hex digits before it are added afterwards
_IPV6_TAIL = re.compile(r":(?=[0-9A-Fa-f:])[0-9A-Fa-f:]{1,38}(?:(?<=:)(?:[0-9]{1,3}\.){3}[0-9]{1,3})?(?![\w:]|\.[0-9])")
_HEX = frozenset("0123456789abcdefABCDEF")
# "Python 3.10.0.1", "v1.2.3.4", "==2.0.1.3": four numbers with dots that are versions
_VERSION_BEFORE = re.compile(r"(?:\b(?:version|release|v)|==|>=|<=|~=|!=)\s?$", re.IGNORECASE)


def find_ipv4(text: str, public_only: bool) -> Iterable[PiiSpan]:
    for m in _IPV4.finditer(text):
        try:
            address = ipaddress.IPv4Address(m.group())
        except ValueError:  # an octet over 255, or a leading zero
            continue
        if not plausible_ipv4(m.group()) or _VERSION_BEFORE.search(text, max(0, m.start() - 10), m.start()):
            continue
        if ip_allowed(address, public_only):
            yield PiiSpan(m.start(), m.end(), "IP", "ipv4", str(address))


def _ipv6(candidate: str) -> ipaddress.IPv6Address | None:
    if candidate.count(":") < 2 or not plausible_ipv6(candidate):
        return None
    try:
        return ipaddress.IPv6Address(candidate)
    except ValueError:
        return None


def find_ipv6(text: str, public_only: bool) -> Iterable[PiiSpan]:
    for m in _IPV6_TAIL.finditer(text):
        start = m.start()
        while start > 0 and m.start() - start < 4 and text[start - 1] in _HEX:
            start -= 1
        glued = start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_:.")
        address = None if glued else _ipv6(text[start:m.end()])
        if address is None:
            # `key:2001:db8::1`, `mailto:fe80::1`, `ipv6:...`: a label and its colon before the address
            colon = text.index(":", start)
            if colon > 0 and text[colon - 1].isalnum():
                start = colon + 1
                address = _ipv6(text[start:m.end()])
        if address is not None and ip_allowed(address, public_only):
            yield PiiSpan(start, m.end(), "IP", "ipv6", address.compressed)


# --------------------------------------------------------------------------- credit cards

_CARD = re.compile(r"[0-9](?<![\w.-][\s\S])[0-9]{3}(?:[ -]?[0-9]){9,15}(?![\w-]|[.,][0-9])")


def find_credit_cards(text: str) -> Iterable[PiiSpan]:
    for m in _CARD.finditer(text):
        raw = m.group()
        separators = {c for c in raw if not c.isdigit()}
        if len(separators) > 1:
            continue
        if separators and not card_grouping_ok(tuple(len(g) for g in re.split(r"[ -]", raw))):
            continue
        digits = raw.replace(" ", "").replace("-", "")
        network = card_network(digits) if 13 <= len(digits) <= 19 and luhn_ok(digits) else None
        if network:
            yield PiiSpan(m.start(), m.end(), "CREDIT_CARD", network, digits)


# --------------------------------------------------------------------------- IBAN

_IBAN = re.compile(r"[A-Z](?<![\w][\s\S])[A-Z][0-9]{2}(?: ?[A-Z0-9]){11,30}")


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
        if iban_ok(compact):
            yield PiiSpan(m.start(), end, "IBAN", "iban", compact)


# --------------------------------------------------------------------------- US social security numbers

# not inside a longer digit run: "+992 372 12 5477" is a phone number, not an SSN after a "+992 "
_SSN = re.compile(r"[0-9](?<![\w+-][\s\S])(?<![0-9][ -][\s\S])[0-9]{2}([- ])[0-9]{2}\1[0-9]{4}(?![\w]|[- ][0-9])")


def find_us_ssns(text: str) -> Iterable[PiiSpan]:
    for m in _SSN.finditer(text):
        area, group, serial = m.group()[:3], m.group()[4:6], m.group()[7:]
        if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
            continue
        yield PiiSpan(m.start(), m.end(), "US_SSN", "us_ssn", area + group + serial)


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
