"""Stage `sft_data`: conversations -> templated, tokenized, packed Arrow shards for SFT.

Inputs: the `train_tokenizer` stage; the files of ``sft_data.sources`` (JSONL or Parquet on any
fsspec URL, shapes in tasks/chat/shapes.py) and, with ``sft_data.builtin: chatterbot``, the demo
corpus (tasks/chat/demo.py). Output (the post-training contract; read by model/ loaders):

- ``train/part-NNNNN.arrow``, ``val/part-NNNNN.arrow``: uncompressed Arrow IPC, one row = one
  packed sequence of seq_len + 1 tokens (inputs row[:-1], targets row[1:]), columns
  ``tokens`` fixed_size_list<uint32>, ``loss_mask`` fixed_size_list<uint8> (1 where the token is
  a training target: assistant content and its <|end|>), ``positions`` fixed_size_list<uint16>
  (0 at each conversation's first token; a new segment starts wherever positions == 0; the pad
  tail of a row is its own segment, positions restarting at 0, loss_mask 0).
- ``index.json``: format "sft", seq_len, pad_id, eos_id, bos_id, end_id, vocab_size,
  splits {"train": [{"path", "samples", "conversations", "assistant_tokens"}], "val": [...]},
  conversations, assistant_tokens (totals), packing "reset_positions", val_fraction, tokenizer.

With the `augment` stage enabled (an input then), its variants of train conversations join the
train split (labelled ``augment:<method>`` in conversations_by_source); val is never augmented.

Rules: each conversation is rendered by model/chat.py. Trailing user turns (no reply to learn)
are dropped and counted. A conversation longer than seq_len + 1 tokens is cut at the last
message boundary that ends an assistant turn and fits (too_long_truncated), or dropped when no
assistant turn fits (too_long_dropped): never cut inside a turn. Conversations go to val by a
stable hash of their content (common.val_flags), then are packed whole, first-fit in input
order. Malformed rows stop the stage naming file:line and field, or with on_bad_row: skip are
counted by reason.

Run alone: ``lmf run --until sft_data``.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from lmfoundry.infra.config import ComputeConfig
from lmfoundry.infra.config_posttrain import SftDataConfig
from lmfoundry.infra.store import StageDir, StageRef
from lmfoundry.model.chat import message_ids
from lmfoundry.model.token_format import INDEX_FILE, SPLITS
from lmfoundry.tasks.chat import common, demo
from lmfoundry.tasks.chat.readers import ChatDataError
from lmfoundry.tasks.chat.shapes import PREFERENCE_SHAPES, parse_conversation

CODE_VERSION = "1"
SECTION = "sft_data"
AUGMENT_STAGE, AUGMENTED_FILE = "augment", "augmented.jsonl"  # tasks/augment/conversations.py's output
log = logging.getLogger("lmfoundry.sft_data")


class SftDataStats(BaseModel):
    files: int
    rows_in: int  # rows read, malformed ones included
    skipped: dict[str, int]  # malformed rows by reason (on_bad_row: skip)
    skipped_examples: dict[str, str]  # reason -> the first such row's location and problem
    trailing_turns_dropped: int  # user turns after the last assistant turn
    too_long_truncated: int
    too_long_dropped: int
    augmented_in: int = 0  # variants read from the augment stage (its train conversations' copies)
    augmented_source_not_in_train: int = 0  # variants left out: their source is in val or was dropped
    conversations: dict[str, int]  # per split, as packed
    conversations_by_source: dict[str, int]
    samples: dict[str, int]  # packed rows per split
    tokens: dict[str, int]  # real (non-pad) tokens per split
    assistant_tokens: dict[str, int]  # loss targets per split
    fill: float  # packing efficiency: real tokens / token slots
    assistant_fraction: float  # loss targets / token slots


@dataclass
class Encoded:
    ids: np.ndarray  # uint32 [n]
    mask: np.ndarray  # uint8 [n]
    source: str


def fit(pieces: list[tuple[list[int], list[int], str]], width: int) -> tuple[int | None, bool]:
    """How many messages to keep: all if they fit in `width`, else the most that fit and end with
    an assistant turn; None when not even the first assistant turn fits. Returns (count, truncated)."""
    length, best = 1, None  # <|bos|>
    for k, (ids, _, role) in enumerate(pieces, start=1):
        length += len(ids)
        if length > width:
            return best, True
        if role == "assistant":
            best = k
    return len(pieces), False


def encode_conversations(items: list[tuple[str, list[dict]]], tok: common.ChatTokenizer, width: int, counts: Counter) -> list[Encoded | None]:
    """Render each conversation, cut over-length ones or drop them (None), counted in `counts`."""
    cache = tok.encode_all(m["content"] for _, messages in items for m in messages)
    encode = cache.__getitem__
    bos = tok.special["bos"]
    out = []
    for source, messages in items:
        pieces = [(*message_ids(m, encode, tok.special), m["role"]) for m in messages]
        keep, truncated = fit(pieces, width)
        if keep is None:
            counts["too_long_dropped"] += 1
            out.append(None)
            continue
        counts["too_long_truncated"] += truncated
        ids = [bos] + [i for p in pieces[:keep] for i in p[0]]
        mask = [0] + [m for p in pieces[:keep] for m in p[1]]
        out.append(Encoded(np.array(ids, dtype=np.uint32), np.array(mask, dtype=np.uint8), source))
    return out


def first_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Bins of item indices: each item, in order, goes to the first bin with room for it."""
    free = np.zeros(len(lengths), dtype=np.int64)
    bins: list[list[int]] = []
    smallest = min(lengths, default=0)
    first_open = 0  # bins before this one cannot take even the smallest item
    for i, n in enumerate(lengths):
        while first_open < len(bins) and free[first_open] < smallest:
            first_open += 1
        room = np.flatnonzero(free[first_open : len(bins)] >= n)
        b = first_open + int(room[0]) if len(room) else len(bins)
        if b == len(bins):
            bins.append([])
            free[b] = width
        bins[b].append(i)
        free[b] -= n
    return bins


