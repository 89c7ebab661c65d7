"""The demo chat corpus: English conversations from the ``chatterbot-corpus`` wheel (BSD licence).

The wheel ships ``chatterbot_corpus/data/english/<topic>.yml`` (21 topics, ~2,000
conversations); each file's ``conversations`` is a list of conversations, each a list of turns
that alternate between two speakers. Nothing is downloaded at run time.

- SFT (``sft_data.builtin: chatterbot``): every conversation becomes alternating user/assistant
  messages, the first turn being the user's.
- Preference pairs (``preference_data.builtin: chatterbot``) are a DEMO CONSTRUCTION, not human
  preference data: for every assistant turn, the prompt is the conversation up to that turn,
  ``chosen`` is the real answer, and ``rejected`` is the answer to a question from ANOTHER topic
  file of the same train/val split, picked by a seeded hash of (seed, topic, conversation, turn),
  so the same seed always builds the same pairs, whatever the order. Such pairs teach topicality, not helpfulness or
  harmlessness. For real preference data, list your files instead, e.g.::

      preference_data:
        builtin: null
        sources:
          - paths: ["s3://bucket/ultrafeedback_binarized/train_prefs-*.parquet"]   # prompt/chosen/rejected
          - paths: ["data/hh-rlhf/train.jsonl.gz"]                                # chosen/rejected transcripts

Run ``python -m lmfoundry.tasks.chat.demo`` to print the corpus' counts.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import metadata, resources
from typing import Any, Iterator

import yaml

PACKAGE = "chatterbot_corpus"
DISTRIBUTION = "chatterbot-corpus"


class DemoCorpusError(RuntimeError):
    """The chatterbot-corpus wheel is missing or unreadable."""


@dataclass(frozen=True)
class DemoConversation:
    topic: str  # the file's stem: ai, food, trivia, ...
    index: int  # position in that file
    turns: tuple[str, ...]

    @property
    def location(self) -> str:
        return f"chatterbot-corpus:english/{self.topic}.yml:conversation {self.index}"


def corpus_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "missing"


@functools.lru_cache(maxsize=1)
def conversations() -> tuple[DemoConversation, ...]:
    """Every conversation of at least two turns, by topic file (sorted), in file order."""
    try:
        root = resources.files(PACKAGE) / "data" / "english"
        files = sorted((f for f in root.iterdir() if f.name.endswith(".yml")), key=lambda f: f.name)
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise DemoCorpusError(f"the demo corpus needs the '{DISTRIBUTION}' package: pip install {DISTRIBUTION} ({exc})") from exc
    out = []
    for f in files:
        data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for i, turns in enumerate(data.get("conversations") or []):
            # one entry of the corpus is a bare string (a YAML slip), and a turn could parse as a
            # number: keep real lists of text turns only
            if isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, str) and t.strip() for t in turns):
                out.append(DemoConversation(f.name[: -len(".yml")], i, tuple(turns)))
    return tuple(out)


def as_messages(turns: tuple[str, ...]) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def sft_rows() -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, {"messages": [...]}) per conversation."""
    for conv in conversations():
        yield conv.location, {"messages": as_messages(conv.turns)}


def _pick(seed: int, *parts: Any) -> int:
    digest = hashlib.blake2b("\x00".join(map(str, (seed, *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def preference_rows(seed: int = 0, val_fraction: float = 0.0) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, {"prompt": [...], "chosen": [reply], "rejected": [reply]}) per assistant turn;
    the rejected reply is an answer from another topic (see the module docstring), drawn from
    pairs of the same split: a validation pair's rejected answer is never a training pair's
    chosen one, so held-out accuracy measures question-answer fit, not memorised answers."""
    from lmfoundry.tasks.chat import common  # common reads the demo corpus too: import when used

    convs = conversations()

    def in_val(prompt: list[dict[str, str]]) -> bool:  # the stage's own split rule (common.val_flags)
        return val_fraction > 0 and common.split_key(prompt, seed) < val_fraction * 2**64

    answers = [(in_val(as_messages(c.turns)[:i]), c.topic, t) for c in convs for i, t in enumerate(c.turns) if i % 2 == 1]
    by_split_topic: dict[tuple[bool, str], list[str]] = {}
    for split in (False, True):
        for topic in {c.topic for c in convs}:
            by_split_topic[split, topic] = [text for s, other, text in answers if s == split and other != topic]
    for conv in convs:
        messages = as_messages(conv.turns)
        for i in range(1, len(messages), 2):
            others = by_split_topic[in_val(messages[:i]), conv.topic] or by_split_topic[False, conv.topic]
            chosen = messages[i]["content"]
            start = _pick(seed, conv.topic, conv.index, i) % len(others)
            # the next answer that differs from the chosen text (short answers such as "Yes" recur)
            rejected = next(others[(start + k) % len(others)] for k in range(len(others)) if others[(start + k) % len(others)] != chosen)
            yield f"{conv.location} turn {i}", {
                "prompt": messages[:i],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }


def topic_of_answer() -> dict[str, set[str]]:
    """answer text -> the topics it answers in (for checking the construction)."""
    out: dict[str, set[str]] = {}
    for conv in conversations():
        for i in range(1, len(conv.turns), 2):
            out.setdefault(conv.turns[i], set()).add(conv.topic)
    return out


if __name__ == "__main__":
    convs = conversations()
    print(f"{len(convs)} conversations in {len({c.topic for c in convs})} topics, "
          f"{sum(len(c.turns) // 2 for c in convs)} assistant turns (= demo preference pairs); corpus {corpus_version()}")
