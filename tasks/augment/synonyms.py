"""Synonym replacement from WordNet, offline, deterministic, and careful about what it touches.

    wordnet = load_wordnet("/usr/share/wordnet")        # Debian's wordnet-base, read through nltk
    replacer = SynonymReplacer(wordnet, pos={"noun", "verb"})
    text, changed = replacer.replace("How do I install the program?", rate=0.3, rng=random.Random("seed:item"))

What may change: lowercase words outside protected spans whose WordNet senses are dominated by
one allowed part of speech and that are their own base form. What never changes:
- protected spans (``protected_spans``): code blocks and inline code, URLs, e-mail addresses,
  anything holding a digit, placeholders such as ``<EMAIL>`` / ``<EMAIL_5f1c>`` / ``[REDACTED]``,
  and special tokens such as ``<|user|>``;
- function words (FUNCTION_WORDS: prepositions, conjunctions, pronouns, auxiliaries...);
- capitalised words: names and other entities (no tagger is available offline, so every
  capitalised word is treated as a possible named entity; sentence-initial words lose out too);
- hyphenated or apostrophised words, and inflected forms ("installs", "questions"): replacing
  them would need re-inflection, so they are left alone.

Part of speech without a tagger: WordNet's tagged-corpus counts (``cntlist.rev``) say how often
each word was used as a noun, verb, adjective or adverb. A word is replaced only when one part of
speech holds at least ``dominance`` of its tagged uses, and that part is allowed; "run" (verb
90 %) may change, "answer" (noun 42 %, verb 58 %) does not. The synonym comes from the word's most
frequent sense in that part of speech: its single-word lemmas, preferring those attested in the
tagged corpus.

nltk reads a WordNet directory only with a ``lexnames`` file and inside its allowed roots;
Debian ships neither, so ``load_wordnet`` copies the database files once into a cache directory
beside a ``lexnames`` written from the standard list below.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

# WordNet 3.0's lexicographer files, in index order (the lexnames(5WN) manual page)
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object noun.person "
    "noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition verb.consumption "
    "verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative "
    "verb.weather adj.ppl"
).split()
SYNTACTIC_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
WORDNET_POS = {"noun": ("n",), "verb": ("v",), "adj": ("a", "s"), "adv": ("r",)}
DATABASE_FILES = [f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv")]
DATABASE_FILES += [f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")] + ["cntlist.rev"]

PROTECTED = re.compile(
    r"```.*?(?:```|\Z)"  # fenced code, to its end (or the end of the text when unclosed)
    r"|`[^`\n]*`"  # inline code
    r"|<\|[^|]*\|>"  # special tokens
    r"|<[A-Za-z_][\w-]*>"  # placeholders <EMAIL>, <EMAIL_5f1c0e9a2b>, and tags
    r"|\[[A-Z][A-Z_]*\]"  # [REDACTED]
    r"|\b(?:https?|ftp)://\S+|\bwww\.\S+"  # URLs
    r"|\S+@\S+"  # e-mail addresses and handles
    r"|\S*\d\S*",  # numbers, versions, codes, anything with a digit
    re.S,
)
# closed-class words: WordNet lists some of them as nouns or adverbs ("while" as a period of
# time, "then" as "so"), which would turn grammar into nonsense
FUNCTION_WORDS = frozenset(
    """about above across after again against all almost along already also although always among and another any
    anybody anyone anything are around because been before behind being below beneath beside besides between beyond
    both but can cannot could did does doing done down during each either else enough even ever every everybody
    everyone everything few for from further had has have having her here hers herself him himself his how however
    into its itself just least less like many may might mine more most much must myself near neither never nevertheless
    next nobody none nor not nothing now off once one only onto other others otherwise our ours ourselves out over
    own per perhaps quite rather same several shall she should since some somebody someone something sometimes soon
    still such than that the their theirs them themselves then there therefore these they this those though through
    thus till too toward towards under unless until upon very via was were what whatever when whenever where whereas
    wherever whether which while who whoever whole whom whose why will with within without would yet you your yours
    yourself yourselves""".split()
)
# a candidate word: lowercase letters, not glued to other word characters, hyphens or apostrophes
WORD = re.compile(r"(?<![\w'’-])[a-z]{3,}(?![\w'’-])")


class WordNetMissing(RuntimeError):
    pass


def protected_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in PROTECTED.finditer(text)]


def free_pieces(text: str) -> list[tuple[str, bool]]:
    """The text as consecutive (piece, protected) pairs; joining the pieces gives the text back."""
    pieces, at = [], 0
    for start, end in protected_spans(text):
        if start > at:
            pieces.append((text[at:start], False))
        pieces.append((text[start:end], True))
        at = end
    if at < len(text):
        pieces.append((text[at:], False))
    return pieces


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmfoundry" / "wordnet"


def wordnet_root(source: str | Path) -> Path:
    """A directory nltk accepts: the database files of `source` and a lexnames file (made once)."""
    source = Path(source)
    missing = [name for name in DATABASE_FILES if not (source / name).is_file()]
    if missing:
        raise WordNetMissing(
            f"augment.wordnet_dir {source} lacks the WordNet 3.0 files {', '.join(missing[:4])}: install them "
            "(Debian/Ubuntu: apt-get install wordnet-base) or point augment.wordnet_dir at a WordNet 3.0 dict directory"
        )
    stamp = "-".join(str(int((source / name).stat().st_mtime)) for name in ("data.noun", "index.noun"))
    root = _cache_dir() / f"{hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:10]}-{stamp}"
    if (root / "lexnames").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent))
    for name in DATABASE_FILES:
        shutil.copyfile(source / name, staging / name)
    lines = [f"{i:02d}\t{name}\t{SYNTACTIC_CATEGORY[name.split('.')[0]]}" for i, name in enumerate(LEXNAMES)]
    (staging / "lexnames").write_text("\n".join(lines) + "\n")
    try:
        staging.rename(root)  # atomic: a concurrent worker either wins or finds a whole directory
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return root


@lru_cache(maxsize=2)
def load_wordnet(source: str):
    """nltk's WordNet reader over a local WordNet 3.0 directory (no nltk download)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class EnglishWordNet(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            return None  # the multilingual (OMW) mapping needs nltk_data downloads; English only

    root = str(wordnet_root(source))
    if root not in nltk.data.path:
        nltk.data.path.append(root)  # nltk opens files only under its data path
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The multilingual functions")  # expected: English only
        return EnglishWordNet(root, None)


