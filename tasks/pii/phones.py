"""Phone numbers: digit runs validated by the phonenumbers library (lengths and country plans).

    list(PhoneMatcher(["DE"], "possible").find("Ruf an: 030 12345678"))  # one PHONE span

A run of digits with single separators and parentheses is proposed, trimmed of brackets that
wrap it, and kept when phonenumbers accepts it: with a + or 00 country prefix for any
country, without one for the configured regions only, and then only when it looks like a
national number (see ``PhoneMatcher``). Dates, ISBNs, decimals, table rows and numbers printed
like payment cards are never phones.
"""
from __future__ import annotations

import re
from typing import Iterable

import phonenumbers

from lmfoundry.tasks.pii.spans import PiiSpan
from lmfoundry.tasks.pii.validators import card_like, isbn_ok

# a run of digits with single separators and parentheses, plus an optional extension
_PHONE_RUN = re.compile(
    r"[0-9+(](?<![\w+/.\-][\s\S])(?:(?<=[0-9])|(?<=\+)(?=[0-9])|(?<=\()\+?(?=[0-9]))(?:[0-9()]|[ .\-/](?=[0-9(]))*"
    r"(?:\s?(?:x|ext\.?|extension)\s?[0-9]{1,6})?(?![\w@]|[.\-/,][0-9]|-\w)"
)
_EXTENSION = re.compile(r"\s?(?:x|ext\.?|extension)\s?[0-9]{1,6}$")
_PARENS = re.compile(r"\(\+?[0-9]{1,5}(?:[ -][0-9]{1,5})?\)")  # (030), (+44), Hungary's (06 1), Lithuania's (0-312)
_NANP_SHAPE = re.compile(r"^(?:1[ .\-]?)?(?:\([0-9]{3}\)[ .\-]?|[0-9]{3}[ .\-])[0-9]{3}[ .\-][0-9]{4}$")
_DATE_OR_TIME = re.compile(
    r"(?:^|\D)(?:[0-9]{4}[-./][01]?[0-9][-./][0-3]?[0-9]|[0-3]?[0-9][-./][0-3]?[0-9][-./](?:1[89]|20)[0-9]{2})(?:\D|$)"
)
_COUNTING = "01234567890123456789"
_ZIP_PLUS_4 = re.compile(r"^[0-9]{5}-[0-9]{4}$")
_DOTTED_QUAD = re.compile(r"^[0-9]{1,3}(?:\.[0-9]{1,3}){3}$")
_ISBN_BEFORE = re.compile(r"ISBN(?:-1[03])?:?\s?$", re.IGNORECASE)  # an unseparated ISBN-10 can be a valid phone
NANP_REGIONS = frozenset({"US", "CA", "AG", "AI", "AS", "BB", "BM", "BS", "DM", "DO", "GD", "GU", "JM", "KN", "KY",
                          "LC", "MP", "MS", "PR", "SX", "TC", "TT", "VC", "VG", "VI"})


def _looks_like_other_number(main: str) -> bool:
    """Dates, times, dotted quads, ISBNs, decimals in a row: digit runs that are not phones."""
    if _DATE_OR_TIME.search(main) or _DOTTED_QUAD.match(main):
        return True
    if sum(1 for token in main.split(" ") if token.count(".") == 1) >= 2:  # "0.000 0.125": decimals in a table row
        return True
    if main.count("-") >= 3 and not main.startswith("+") and isbn_ok(main):  # "+47-21-23-86-73" is RFC 3966
        return True
    if main.count(".") == 1 and not any(c in main for c in " -/()"):  # "0.315994": a decimal
        return True
    if _ZIP_PLUS_4.match(main):
        return True
    digits = "".join(c for c in main if c.isdigit())
    if len(set(digits)) <= 2 or digits in _COUNTING:  # "010 011 100 101", "0123456789": sequences
        return True
    groups = re.split(r"[ .\-/()]+", main.replace("(0)", " ").strip("+() "))
    if main.lstrip("(").startswith("+"):
        groups = groups[1:]  # a country code such as +1 or +7 is one digit
    if len(groups) >= 4 and len({len(g) for g in groups}) == 1 and len(groups[0]) >= 3:
        return True  # "012 013 023 123": a row of equal numbers; no plan writes phones that way
    singles = sum(1 for g in groups if len(g) == 1)  # "0 1 2 3 4 5": a sequence, not a number,
    return singles >= 3 or (singles == 2 and len(groups) <= 4)  # but "8 (71234) 5 35 22" is Kazakh


def trim_brackets(run: str) -> tuple[int, int]:
    """The [start, end) of a run without the parentheses that wrap it or are left open at its
    edges: '(+34 842 30 79 80)' and '(+34 842 30 79 80' -> '+34 842 30 79 80'; an area code in
    parentheses, '(030) 1234567' or '+44 (0) 20 7946 0958', stays."""
    lo, hi = 0, len(run)
    while lo < hi:
        opened, pairs, unopened = [], {}, []
        for i in range(lo, hi):
            if run[i] == "(":
                opened.append(i)
            elif run[i] == ")":
                if opened:
                    pairs[opened.pop()] = i
                else:
                    unopened.append(i)
        if opened and opened[0] == lo:  # opened at the start, never closed
            lo += 1
        elif unopened and unopened[-1] == hi - 1:  # closed at the end, never opened
            hi -= 1
        elif pairs.get(lo) == hi - 1:  # one pair around all of it
            lo, hi = lo + 1, hi - 1
        else:
            return lo, hi
    return lo, hi


