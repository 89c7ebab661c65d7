"""A fast English word splitter for the quality heuristics.

The published Gopher and C4 rules count "words" the way a standard English tokenizer does:
whitespace-separated chunks with leading and trailing punctuation split off ("(see" ->
"(", "see"; "done." -> "done", "."), contractions split ("don't" -> "do", "n't"), a few
joints inside a chunk split ("well-known" -> "well", "-", "known"), while URLs, dotted
names ("os.path") and abbreviations ("e.g.") stay whole. This module does that with a few
regular expressions and a cache of already-split chunks (web text repeats the same chunks
constantly), so thresholds tuned on the published pipelines keep their meaning without the
cost of a full NLP tokenizer. `bench/quality.py` measures how often decisions made with it
agree with datatrove's (which tokenizes with spaCy).

See how a text is split: ``python -m lmfoundry.tasks.filter.words "Don't split os.path, e.g. here."``
"""
from __future__ import annotations

import re
import sys
import unicodedata
from functools import lru_cache
from itertools import chain

_LOWER = "a-zß-öø-ÿ"
_QUOTES = "'\"”“`‘´’‚„»«「」『』"
_BRACKETS = r"()\[\]{}<>（）〔〕【】《》〈〉⟦⟧"
_PUNCT = r"…,:;!?¿¡_#*&。？！，、；：～·"
_CURRENCY = "$£€¥฿₽₹₩₪₫₴₺₿"

# Split off the start of a chunk, repeatedly.
_PREFIX = re.compile(rf"\.\.+|US\$|\+(?![0-9])|[§%=—–{_PUNCT}{_BRACKETS}{_QUOTES}{_CURRENCY}]")
# Split off the end of a chunk, repeatedly. A full stop is split only after a lowercase
# letter, a digit, punctuation, a bracket or a quote, or after two capitals ("NASA."), so
# "U.S." and "Fig." stay whole.
_SUFFIX = re.compile(
    rf"(?:\.\.+|['’][sS]|[—–{_PUNCT}{_BRACKETS}{_QUOTES}]"
    rf"|(?<=[0-9])(?:\+|[{_CURRENCY}]|%|km|cm|mm|m|kg|mg|g|mb|MB|kb|KB|gb|GB|tb|TB|ft|in|lb|oz|mph|T|G|M|K)"
    rf"|(?<=[0-9{_LOWER}%²\-+{_PUNCT}{_BRACKETS}{_QUOTES}])\.|(?<=[A-Z][A-Z])\.)$"
)
# Joints inside what is left that become tokens of their own.
_INFIX = re.compile(
    rf"\.\.+|…|(?<=[0-9])[+\-*^](?=[0-9-])|(?<=[{_LOWER}{_QUOTES}])\.(?=[A-Z{_QUOTES}])"
    r"|(?<=[^\W\d_]),(?=[^\W\d_])|(?<=[^\W_])(?:---|--|-|–|—|~)(?=[^\W\d_])|(?<=[^\W_])[:<>=/](?=[^\W\d_])"
)
# Web addresses, e-mail addresses and dotted names ending in a lowercase label ("os.path").
_ADDRESS = re.compile(
    rf"^(?:[\w+\-.]{{2,}}://)?(?:\S+@)?(?:[^\W_](?:[\w\-]{{0,62}}[^\W_])?\.)+[{_LOWER}]{{2,63}}(?::\d{{2,5}})?(?:[/?#]\S*)?$"
)
_NEGATION = re.compile(r"^([^\W\d_]+)(n['’]t)$")
_CLITIC = re.compile(r"^(I|[Yy]ou|[Hh]e|[Ss]he|[Ii]t|[Ww]e|[Tt]hey|[Tt]hat|[Tt]here|[Ww]ho|[Ww]hat)(['’](?:re|ve|ll|m|d))$")
_LETTER_DOT = re.compile(r"^[a-zäöü]\.$")
_EMOTICONS = frozenset(
    "'' ’’ ): (: :) :( [: :] =) (= ;) (; :/ =/ :| :> :3 :0 :1 :* :x :X :o :O :p :P =( =[ ]= =] [= 8) :)) :(( <3 </3 "
    ":-) :-( :-/ :-| :-] ;-) (-: )-: :') :’)".split()
)
# Neighbours rejoined after splitting: emoticons, clitics after a quote ("'s'"), and single
# letters with a full stop ("a." in "a.Name"), as standard English tokenizers do.
_REJOINED = _EMOTICONS | {"'s", "'S", "'d", "’s", "‘s"} | {f"{letter}." for letter in "abcdefghijklmnopqrstuvwxyzäöü"}


