"""What the two chat data stages share: the tokenizer input, rows from sources, the bad-row
policy, the stable validation split, Arrow writing and the index header."""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
from tokenizers import Tokenizer

from lmfoundry.infra.config_posttrain import PreferenceDataConfig, SftDataConfig
from lmfoundry.infra.store import StageRef, Store
from lmfoundry.model.chat import CHAT_SPECIALS, content_pieces
from lmfoundry.tasks.chat import demo
from lmfoundry.tasks.chat.readers import BadRow, ChatDataError, ChatFile, fingerprint, list_files, read_rows
from lmfoundry.tasks.tokens.train_tokenizer import STAGE_NAME as TOKENIZER_STAGE
from lmfoundry.tasks.tokens.train_tokenizer import load_tokenizer

ChatDataConfig = SftDataConfig | PreferenceDataConfig
# the roles a chat rendering needs besides eos and pad (which the data formats name)
REQUIRED_ROLES = (*CHAT_SPECIALS, "eos", "pad")
ROWS_PER_FILE = 8192  # rows per Arrow file; one split's files are numbered part-00000, part-00001, ...
BUILTIN_LABEL = "chatterbot"


# ---------------------------------------------------------------- tokenizer


@dataclass
class ChatTokenizer:
    """The train_tokenizer stage's tokenizer, encoding content by the chat template's rule."""

    tokenizer: Tokenizer
    special: dict[str, int]
    ref: StageRef
    special_texts: tuple[str, ...] = ()

    @classmethod
    def from_inputs(cls, store: Store, inputs: list[StageRef], section: str) -> "ChatTokenizer":
        refs = [r for r in inputs if r.stage == TOKENIZER_STAGE]
        if len(refs) != 1:
            raise ChatDataError(f"{section} needs exactly one '{TOKENIZER_STAGE}' input, got {[r.stage for r in inputs]}")
        tokenizer, special = load_tokenizer(store, refs[0])
        missing = [role for role in REQUIRED_ROLES if role not in special]
        if missing:
            raise ChatDataError(
                f"the tokenizer of {refs[0].stage}/{refs[0].version} has no special tokens for the roles {missing}; "
                "add them to tokenizer.special_tokens (e.g. end: '<|end|>')"
            )
        # content is text: a literal "<|user|>" in a message must not become the special token
        tokenizer.encode_special_tokens = True
        texts = tuple(t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special)
        return cls(tokenizer, special, refs[0], texts)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_all(self, contents: Iterable[str], batch: int = 4096) -> dict[str, list[int]]:
        """content -> ids for every distinct content (pieces encoded in batches, see model/chat.py)."""
        pieces_of = {c: content_pieces(c, self.special_texts) for c in dict.fromkeys(contents)}
        unique = list(dict.fromkeys(p for pieces in pieces_of.values() for p in pieces))
        ids: dict[str, list[int]] = {}
        for start in range(0, len(unique), batch):
            chunk = unique[start : start + batch]
            for piece, enc in zip(chunk, self.tokenizer.encode_batch_fast(chunk, add_special_tokens=False)):
                ids[piece] = enc.ids
        return {c: [i for p in pieces for i in ids[p]] for c, pieces in pieces_of.items()}


# ---------------------------------------------------------------- rows and the bad-row policy


@dataclass
class BadRows:
    """on_bad_row: error raises naming file:line and the field; skip counts by reason."""

    policy: str
    section: str
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def handle(self, location: str, bad: BadRow) -> None:
        message = f"{location}: {bad.describe()}"
        if self.policy == "error":
            raise ChatDataError(f"{message}; fix the row, or set {self.section}.on_bad_row: skip to count and skip such rows")
        self.counts[bad.reason] += 1
        self.examples.setdefault(bad.reason, message)


@dataclass(frozen=True)
class Row:
    label: str  # the source's name in the stats
    fmt: str  # the configured shape (auto, messages, ...)
    location: str  # file:line, file:row N, or a place in the demo corpus
    obj: Any  # the parsed JSON object, or a BadRow from the reader


def source_files(cfg: ChatDataConfig, section: str) -> list[ChatFile]:
    """The configured input files; an error when the stage has no input at all."""
    if not cfg.sources and cfg.builtin is None:
        raise ChatDataError(
            f"{section} has no input: list your files under {section}.sources, or set {section}.builtin: chatterbot "
            f"for the demo corpus, or {section}.enabled: false"
        )
    return list_files(cfg.sources, section)


def iter_rows(
    cfg: ChatDataConfig, files: list[ChatFile], builtin: Callable[[], Iterator[tuple[str, Any]]], builtin_fmt: str
) -> Iterator[Row]:
    """The files' rows in order, then the demo corpus' rows (builtin: chatterbot)."""
    for f in files:
        for location, obj in read_rows(f):
            yield Row(f.label, f.source.format, location, obj)
    if cfg.builtin == "chatterbot":
        for location, obj in builtin():
            yield Row(BUILTIN_LABEL, builtin_fmt, location, obj)


def counted(rows: Iterable[Row], counts: Counter) -> Iterator[Row]:
    for row in rows:
        counts["rows_in"] += 1
        yield row


def parse_rows(rows: Iterable[Row], parse: Callable[[Any, str], Any], bad: BadRows) -> Iterator[tuple[Row, Any]]:
    """(row, parsed item) for the rows that parse; the others go to the bad-row policy."""
    for row in rows:
        try:
            if isinstance(row.obj, BadRow):
                raise row.obj
            yield row, parse(row.obj, row.fmt)
        except BadRow as exc:
            bad.handle(row.location, exc)


def input_fingerprint(cfg: ChatDataConfig, section: str) -> str:
    """Changes when an input file changes (path, size, mtime/ETag) or the demo corpus' version does."""
    extra = [f"builtin\t{cfg.builtin}\t{demo.corpus_version()}"] if cfg.builtin else []
    return fingerprint(list_files(cfg.sources, section), extra)


# ---------------------------------------------------------------- split


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def split_key(obj: Any, seed: int) -> int:
    """A stable 64-bit hash of an item's content (salted by the seed)."""
    digest = hashlib.blake2b(canonical(obj), digest_size=8, person=b"lmf-chat-val", salt=str(seed).encode()[:16])
    return int.from_bytes(digest.digest(), "big")


def val_flags(keys: list[int], fraction: float) -> list[bool]:
    """Items whose key is below fraction * 2^64 go to val; with >= 20 items and none there, the
    smallest key does. Depends on the contents only, never on their order."""
    flags = [fraction > 0 and k < fraction * 2**64 for k in keys]
    if fraction > 0 and len(keys) >= 20 and not any(flags):
        flags[min(range(len(keys)), key=keys.__getitem__)] = True
    return flags


# ---------------------------------------------------------------- output


def split_file(split: str, index: int) -> str:
    return f"{split}/part-{index:05d}.arrow"


def arrow_bytes(columns: dict[str, pa.Array]) -> bytes:
    """An uncompressed Arrow IPC file (memory-mappable by the loaders)."""
    batch = pa.record_batch(list(columns.values()), names=list(columns))
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def index_header(fmt: str, cfg: ChatDataConfig, tok: ChatTokenizer) -> dict[str, Any]:
    s = tok.special
    return {
        "format": fmt,
        "seq_len": cfg.seq_len,
        "pad_id": s["pad"],
        "eos_id": s["eos"],
        "bos_id": s["bos"],
        "end_id": s["end"],
        "vocab_size": tok.vocab_size,
        "val_fraction": cfg.val_fraction,
        "tokenizer": tok.ref.model_dump(include={"stage", "version", "digest"}),
    }
