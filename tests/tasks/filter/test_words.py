"""The word splitter behind the quality rules, on the cases that move their counts."""
from __future__ import annotations

import pytest

from lmfoundry.tasks.filter.words import split_words

CASES = [
    ("Hello, world!", ["Hello", ",", "world", "!"]),
    ("(see below).", ["(", "see", "below", ")", "."]),
    ("Don't stop, can't stop, cannot stop.", ["Do", "n't", "stop", ",", "ca", "n't", "stop", ",", "can", "not", "stop", "."]),
    ("it's we're I'd", ["it", "'s", "we", "'re", "I", "'d"]),
    ("e.g. U.S. Mr. Smith", ["e.g.", "U.S.", "Mr.", "Smith"]),
    ("os.path.join(a, b)", ["os.path.join(a", ",", "b", ")"]),
    ("see https://example.org/a.", ["see", "https://example.org/a", "."]),
    ("well-known 1-2 -5 +3", ["well", "-", "known", "1", "-", "2", "-5", "+3"]),
    ("$5 and 5% of 10km", ["$", "5", "and", "5", "%", "of", "10", "km"]),
    ("__init__ wait... so…", ["_", "_", "init", "_", "_", "wait", "...", "so", "…"]),
    ("f(): ok :)", ["f", "(", "):", "ok", ":)"]),
    ("end]. NASA.", ["end", "]", ".", "NASA", "."]),
    ("a.Name usr/bin x=1", ["a.", "Name", "usr", "/", "bin", "x=1"]),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_split_words(text, expected):
    assert split_words(text) == expected


def test_repeated_chunks_split_the_same_way():
    text = "word, (word) word. " * 3
    assert split_words(text) == ["word", ",", "(", "word", ")", "word", "."] * 3