def _fixed_splits() -> dict[str, tuple[str, ...]]:
    """Abbreviations kept whole and contractions written without an apostrophe, split like standard tokenizers do."""
    table: dict[str, tuple[str, ...]] = {}
    for word in "e.g. E.g. i.e. I.e. vs. v.s. Mr. Mrs. Ms. Dr. Prof. Jr. St. Inc. Ltd. Co. co. Corp. a.m. p.m. Ph.D. and/or".split():
        table[word] = (word,)
    for month in "Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec Gen Gov Rep Rev Sen Mt Bros".split():
        table[month + "."] = (month + ".",)
    pairs = [("can", "not"), ("gon", "na"), ("got", "ta"), ("ca", "nt"), ("wo", "nt"), ("sha", "nt")]
    pairs += [(verb, "nt") for verb in "do does did could should would must need might may ought is are was were have has had ai dare".split()]
    pairs += [("i", end) for end in ("m", "d", "ve")]
    pairs += [(who, end) for who in ("you", "they") for end in ("re", "ve", "ll", "d")]
    pairs += [("we", "ve"), ("we", "d"), ("he", "d"), ("he", "s"), ("she", "s"), ("it", "ll"), ("it", "d")]
    pairs += [(who, "s") for who in ("what", "that", "there", "who")]
    for stem, end in pairs:
        table[stem + end] = (stem, end)
        table[stem.capitalize() + end] = (stem.capitalize() if stem != "i" else "I", end)
    return table


_FIXED = _fixed_splits()


def _fixed_split(chunk: str) -> tuple[str, ...] | None:
    """Chunks that are never cut further (abbreviations, emoticons, "a.") or always cut the same way ("don't")."""
    fixed = _FIXED.get(chunk)
    if fixed:
        return fixed
    if chunk in _EMOTICONS or _LETTER_DOT.match(chunk):
        return (chunk,)
    match = _NEGATION.match(chunk) or _CLITIC.match(chunk)
    return match.groups() if match else None


def _rejoin(tokens: list[str]) -> list[str]:
    """Rejoin neighbours that form an emoticon or clitic ("):" in "f():", "'s" in "'s',")."""
    joined: list[str] = []
    for token in tokens:
        joined.append(token)
        for width in (3, 2):
            if len(joined) >= width and "".join(joined[-width:]) in _REJOINED:
                joined[-width:] = ["".join(joined[-width:])]
                break
    return joined


def _split_joints(core: str) -> list[str]:
    fixed = _fixed_split(core)
    if fixed:
        return list(fixed)
    if _ADDRESS.match(core):
        return [core]
    parts, start = [], 0
    for joint in _INFIX.finditer(core):
        if joint.start() > start:
            parts.append(core[start : joint.start()])
        parts.append(joint.group())
        start = joint.end()
    if start < len(core):
        parts.append(core[start:])
    return parts


def _is_icon(ch: str) -> bool:
    return unicodedata.category(ch) == "So"


@lru_cache(maxsize=1 << 18)
def split_chunk(chunk: str) -> tuple[str, ...]:
    """One whitespace-free chunk -> its tokens."""
    head: list[str] = []
    tail: list[str] = []
    core = chunk
    while core and not _fixed_split(core):
        prefix = _PREFIX.match(core)
        if prefix or _is_icon(core[0]):
            end = prefix.end() if prefix else 1
            head.append(core[:end])
            core = core[end:]
            continue
        suffix = _SUFFIX.search(core)
        if suffix or _is_icon(core[-1]):
            start = suffix.start() if suffix else len(core) - 1
            if start > 0:
                tail.append(core[start:])
                core = core[:start]
                continue
        break
    tokens = head + (_split_joints(core) if core else []) + tail[::-1]
    return tuple(_rejoin(tokens) if len(tokens) > 1 else tokens)


_SPLITS: dict[str, tuple[str, ...]] = {}  # chunk -> tokens, shared by all documents of a process
_SPLITS_LIMIT = 1 << 20


def _split_any(chunk: str) -> tuple[str, ...]:
    if chunk.isalnum() and chunk not in _FIXED and not chunk[0].isdigit():
        return (chunk,)
    return split_chunk(chunk)


def split_words(text: str) -> list[str]:
    """Words and punctuation marks of a text, in order."""
    chunks = text.split()
    if len(_SPLITS) > _SPLITS_LIMIT:
        _SPLITS.clear()
    # a per-text view, so another thread clearing the shared cache cannot lose an entry
    mine = {}
    for chunk in set(chunks):
        tokens = _SPLITS.get(chunk)
        if tokens is None:
            tokens = _SPLITS[chunk] = _split_any(chunk)
        mine[chunk] = tokens
    return list(chain.from_iterable(map(mine.__getitem__, chunks)))


def is_symbol_char(ch: str) -> bool:
    """Punctuation, symbols and control characters (Unicode categories P*, S*, C*)."""
    return unicodedata.category(ch)[0] in "PSC"


if __name__ == "__main__":
    print(split_words(" ".join(sys.argv[1:]) or sys.stdin.read()))