def pack_rows(convs: list[Encoded], width: int, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """[rows, width] tokens, loss_mask, positions of the conversations packed first-fit, and the
    number of conversations in each row."""
    bins = first_fit([len(c.ids) for c in convs], width)
    tokens = np.full((len(bins), width), pad, dtype=np.uint32)
    mask = np.zeros((len(bins), width), dtype=np.uint8)
    positions = np.zeros((len(bins), width), dtype=np.uint16)
    for r, members in enumerate(bins):
        at = 0
        for i in members:
            n = len(convs[i].ids)
            tokens[r, at : at + n] = convs[i].ids
            mask[r, at : at + n] = convs[i].mask
            positions[r, at : at + n] = np.arange(n)
            at += n
        positions[r, at:] = np.arange(width - at)  # the pad tail: its own segment
    return tokens, mask, positions, np.array([len(b) for b in bins], dtype=np.int64)


def fixed_lists(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=type_), values.shape[1])


def write_split(out: StageDir, split: str, convs: list[Encoded], width: int, pad: int) -> tuple[list[dict], dict[str, int]]:
    """Pack and write one split; returns its index entries and counts."""
    tokens, mask, positions, members = pack_rows(convs, width, pad)
    entries = []
    for f, start in enumerate(range(0, len(tokens), common.ROWS_PER_FILE)):
        part = slice(start, start + common.ROWS_PER_FILE)
        columns = {
            "tokens": fixed_lists(tokens[part], pa.uint32()),
            "loss_mask": fixed_lists(mask[part], pa.uint8()),
            "positions": fixed_lists(positions[part], pa.uint16()),
        }
        path = common.split_file(split, f)
        out.write_bytes(path, common.arrow_bytes(columns), rows=len(tokens[part]))
        entries.append({
            "path": path,
            "samples": len(tokens[part]),
            "conversations": int(members[part].sum()),
            "assistant_tokens": int(mask[part].sum()),
        })
    real = sum(len(c.ids) for c in convs)
    counts = {"conversations": len(convs), "samples": len(tokens), "tokens": real, "assistant_tokens": int(mask.sum()), "slots": tokens.size}
    return entries, counts


def read_conversations(cfg: SftDataConfig, files: list, bad: common.BadRows, counts: Counter) -> list[tuple[str, list[dict]]]:
    """(source label, messages) of every conversation that parses, trailing user turns dropped
    (the augment stage reads them the same way, so its source keys match ours)."""
    rows = common.counted(common.iter_rows(cfg, files, demo.sft_rows, "messages"), counts)
    items: list[tuple[str, list[dict]]] = []
    for row, messages in common.parse_rows(rows, parse_conversation, bad):
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        counts["trailing_turns_dropped"] += len(messages) - 1 - last
        items.append((row.label, messages[: last + 1]))
    return items


