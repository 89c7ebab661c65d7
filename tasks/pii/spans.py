"""What every PII detector returns: a typed span of the text (tasks/pii/detectors.py runs them).

    PiiSpan(start=5, end=20, entity_type="EMAIL", detector="email", canonical="bob@example.org")
"""
from __future__ import annotations

from typing import NamedTuple

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


# Speed note for every pattern in this package: the regex engine skips quickly to a pattern's
# first literal or character class, but not when the pattern opens with a lookbehind. So "not
# glued to a word" is checked one character late, as `[0-9](?<![\w.][\s\S])`: after the first
# digit, the character before it. Patterns for rare characters (`@`, `:`, `://`) start at that
# character and extend backwards.
