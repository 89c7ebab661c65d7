"""The heuristic quality rules: small `(keep, reason)` steps with their thresholds in config.

Rule sets, in the order a document meets them (the order of FineWeb's pipeline):

- Gopher repetition (Rae et al. 2021, table A1): duplicate paragraphs and lines (by count
  and by characters), the most frequent 2/3/4-gram's share of characters, and the share of
  characters inside repeated 5..10-grams.
- Gopher quality: word count, mean word length, '#' and ellipsis per word, bullet and
  ellipsis lines, words with a letter, English stop words.
- C4 (Raffel et al. 2020): over the lines that end in terminal punctuation and have enough
  words (skipping lines about javascript or cookie/terms policies), drop the page on
  "lorem ipsum" or a curly bracket, or when fewer than `min_sentences` sentences remain.
  The text itself is left whole: the rules decide, they do not rewrite.
- FineWeb (Penedo et al. 2024): share of lines ending in punctuation, share of short lines,
  characters in duplicated lines, newlines per word.

Every check can be switched off by setting its threshold to null. A document is dropped by
the first check it fails; `judge(text, steps)` returns that reason or None.

Try it: ``python -m lmfoundry.tasks.filter.rules < page.txt`` prints whether the default rules keep the page, and why not.
"""
from __future__ import annotations

import json
import re
import sys
import unicodedata
from functools import cached_property, lru_cache, partial
from itertools import filterfalse
from typing import Callable

import numpy as np

from lmfoundry.infra.config import HeuristicFilterConfig
from lmfoundry.tasks.filter.words import is_symbol_char, split_words

Verdict = tuple[bool, str]
Step = Callable[["TextView"], Verdict]
KEEP: Verdict = (True, "")

GopherQuality = HeuristicFilterConfig.GopherQuality
GopherRepetition = HeuristicFilterConfig.GopherRepetition
C4 = HeuristicFilterConfig.C4
FineWeb = HeuristicFilterConfig.FineWeb

# Characters that end a sentence (Latin, CJK, Arabic, Indic, Ethiopic, Armenian, Myanmar, Khmer).
TERMINAL_PUNCTUATION = frozenset(".!?‼‽⁇⁈⁉。！？．｡﹒﹖﹗؟۔।॥።፧։။។៕")
C4_LINE_ENDINGS = (".", "?", "!", '"', "'")
C4_POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
C4_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
BULLETS = ("•", "-", "‣", "◦", "●", "▪", "⁃")
ELLIPSES = ("...", "…")
_PARAGRAPH_BREAK = re.compile(r"\n{2,}")
_LINE_BREAKS = re.compile(r"\n+")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier for n-gram hashes


@lru_cache(maxsize=1 << 16)
def is_symbol_word(word: str) -> bool:
    """A token made only of punctuation, symbols or control characters ("(", "...", "->")."""
    return not word.isalnum() and all(is_symbol_char(ch) for ch in word)


@lru_cache(maxsize=1 << 16)
def has_letter(word: str) -> bool:
    return any(ch.isalpha() for ch in word)