def augmented_conversations(store, inputs: list[StageRef], train_keys: set[int], tok, width: int, counts: Counter) -> list[Encoded | None]:
    """The augment stage's variants (when it is an input) of conversations that are in our train
    split; a variant whose source went to val or was dropped is left out (counted)."""
    refs = [ref for ref in inputs if ref.stage == AUGMENT_STAGE]
    if not refs:
        return []
    items = []
    for line in store.reader(refs[0]).read_bytes(AUGMENTED_FILE).decode().splitlines():
        record = json.loads(line)
        if record["source_key"] not in train_keys:
            counts["augmented_source_not_in_train"] += 1
            continue
        items.append((f"augment:{record['method']}", record["messages"]))
    counts["augmented_in"] += len(items)
    return encode_conversations(items, tok, width, counts)


def run_sft_data(cfg: SftDataConfig, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> SftDataStats:
    for s, source in enumerate(cfg.sources):
        if source.format in PREFERENCE_SHAPES:
            raise ChatDataError(f"sft_data.sources[{s}] has format '{source.format}': preference pairs belong under preference_data.sources")
    tok = common.ChatTokenizer.from_inputs(out.store, inputs, SECTION)
    bad = common.BadRows(cfg.on_bad_row, SECTION)
    counts: Counter = Counter()
    files = common.source_files(cfg, SECTION)
    items = read_conversations(cfg, files, bad, counts)
    width = cfg.seq_len + 1
    rendered = encode_conversations(items, tok, width, counts)
    kept = [(conv, messages) for conv, (_, messages) in zip(rendered, items) if conv is not None]
    encoded = [conv for conv, _ in kept]
    keys = [common.split_key(messages, cfg.seed) for _, messages in kept]
    is_val = common.val_flags(keys, cfg.val_fraction)
    splits = {"train": [c for c, v in zip(encoded, is_val) if not v], "val": [c for c, v in zip(encoded, is_val) if v]}
    train_keys = {k for k, v in zip(keys, is_val) if not v}
    augmented = [conv for conv in augmented_conversations(out.store, inputs, train_keys, tok, width, counts) if conv is not None]
    splits["train"] += augmented
    index = {**common.index_header("sft", cfg, tok), "packing": "reset_positions", "splits": {}}
    per_split = {}
    for split in SPLITS:
        index["splits"][split], per_split[split] = write_split(out, split, splits[split], width, tok.special["pad"])
    index["conversations"] = sum(c["conversations"] for c in per_split.values())
    index["assistant_tokens"] = sum(c["assistant_tokens"] for c in per_split.values())
    out.write_json(INDEX_FILE, index)
    slots = sum(c["slots"] for c in per_split.values())
    by_source = Counter(c.source for c in encoded + augmented)
    if bad.counts:
        log.warning("sft_data skipped malformed rows: %s", dict(bad.counts))
    return SftDataStats(
        files=len(files),
        rows_in=counts["rows_in"],
        skipped=dict(sorted(bad.counts.items())),
        skipped_examples=bad.examples,
        trailing_turns_dropped=counts["trailing_turns_dropped"],
        too_long_truncated=counts["too_long_truncated"],
        too_long_dropped=counts["too_long_dropped"],
        augmented_in=counts["augmented_in"],
        augmented_source_not_in_train=counts["augmented_source_not_in_train"],
        conversations={s: c["conversations"] for s, c in per_split.items()},
        conversations_by_source=dict(sorted(by_source.items())),
        samples={s: c["samples"] for s, c in per_split.items()},
        tokens={s: c["tokens"] for s, c in per_split.items()},
        assistant_tokens={s: c["assistant_tokens"] for s, c in per_split.items()},
        fill=round(sum(c["tokens"] for c in per_split.values()) / slots, 6) if slots else 0.0,
        assistant_fraction=round(index["assistant_tokens"] / slots, 6) if slots else 0.0,
    )


def input_fingerprint(cfg: SftDataConfig) -> str:
    return common.input_fingerprint(cfg, SECTION)