class SynonymReplacer:
    def __init__(self, wordnet, pos: set[str], dominance: float = 0.9):
        self.wordnet = wordnet
        self.allowed = {tag for name in pos for tag in WORDNET_POS[name]}
        self.dominance = dominance
        self._synonyms = lru_cache(maxsize=200_000)(self._lookup)

    def synonyms(self, word: str) -> tuple[str, ...]:
        return self._synonyms(word)

    def _lookup(self, word: str) -> tuple[str, ...]:
        if word in FUNCTION_WORDS:
            return ()
        uses: dict[str, int] = {}
        for synset in self.wordnet.synsets(word):
            tag = "a" if synset.pos() == "s" else synset.pos()
            uses[tag] = uses.get(tag, 0) + sum(lemma.count() for lemma in synset.lemmas() if lemma.name().lower() == word)
        total = sum(uses.values())
        if not total:
            return ()  # never seen in the tagged corpus: its part of speech is a guess
        tag, count = max(uses.items(), key=lambda kv: kv[1])
        if count < self.dominance * total or not ({tag} | ({"s"} if tag == "a" else set())) & self.allowed:
            return ()
        if self.wordnet.morphy(word, tag) != word:
            return ()  # an inflected form: its synonym would need the same inflection
        sense = self.wordnet.synsets(word, pos=tag)[0]  # WordNet orders senses by frequency
        lemmas = [lemma for lemma in sense.lemmas() if "_" not in lemma.name() and lemma.name().lower() != word and lemma.name().islower()]
        attested = [lemma for lemma in lemmas if lemma.count() > 0]
        return tuple(lemma.name() for lemma in (attested or lemmas))

    def replace(self, text: str, rate: float, rng: random.Random) -> tuple[str, int]:
        """The text with each replaceable word swapped for a synonym with probability `rate`;
        returns (new text, words replaced). The same rng state gives the same result."""
        out, changed = [], 0
        for piece, protected in free_pieces(text):
            if protected:
                out.append(piece)
                continue
            parts, at = [], 0
            for m in WORD.finditer(piece):
                options = self.synonyms(m.group())
                if options and rng.random() < rate:
                    parts += [piece[at : m.start()], rng.choice(options)]
                    at = m.end()
                    changed += 1
            out.append("".join(parts) + piece[at:])
        return "".join(out), changed