def duplicates(items: list[str]) -> tuple[int, int]:
    """(how many items repeat an earlier one, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


class NgramGroups:
    """Equal n-grams of a text grouped: where each first occurs, how often, and for every
    position the previous position holding the same n-gram (-1 for a first occurrence)."""

    def __init__(self, keys: np.ndarray):
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        starts_group = np.ones(len(keys), dtype=bool)
        starts_group[1:] = ordered[1:] != ordered[:-1]
        starts = np.flatnonzero(starts_group)
        self.first_position = order[starts]
        self.count = np.diff(np.append(starts, len(keys)))
        repeats = np.flatnonzero(~starts_group)
        self.previous = np.full(len(keys), -1, dtype=np.int64)
        self.previous[order[repeats]] = order[repeats - 1]
        self.repeat_positions = np.sort(order[repeats])


class TextView:
    """One document's text with the measurements the rules share, each computed once."""

    def __init__(self, text: str):
        self.text = text
        self._groups: dict[int, NgramGroups] = {}

    @cached_property
    def words(self) -> list[str]:
        return split_words(self.text)

    @cached_property
    def plain_words(self) -> list[str]:
        return list(filterfalse(is_symbol_word, self.words))

    @cached_property
    def lines(self) -> list[str]:
        return self.text.splitlines()

    @cached_property
    def word_ids(self) -> np.ndarray:
        index = {word: i for i, word in enumerate(dict.fromkeys(self.words))}
        return np.fromiter(map(index.__getitem__, self.words), dtype=np.uint64, count=len(self.words))

    @cached_property
    def word_lengths(self) -> np.ndarray:
        return np.fromiter(map(len, self.words), dtype=np.int64, count=len(self.words))

    def ngram_keys(self, n: int) -> np.ndarray:
        """A 64-bit hash per n-gram start (equal n-grams, equal keys)."""
        ids = self.word_ids
        keys = ids[: len(ids) - n + 1].copy()
        for offset in range(1, n):
            keys = keys * _MIX + ids[offset : len(ids) - n + 1 + offset] + np.uint64(1)
        return keys

    def ngram_chars(self, n: int) -> np.ndarray:
        """Characters of the words in each n-gram (no separators)."""
        total = np.concatenate(([0], np.cumsum(self.word_lengths)))
        return total[n:] - total[: len(total) - n]

    def ngram_groups(self, n: int) -> NgramGroups:
        if n not in self._groups:
            self._groups[n] = NgramGroups(self.ngram_keys(n))
        return self._groups[n]


# --------------------------------------------------------------------------- Gopher repetition


def _duplicate_parts(parts: list[str], text: str, max_frac: float | None, max_char_frac: float | None, reasons: tuple[str, str]) -> Verdict:
    """Gopher's duplicate-part check, shared by paragraphs and lines: by count, then by characters."""
    count, chars = duplicates(parts)
    if max_frac is not None and count / len(parts) > max_frac:
        return False, reasons[0]
    if max_char_frac is not None and chars / len(text) > max_char_frac:
        return False, reasons[1]
    return KEEP


def gopher_duplicate_paragraphs(doc: TextView, cfg: GopherRepetition) -> Verdict:
    paragraphs = _PARAGRAPH_BREAK.split(doc.text.strip())
    return _duplicate_parts(paragraphs, doc.text, cfg.max_dup_para_frac, cfg.max_dup_para_char_frac, ("gopher_dup_paragraphs", "gopher_dup_paragraph_chars"))


def gopher_duplicate_lines(doc: TextView, cfg: GopherRepetition) -> Verdict:
    lines = _LINE_BREAKS.split(doc.text)
    return _duplicate_parts(lines, doc.text, cfg.max_dup_line_frac, cfg.max_dup_line_char_frac, ("gopher_dup_lines", "gopher_dup_line_chars"))


def top_ngram_chars(doc: TextView, n: int) -> int:
    """Characters (with single spaces between words) covered by the most frequent n-gram;
    on a tie, the one that occurs first."""
    if len(doc.words) < n:
        return 0
    groups = doc.ngram_groups(n)
    best = groups.count.max()
    position = int(groups.first_position[groups.count == best].min())
    return (int(doc.ngram_chars(n)[position]) + n - 1) * int(best)


def gopher_top_ngrams(doc: TextView, cfg: GopherRepetition) -> Verdict:
    for n, limit in sorted(cfg.max_top_ngram_char_frac.items()):
        if top_ngram_chars(doc, n) / len(doc.text) > limit:
            return False, f"gopher_top_{n}gram"
    return KEEP


def duplicated_ngram_chars(doc: TextView, n: int, stop_above: float = float("inf")) -> int:
    """Characters in n-grams that repeat an earlier n-gram, reading left to right and jumping
    past each repeat (the n-1 n-grams overlapping it are neither counted nor remembered).
    Stops early once the count passes `stop_above`.

    Only positions whose n-gram occurred before can be repeats, so the walk visits just
    those: a position is a repeat when an earlier occurrence of its n-gram was not jumped over.
    """
    if len(doc.words) < n:
        return 0
    groups = doc.ngram_groups(n)
    if len(groups.repeat_positions) == 0:
        return 0
    previous = groups.previous.tolist()
    chars = doc.ngram_chars(n)
    jumped: set[int] = set()
    total, resume_at = 0, 0
    for position in groups.repeat_positions.tolist():
        if position < resume_at:
            continue
        earlier = previous[position]
        while earlier >= 0 and earlier in jumped:
            earlier = previous[earlier]
        if earlier < 0:
            continue  # every earlier occurrence was jumped over: this one counts as new
        total += int(chars[position])
        if total > stop_above:
            break
        jumped.update(range(position + 1, position + n))
        resume_at = position + n
    return total


