"""Stage `preference_data`: preference pairs -> templated, tokenized Arrow shards.

Inputs: the `train_tokenizer` stage; the files of ``preference_data.sources`` (JSONL or Parquet
on any fsspec URL: ``{prompt, chosen, rejected}`` with strings or message lists, as in
UltraFeedback-binarized, or HH-RLHF ``{chosen, rejected}`` transcripts; tasks/chat/shapes.py)
and, with ``preference_data.builtin: chatterbot``, the demo pairs (a documented DEMO
construction from the chatterbot corpus, not human preferences: tasks/chat/demo.py). Output
(the post-training contract; read by model/ loaders):

- ``train/part-NNNNN.arrow``, ``val/part-NNNNN.arrow``: uncompressed Arrow IPC, one row = one
  pair, no padding stored: ``chosen`` list<uint32> = template(prompt + chosen reply),
  ``chosen_mask`` list<uint8> (1 on the reply's content and its <|end|>: the scored tokens),
  ``rejected``, ``rejected_mask`` likewise, ``prompt_len`` uint32 = the tokens both sides
  share (the rendered prompt plus the generation prompt <|assistant|>, i.e. model/chat.py's
  ``prompt_ids``), ``id`` string (a hash of the normalised pair). The last token of each side
  is its <|end|> (where a reward model scores).
- ``index.json``: format "preference", seq_len, pad_id, eos_id, bos_id, end_id, vocab_size,
  splits {"train": [{"path", "samples"}], "val": [...]}, pairs (total), val_fraction, tokenizer.

A pair with either side longer than seq_len + 1 tokens is dropped and counted
(too_long_dropped). Pairs go to val by a stable hash of their PROMPT, so every pair of one
prompt lands in the same split and held-out accuracy is measured on unseen prompts. Malformed
rows stop the stage naming file:line and field, or with on_bad_row: skip are counted by reason.

Run alone: ``lmf run --until preference_data``.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from lmfoundry.infra.config import ComputeConfig
from lmfoundry.infra.config_posttrain import PreferenceDataConfig
from lmfoundry.infra.store import StageDir, StageRef
from lmfoundry.model.chat import prompt_ids, render
from lmfoundry.model.token_format import INDEX_FILE, SPLITS
from lmfoundry.tasks.chat import common, demo
from lmfoundry.tasks.chat.readers import ChatDataError
from lmfoundry.tasks.chat.shapes import CONVERSATION_SHAPES, Pair, parse_pair

CODE_VERSION = "2"  # 2: demo pairs draw rejected answers from their own split
SECTION = "preference_data"
log = logging.getLogger("lmfoundry.preference_data")


class PreferenceDataStats(BaseModel):
    files: int
    rows_in: int  # rows read, malformed ones included
    skipped: dict[str, int]  # malformed rows by reason (on_bad_row: skip)
    skipped_examples: dict[str, str]  # reason -> the first such row's location and problem
    too_long_dropped: int
    pairs: dict[str, int]  # per split
    pairs_by_source: dict[str, int]
    prompt_tokens_mean: float
    chosen_reply_tokens_mean: float
    rejected_reply_tokens_mean: float
    longest_side: int  # tokens
    # how often the longer reply is the chosen one (ties count half): the accuracy a
    # length-only "reward model" gets, the baseline a real one must beat
    length_baseline_accuracy: dict[str, float | None]


@dataclass
class EncodedPair:
    chosen: list[int]
    chosen_mask: list[int]
    rejected: list[int]
    rejected_mask: list[int]
    prompt_len: int
    id: str
    source: str


def pair_id(pair: Pair) -> str:
    return hashlib.sha256(common.canonical({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})).hexdigest()[:20]


def encode_pair(pair: Pair, encode, special: dict[str, int], source: str) -> EncodedPair:
    """Both sides rendered by the chat template; only the final reply is scored."""
    prompt = prompt_ids(pair.prompt, encode, special)
    sides = []
    for reply in (pair.chosen, pair.rejected):
        ids, mask = render([*pair.prompt, {"role": "assistant", "content": reply}], encode, special)
        # earlier assistant turns of the prompt are context, not the reply being compared
        sides += [ids, [0] * len(prompt) + mask[len(prompt):]]
    return EncodedPair(*sides, len(prompt), pair_id(pair), source)


def list_column(rows: list[list[int]], type_: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    values = np.fromiter((v for r in rows for v in r), dtype=type_.to_pandas_dtype(), count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=type_))


def write_split(out: StageDir, split: str, pairs: list[EncodedPair]) -> list[dict]:
    entries = []
    for f, start in enumerate(range(0, len(pairs), common.ROWS_PER_FILE)):
        part = pairs[start : start + common.ROWS_PER_FILE]
        columns = {
            "chosen": list_column([p.chosen for p in part], pa.uint32()),
            "chosen_mask": list_column([p.chosen_mask for p in part], pa.uint8()),
            "rejected": list_column([p.rejected for p in part], pa.uint32()),
            "rejected_mask": list_column([p.rejected_mask for p in part], pa.uint8()),
            "prompt_len": pa.array([p.prompt_len for p in part], type=pa.uint32()),
            "id": pa.array([p.id for p in part], type=pa.string()),
        }
        path = common.split_file(split, f)
        out.write_bytes(path, common.arrow_bytes(columns), rows=len(part))
        entries.append({"path": path, "samples": len(part)})
    return entries


def length_baseline(pairs: list[EncodedPair]) -> float | None:
    if not pairs:
        return None
    score = sum(1.0 if len(p.chosen) > len(p.rejected) else 0.5 if len(p.chosen) == len(p.rejected) else 0.0 for p in pairs)
    return round(score / len(pairs), 6)


def mean(values: list[int]) -> float:
    return round(sum(values) / len(values), 3) if values else 0.0


def run_preference_data(
    cfg: PreferenceDataConfig, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()
) -> PreferenceDataStats:
    for s, source in enumerate(cfg.sources):
        if source.format in CONVERSATION_SHAPES:
            raise ChatDataError(f"preference_data.sources[{s}] has format '{source.format}': conversations belong under sft_data.sources")
    tok = common.ChatTokenizer.from_inputs(out.store, inputs, SECTION)
    bad = common.BadRows(cfg.on_bad_row, SECTION)
    counts: Counter = Counter()
    files = common.source_files(cfg, SECTION)
    rows = common.counted(common.iter_rows(cfg, files, lambda: demo.preference_rows(cfg.seed, cfg.val_fraction), "preference"), counts)
    items = [(row.label, pair) for row, pair in common.parse_rows(rows, parse_pair, bad)]
    cache = tok.encode_all(text for _, pair in items for text in (*(m["content"] for m in pair.prompt), pair.chosen, pair.rejected))
    width = cfg.seq_len + 1
    kept: list[tuple[EncodedPair, Pair]] = []
    for source, pair in items:
        encoded = encode_pair(pair, cache.__getitem__, tok.special, source)
        if max(len(encoded.chosen), len(encoded.rejected)) > width:
            counts["too_long_dropped"] += 1
        else:
            kept.append((encoded, pair))
    is_val = common.val_flags([common.split_key(pair.prompt, cfg.seed) for _, pair in kept], cfg.val_fraction)
    splits = {"train": [e for (e, _), v in zip(kept, is_val) if not v], "val": [e for (e, _), v in zip(kept, is_val) if v]}
    index = {**common.index_header("preference", cfg, tok), "splits": {}}
    for split in SPLITS:
        index["splits"][split] = write_split(out, split, splits[split])
    index["pairs"] = len(kept)
    out.write_json(INDEX_FILE, index)
    if bad.counts:
        log.warning("preference_data skipped malformed rows: %s", dict(bad.counts))
    encoded_all = [e for e, _ in kept]
    return PreferenceDataStats(
        files=len(files),
        rows_in=counts["rows_in"],
        skipped=dict(sorted(bad.counts.items())),
        skipped_examples=bad.examples,
        too_long_dropped=counts["too_long_dropped"],
        pairs={split: len(splits[split]) for split in SPLITS},
        pairs_by_source=dict(sorted(Counter(e.source for e in encoded_all).items())),
        prompt_tokens_mean=mean([e.prompt_len for e in encoded_all]),
        chosen_reply_tokens_mean=mean([len(e.chosen) - e.prompt_len for e in encoded_all]),
        rejected_reply_tokens_mean=mean([len(e.rejected) - e.prompt_len for e in encoded_all]),
        longest_side=max((max(len(e.chosen), len(e.rejected)) for e in encoded_all), default=0),
        length_baseline_accuracy={split: length_baseline(splits[split]) for split in SPLITS},
    )


def input_fingerprint(cfg: PreferenceDataConfig) -> str:
    return common.input_fingerprint(cfg, SECTION)
