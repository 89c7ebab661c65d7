"""Validators that keep the PII detectors precise: a regex proposes, one of these decides.

    luhn_ok("4111111111111111")           # True
    card_network("378282246310005")       # 'amex'
    card_grouping_ok((4, 6, 5))           # True: how Amex numbers are printed
    iban_ok("DE89370400440532013000")     # True (python-stdnum: mod 97 and the country's BBAN format)

Checksums come from python-stdnum (Luhn, IBAN mod 97 with the SWIFT registry's BBAN formats);
what stays hand-written here is what stdnum does not cover: card networks by prefix and length,
printed card groupings, e-mail TLDs, IP plausibility, ISBNs in phone-like runs and JWT headers.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re

from stdnum import iban as stdnum_iban
from stdnum import luhn as stdnum_luhn
from stdnum import numdb

# --------------------------------------------------------------------------- e-mail

# two-letter country TLDs are all accepted; longer ones must be known, which stops code such
# as `x@self.weight` (numpy matmul) from looking like an address
LONG_TLDS = frozenset(
    "com org net edu gov mil int info biz name pro aero coop museum mobi asia tel travel jobs cat "
    "io dev app ai xyz online site tech store shop club cloud email blog news live life world "
    "space website page link agency company digital media network solutions systems services "
    "group team zone today academy center design studio family consulting expert global "
    "social host berlin paris london nyc tokyo swiss bayern wien amsterdam".split()
)


def email_ok(address: str) -> bool:
    local, domain = address.rsplit("@", 1)
    if ".." in local or local.endswith(".") or ".." in domain:
        return False
    tld = domain.rsplit(".", 1)[1].lower()
    return len(tld) == 2 or tld in LONG_TLDS or tld.startswith("xn--")


# --------------------------------------------------------------------------- IP addresses


def plausible_ipv4(candidate: str) -> bool:
    """Section numbers (4.2.1.1), netmasks (255.255.255.0) and 0.x parse as IPv4 but identify nobody.

    Addresses with four one-digit octets are public resolvers at most (8.8.8.8), never a person."""
    octets = candidate.split(".")
    return octets[0] not in ("0", "255") and any(len(o) > 1 for o in octets)


def plausible_ipv6(candidate: str) -> bool:
    """Reject slices and scope operators that parse as IPv6: `x[1::2]`, `a::b`."""
    groups = [g for g in candidate.split(":") if g]
    if "::" not in candidate:
        return True
    return len(groups) >= 2 and any(len(g) >= 3 for g in groups) and any(c.isdigit() for c in candidate)


def ip_allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address, public_only: bool) -> bool:
    return address.is_global if public_only else True


# --------------------------------------------------------------------------- payment cards


def luhn_ok(digits: str) -> bool:
    return stdnum_luhn.is_valid(digits)


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


def card_grouping_ok(groups: tuple[int, ...]) -> bool:
    """Whether digit groups of these lengths are how a card number is printed.

    Groups of four with a shorter last one (4-4-4-4, 4-4-4-3 for 15-digit Amex, 4-4-4-4-3 for
    19 digits, 4-4-4-1 for 13), the Amex/Diners 4-6-5 and 4-6-4, and the older 4-4-5 and 4-3-3-3
    of 13-digit Visa numbers. A single group is an unseparated number."""
    if len(groups) == 1:
        return True
    if len(groups) >= 3 and all(g == 4 for g in groups[:-1]) and 1 <= groups[-1] <= 4:
        return True
    return groups in ((4, 6, 4), (4, 6, 5), (4, 4, 5), (4, 3, 3, 3))


CARD_GROUPS = re.compile(r"[ -]")


def card_like(run: str) -> bool:
    """13-19 digits printed as a card number (Luhn not checked): never a phone number, valid or not."""
    if run[:1] in "0+(" or not run[:1].isdigit():
        return False  # cards start 1-9; a leading 0, + or ( is a dialling prefix
    separators = {c for c in run if not c.isdigit()}
    if len(separators) > 1 or not separators <= {" ", "-"}:
        return False
    groups = tuple(len(g) for g in CARD_GROUPS.split(run))
    return 13 <= sum(groups) <= 19 and card_grouping_ok(groups)


# --------------------------------------------------------------------------- IBAN


def _iban_lengths() -> dict[str, int]:
    """Total IBAN length per country, from the SWIFT registry that python-stdnum ships."""
    lengths = {}
    for _, country, _, props, _ in numdb.get("iban").prefixes:
        if len(country) == 2 and "bban" in props:
            lengths[country] = 4 + sum(int(n) for n in re.findall(r"(\d+)!", props["bban"]))
    return lengths


IBAN_LENGTHS = _iban_lengths()


def iban_ok(compact: str) -> bool:
    """Mod-97 checksum and the country's BBAN format. National check digits inside the BBAN
    are not checked: they vary by bank, and a wrong one still identifies an account holder."""
    return stdnum_iban.is_valid(compact, check_country=False)


# --------------------------------------------------------------------------- other numbers


def isbn_ok(raw: str) -> bool:
    chars = [c for c in raw if c.isdigit() or c in "Xx"]
    if len(chars) == 10:
        total = sum((10 - i) * (10 if c in "Xx" else int(c)) for i, c in enumerate(chars))
        return total % 11 == 0
    if len(chars) == 13 and raw[:3] in ("978", "979"):
        total = sum((1 if i % 2 == 0 else 3) * int(c) for i, c in enumerate(chars))
        return total % 10 == 0
    return False


def jwt_ok(token: str) -> bool:
    header = token.split(".", 1)[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return False
    return isinstance(decoded, dict) and ("alg" in decoded or "typ" in decoded)