def gopher_duplicated_ngrams(doc: TextView, cfg: GopherRepetition) -> Verdict:
    for n, limit in sorted(cfg.max_dup_ngram_char_frac.items()):
        if duplicated_ngram_chars(doc, n, stop_above=limit * len(doc.text)) / len(doc.text) > limit:
            return False, f"gopher_dup_{n}gram"
    return KEEP


# --------------------------------------------------------------------------- Gopher quality


def gopher_word_count(doc: TextView, cfg: GopherQuality) -> Verdict:
    n = len(doc.plain_words)
    if cfg.min_words is not None and n < cfg.min_words:
        return False, "gopher_too_few_words"
    if cfg.max_words is not None and n > cfg.max_words:
        return False, "gopher_too_many_words"
    return KEEP


def gopher_mean_word_length(doc: TextView, cfg: GopherQuality) -> Verdict:
    if not doc.plain_words:
        return False, "gopher_no_words"
    mean = sum(map(len, doc.plain_words)) / len(doc.plain_words)
    if cfg.min_mean_word_length is not None and mean < cfg.min_mean_word_length:
        return False, "gopher_short_words"
    if cfg.max_mean_word_length is not None and mean > cfg.max_mean_word_length:
        return False, "gopher_long_words"
    return KEEP


def gopher_symbol_ratio(doc: TextView, cfg: GopherQuality) -> Verdict:
    if cfg.max_symbol_word_ratio is None:
        return KEEP
    n = max(len(doc.words), 1)
    if doc.text.count("#") / n > cfg.max_symbol_word_ratio:
        return False, "gopher_hash_ratio"
    if sum(doc.text.count(e) for e in ELLIPSES) / n > cfg.max_symbol_word_ratio:
        return False, "gopher_ellipsis_ratio"
    return KEEP


def gopher_bullet_and_ellipsis_lines(doc: TextView, cfg: GopherQuality) -> Verdict:
    lines = doc.lines or [""]
    if cfg.max_bullet_lines_ratio is not None:
        bullets = sum(line.lstrip().startswith(BULLETS) for line in lines)
        if bullets / len(lines) > cfg.max_bullet_lines_ratio:
            return False, "gopher_bullet_lines"
    if cfg.max_ellipsis_lines_ratio is not None:
        trailing = sum(line.rstrip().endswith(ELLIPSES) for line in lines)
        if trailing / len(lines) > cfg.max_ellipsis_lines_ratio:
            return False, "gopher_ellipsis_lines"
    return KEEP


def gopher_alpha_words(doc: TextView, cfg: GopherQuality) -> Verdict:
    """Share of words with a letter. The Gopher paper's words are whitespace-separated, so
    "done." is one word with a letter; datatrove counts the "." as a word without one, which
    costs punctuation-rich prose (documentation, dialogue) its pages (alpha_words_counting)."""
    if cfg.min_alpha_words_ratio is None:
        return KEEP
    words = doc.words if cfg.alpha_words_counting == "datatrove" else doc.text.split()
    with_letter = sum(map(has_letter, words))
    if with_letter / max(len(words), 1) < cfg.min_alpha_words_ratio:
        return False, "gopher_alpha_words"
    return KEEP


def gopher_stop_words(doc: TextView, cfg: GopherQuality) -> Verdict:
    if cfg.min_stop_words is None:
        return KEEP
    if len(set(cfg.stop_words).intersection(doc.words)) < cfg.min_stop_words:
        return False, "gopher_stop_words"
    return KEEP


# --------------------------------------------------------------------------- C4


def _is_punctuation(word: str) -> bool:
    return all(unicodedata.category(ch).startswith("P") for ch in word)


def count_sentences(line: str) -> int:
    """Sentences in a line: a new one starts at the first word after terminal punctuation."""
    sentences, after_terminal = 1, False
    for word in split_words(line):
        if word in TERMINAL_PUNCTUATION:
            after_terminal = True
        elif after_terminal and not _is_punctuation(word):
            sentences += 1
            after_terminal = False
    return sentences