def digit_groups(text: str) -> tuple[int, ...]:
    return tuple(len(g) for g in re.findall(r"[0-9]+", text))


def national_lengths(region: str) -> frozenset[int]:
    meta = phonenumbers.PhoneMetadata.metadata_for_region(region)
    lengths = set(meta.general_desc.possible_length) | set(meta.general_desc.possible_length_local_only or ())
    prefix = len(meta.national_prefix or "")
    return frozenset(lengths | {n + prefix for n in lengths})


class PhoneMatcher:
    """Validates digit runs as phone numbers with the phonenumbers library.

    `validation="possible"`: the length fits the country's numbering plan (unassigned area
    codes pass, as they do in most real and synthetic text); `"valid"`: the number is in an
    assigned range. National numbers (no +/00) must also look like one: a trunk 0, an area
    code in parentheses, the North American 3-3-4 shape, or the digit grouping the region's
    own national format prints (Spain's 912 34 56 78, Norway's 22 12 34 56, which have no
    trunk prefix), which keeps IDs, timestamps and table rows out. A run printed like a
    payment card is never a phone, whether or not its Luhn check passes.
    """

    def __init__(self, regions: list[str], validation: str):
        self.regions = [r.upper() for r in regions]
        self.nanp_regions = [r for r in self.regions if r in NANP_REGIONS]
        self.other_regions = [r for r in self.regions if r not in NANP_REGIONS]
        # national digit counts per region (with and without the trunk prefix), so a run of a
        # length no plan uses is not parsed: parsing is the slow part of phone detection
        self.national_lengths = {r: national_lengths(r) for r in self.regions if r not in NANP_REGIONS}
        self.check = phonenumbers.is_valid_number if validation == "valid" else self._possible

    @staticmethod
    def _possible(number: phonenumbers.PhoneNumber) -> bool:
        return phonenumbers.is_possible_number_with_reason(number) == phonenumbers.ValidationResult.IS_POSSIBLE

    def _parse(self, text: str, region: str | None) -> phonenumbers.PhoneNumber | None:
        try:
            number = phonenumbers.parse(text, region)
        except phonenumbers.NumberParseException:
            return None
        return number if self.check(number) else None

    def _accept(self, text: str, region: str | None) -> str | None:
        number = self._parse(text, region)
        return f"+{number.country_code}{number.national_number}" if number else None

    def _national_grouping(self, main: str) -> str | None:
        """The number if one configured region prints its national numbers grouped exactly so."""
        groups = digit_groups(main)
        if len(groups) < 2:
            return None  # an unseparated run of digits is an ID as often as a phone
        count = sum(groups)
        for region in (r for r, lengths in self.national_lengths.items() if count in lengths):
            number = self._parse(main, region)
            if number and digit_groups(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)) == groups:
                return f"+{number.country_code}{number.national_number}"
        return None

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
        if not 7 <= len(digits) <= 15 or _looks_like_other_number(main) or card_like(main):
            return None
        if international:
            return self._accept("+" + main.replace("00", "", 1) if stripped.startswith("00") else main, None)
        regions = list(self.nanp_regions) if _NANP_SHAPE.match(main) else []
        if (main.startswith("(") or main.startswith("0")) and len(digits) >= 8:
            regions += [r for r in self.other_regions + self.nanp_regions if r not in regions]
        for region in regions:
            found = self._accept(main, region)
            if found:
                return found
        return self._national_grouping(main)

    def find(self, text: str) -> Iterable[PiiSpan]:
        for m in _PHONE_RUN.finditer(text):
            if not _ISBN_BEFORE.search(text, max(0, m.start() - 12), m.start()):
                lo, hi = trim_brackets(m.group())
                yield from self._spans(m.group()[lo:hi], m.start() + lo)

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
        """Two numbers separated by one space: try the longest word windows from the left.

        Words that print a card number (Luhn-valid or not) are skipped whole: the tail of a
        card number is no phone."""
        words = [(m.start(), m.end()) for m in re.finditer(r"\S+", run)]
        if len(words) > self.MAX_SPLIT_WORDS:
            return
        card = [False] * len(words)
        for i in range(len(words)):
            for k in (3, 4, 5):
                if i + k <= len(words) and card_like(run[words[i][0]:words[i + k - 1][1]]):
                    card[i:i + k] = [True] * k
        i = 0
        while i < len(words):
            for j in range(min(len(words), i + self.MAX_PHONE_WORDS), i, -1):
                if any(card[i:j]):
                    continue
                start, end = words[i][0], words[j - 1][1]
                found = self.canonical(run[start:end])
                if found:
                    yield PiiSpan(offset + start, offset + end, "PHONE", "phone", found)
                    i = j
                    break
            else:
                i += 1