def c4_lines(doc: TextView, cfg: C4) -> Verdict:
    """C4's line rules; counts sentences only while fewer than `min_sentences` are proven."""
    kept: list[str] = []
    for raw in doc.lines:
        line = raw.strip()
        words = line.split()
        if cfg.max_word_length is not None and any(len(w) > cfg.max_word_length for w in words):
            continue
        if cfg.remove_citations:
            line = C4_CITATION.sub("", line)
        if cfg.require_terminal_punctuation and (not line.endswith(C4_LINE_ENDINGS) or line.endswith("...")):
            continue
        if len(words) < cfg.min_words_per_line:
            continue
        lowered = line.lower()
        if cfg.drop_lorem_ipsum and "lorem ipsum" in lowered:
            return False, "c4_lorem_ipsum"
        if cfg.skip_javascript_lines and "javascript" in lowered:
            continue
        if cfg.drop_curly_bracket and "{" in line:
            return False, "c4_curly_bracket"
        if cfg.skip_policy_lines and any(p in lowered for p in C4_POLICY_PHRASES):
            continue
        kept.append(line)
    # each kept line holds at least one sentence, so counting is only needed for short pages
    if cfg.min_sentences is not None and len(kept) < cfg.min_sentences:
        if sum(count_sentences(line) for line in kept) < cfg.min_sentences:
            return False, "c4_too_few_sentences"
    return KEEP


# --------------------------------------------------------------------------- FineWeb


def fineweb_lines(doc: TextView, cfg: FineWeb) -> Verdict:
    lines = [line for line in doc.text.split("\n") if line.strip()]
    if not lines:
        return False, "empty"
    if cfg.min_line_punct_ratio is not None:
        ending = sum(1 for line in lines if line and line[-1] in TERMINAL_PUNCTUATION)
        if ending / len(lines) < cfg.min_line_punct_ratio:
            return False, "fineweb_line_punct"
    if cfg.max_short_line_ratio is not None:
        short = sum(1 for line in lines if len(line) <= cfg.short_line_chars)
        if short / len(lines) > cfg.max_short_line_ratio:
            return False, "fineweb_short_lines"
    if cfg.max_dup_line_char_ratio is not None:
        chars = max(len(doc.text) - doc.text.count("\n"), 1)
        if duplicates(lines)[1] / chars > cfg.max_dup_line_char_ratio:
            return False, "fineweb_dup_line_chars"
    if cfg.max_newline_word_ratio is not None:
        if doc.text.count("\n") / max(len(doc.words), 1) > cfg.max_newline_word_ratio:
            return False, "fineweb_list_like"
    return KEEP


# --------------------------------------------------------------------------- assembling


def not_empty(doc: TextView) -> Verdict:
    return (True, "") if doc.text.strip() else (False, "empty")


def build_steps(cfg: HeuristicFilterConfig) -> list[Step]:
    """The enabled checks in order, each bound to its thresholds."""
    steps: list[Step] = [not_empty]
    sets = [
        (cfg.gopher_repetition, [gopher_duplicate_paragraphs, gopher_duplicate_lines, gopher_top_ngrams, gopher_duplicated_ngrams]),
        (
            cfg.gopher_quality,
            [gopher_word_count, gopher_mean_word_length, gopher_symbol_ratio, gopher_bullet_and_ellipsis_lines, gopher_alpha_words, gopher_stop_words],
        ),
        (cfg.c4, [c4_lines]),
        (cfg.fineweb, [fineweb_lines]),
    ]
    for section, checks in sets:
        if section.enabled:
            steps.extend(partial(check, cfg=section) for check in checks)
    return steps


def judge(text: str, steps: list[Step]) -> str | None:
    """The reason the first failing step gives, or None when the document is kept."""
    doc = TextView(text)
    for step in steps:
        keep, reason = step(doc)
        if not keep:
            return reason
    return None


if __name__ == "__main__":
    verdict = judge(sys.stdin.read(), build_steps(HeuristicFilterConfig()))
    print(json.dumps({"keep": verdict is None, "reason": verdict}))
