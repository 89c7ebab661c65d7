"""Stage `tokenize`: document shards -> packed token samples in memory-mappable Arrow files.

Inputs: the document stages, and the `train_tokenizer` stage (found by ``ref.stage``).
Input document shard i (all document inputs, in order) becomes ``train/part-i.arrow`` and
``val/part-i.arrow``: Arrow IPC files (uncompressed, so the loader memory-maps them) with one
column ``tokens``: fixed_size_list<uint16|uint32>[seq_len + 1], uint16 when the vocabulary
fits. ``index.json`` (written last) lists the files per split with their sample counts, and the
token counts (per split, per source) that the manifest stats repeat.

- Every document is framed as ``[BOS] tokens EOS`` (BOS only with ``add_bos``). Text that
  merely looks like a special token (a literal "<|eos|>" in a document) is encoded as text.
- A document goes to the validation split when a hash of its id falls below ``val_fraction``:
  the decision depends on the id alone, so it stays put when the corpus grows.
- ``packing: pack``: the framed documents of one input shard and split are concatenated in
  input order and cut into samples of seq_len + 1 tokens; the tail of the last sample of each
  shard is filled with PAD (at most seq_len pad tokens per shard and split; nothing is carried
  over to the next shard, so shards stay independent and resumable). ``packing: pad``: every
  document starts a new sample; a document longer than a sample continues in the next ones, and
  its last sample is filled with PAD. Either way every token lands in exactly one sample once.
- Trainers should ignore targets equal to ``pad_id`` (index.json) in the loss.

Shards are encoded in parallel (``compute.workers``; ``encode_batch`` itself uses every core)
and each shard is marked when written, so a resumed run redoes only missing shards. Documents
without an id or with empty text are skipped and counted by reason.

Run alone: ``lmf run --until tokenize``.
"""
from __future__ import annotations

import hashlib
import io
import logging
from collections import Counter
from functools import partial
from itertools import chain

import numpy as np
import pyarrow as pa
from pydantic import BaseModel
from tokenizers import Tokenizer

from lmfoundry.infra.files import InputError
from lmfoundry.infra.config import ComputeConfig, TokenizeConfig
from lmfoundry.infra.docs import doc_shards
from lmfoundry.infra.parallel import map_pending
from lmfoundry.infra.store import StageDir, StageRef
from lmfoundry.model.token_format import INDEX_FILE, SPLITS, TOKENS_COLUMN
from lmfoundry.tasks.tokens.train_tokenizer import STAGE_NAME as TOKENIZER_STAGE
from lmfoundry.tasks.tokens.train_tokenizer import load_tokenizer

CODE_VERSION = "1"
log = logging.getLogger("lmfoundry.tokenize")



class TokenizeInputError(InputError):
    """The stage's inputs are not what it needs (no tokenizer, several tokenizers)."""


class TokenizeStats(BaseModel):
    shards: int
    seq_len: int
    dtype: str
    vocab_size: int
    docs_in: int
    skipped: dict[str, int]
    docs: dict[str, int]  # per split
    samples: dict[str, int]
    tokens: dict[str, int]  # real tokens (BOS/EOS included, PAD excluded) per split
    pad_tokens: dict[str, int]
    tokens_by_source: dict[str, dict[str, int]]
    fill: float  # real tokens / token slots in all samples


# ---------------------------------------------------------------- format


def shard_file(split: str, index: int) -> str:
    return f"{split}/part-{index:05d}.arrow"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def samples_to_arrow(samples: np.ndarray) -> bytes:
    """[n, seq_len + 1] ids -> an uncompressed Arrow IPC file with one fixed-size-list column."""
    width = samples.shape[1]
    values = pa.array(np.ascontiguousarray(samples).reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(values, width)
    batch = pa.record_batch([column], names=[TOKENS_COLUMN])
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, batch.schema) as writer:
        if len(samples):
            writer.write_batch(batch)
    return sink.getvalue()


# ---------------------------------------------------------------- pure steps


def in_val(doc_id: str, val_fraction: float) -> bool:
    """Stable split: a document's side depends only on its id (and grows monotonically with the fraction)."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8, person=b"lmf-val").digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


def frame_docs(ids_per_doc: list[list[int]], bos: int | None, eos: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Documents as one stream ``[BOS] ids EOS [BOS] ids EOS ...`` and each framed length."""
    body = np.array([len(ids) for ids in ids_per_doc], dtype=np.int64)
    framed = body + 1 + (bos is not None)
    ends = np.cumsum(framed)
    stream = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    is_body = np.ones(len(stream), dtype=bool)
    is_body[ends - 1] = False
    stream[ends - 1] = eos
    if bos is not None:
        starts = ends - framed
        is_body[starts] = False
        stream[starts] = bos
    stream[is_body] = np.fromiter(chain.from_iterable(ids_per_doc), dtype=dtype, count=int(body.sum()))
    return stream, framed


def pack(stream: np.ndarray, width: int, pad: int) -> np.ndarray:
    """Cut a token stream into rows of `width`; the last row's tail is PAD."""
    rows = -(-len(stream) // width)
    samples = np.full(rows * width, pad, dtype=stream.dtype)
    samples[: len(stream)] = stream
    return samples.reshape(rows, width)


def pad_per_doc(stream: np.ndarray, framed: np.ndarray, width: int, pad: int) -> np.ndarray:
    """Every document starts a row; a long one continues over several; PAD fills the rest of its last row."""
    rows_per_doc = -(-framed // width)
    samples = np.full(int(rows_per_doc.sum()) * width, pad, dtype=stream.dtype)
    doc_dest = np.cumsum(rows_per_doc * width) - rows_per_doc * width
    doc_src = np.cumsum(framed) - framed
    within = np.arange(len(stream)) - np.repeat(doc_src, framed)
    samples[np.repeat(doc_dest, framed) + within] = stream
    return samples.reshape(-1, width)


# ---------------------------------------------------------------- one shard


class SplitBuffer:
    """The framed documents of one split of one shard, accumulated batch by batch."""

    def __init__(self):
        self.streams: list[np.ndarray] = []
        self.framed: list[np.ndarray] = []
        self.docs = 0
        self.by_source: Counter = Counter()

    def add(self, stream: np.ndarray, framed: np.ndarray, sources: list[str]) -> None:
        self.streams.append(stream)
        self.framed.append(framed)
        self.docs += len(framed)
        for source, n in zip(sources, framed.tolist()):
            self.by_source[source] += n

    def samples(self, cfg: TokenizeConfig, pad: int, dtype: np.dtype) -> np.ndarray:
        width = cfg.seq_len + 1
        if not self.streams:
            return np.empty((0, width), dtype=dtype)
        stream = np.concatenate(self.streams)
        if cfg.packing == "pack":
            return pack(stream, width, pad)
        return pad_per_doc(stream, np.concatenate(self.framed), width, pad)


def usable_docs(ids: list, texts: list, sources: list, skipped: Counter) -> list[tuple[str, str, str]]:
    docs = []
    for doc_id, text, source in zip(ids, texts, sources):
        if not isinstance(doc_id, str) or not doc_id:
            skipped["missing_id"] += 1
        elif not isinstance(text, str):
            skipped["missing_text"] += 1
        elif not text:
            skipped["empty"] += 1
        else:
            docs.append((doc_id, text, source or ""))
    return docs


def tokenize_shard(
    cfg: TokenizeConfig,
    out: StageDir,
    shards: list[tuple[StageRef, str]],
    tokenizer: Tokenizer,
    special: dict[str, int],
    dtype: np.dtype,
    index: int,
) -> None:
    ref, path = shards[index]
    table = out.store.reader(ref).read_table(path, columns=["id", "text", "source"])
    skipped: Counter = Counter()
    docs = usable_docs(*(table.column(c).to_pylist() for c in ("id", "text", "source")), skipped)
    del table
    if not tokenizer.encode_special_tokens:  # a tokenizer pickled to a worker process loses the flag
        tokenizer.encode_special_tokens = True
    bos = special["bos"] if cfg.add_bos else None
    buffers = {split: SplitBuffer() for split in SPLITS}
    for start in range(0, len(docs), cfg.batch_docs):
        batch = docs[start : start + cfg.batch_docs]
        encodings = tokenizer.encode_batch_fast([text for _, text, _ in batch], add_special_tokens=False)
        is_val = [in_val(doc_id, cfg.val_fraction) for doc_id, _, _ in batch]
        for split in SPLITS:
            chosen = [i for i, val in enumerate(is_val) if val == (split == "val")]
            if chosen:
                stream, framed = frame_docs([encodings[i].ids for i in chosen], bos, special["eos"], dtype)
                buffers[split].add(stream, framed, [batch[i][2] for i in chosen])
    counts = {"docs_in": len(docs) + sum(skipped.values()), "skipped": dict(skipped)}
    for split in ("val", "train"):  # train last: its marker (with the counts) means the shard is done
        buffer = buffers[split]
        samples = buffer.samples(cfg, special["pad"], dtype)
        tokens = sum(buffer.by_source.values())
        counts[split] = {
            "docs": buffer.docs,
            "samples": len(samples),
            "tokens": tokens,
            "pad_tokens": samples.size - tokens,
            "by_source": dict(buffer.by_source),
        }
        extra = {"counts": counts} if split == "train" else {}
        out.write_bytes(shard_file(split, index), samples_to_arrow(samples), rows=len(samples), **extra)


# ---------------------------------------------------------------- the stage


def split_inputs(inputs: list[StageRef]) -> tuple[StageRef, list[StageRef]]:
    tokenizers = [r for r in inputs if r.stage == TOKENIZER_STAGE]
    if len(tokenizers) != 1:
        raise TokenizeInputError(
            f"tokenize needs exactly one '{TOKENIZER_STAGE}' input, got {len(tokenizers)} "
            f"(inputs: {[r.stage for r in inputs]}); list it in the stage's inputs"
        )
    return tokenizers[0], [r for r in inputs if r.stage != TOKENIZER_STAGE]


def build_index(out: StageDir, n_shards: int, meta: dict) -> tuple[dict, dict]:
    """index.json from the shard markers, plus the totals for the stats."""
    files: dict[str, list] = {split: [] for split in SPLITS}
    totals = {key: Counter() for key in ("docs", "samples", "tokens", "pad_tokens")}
    by_source: dict[str, Counter] = {}
    docs_in, skipped = 0, Counter()
    for i in range(n_shards):
        counts = out.marker(shard_file("train", i))["counts"]
        docs_in += counts["docs_in"]
        skipped.update(counts["skipped"])
        for split in SPLITS:
            c = counts[split]
            if c["samples"]:
                files[split].append({"path": shard_file(split, i), "samples": c["samples"]})
            for key in totals:
                totals[key][split] += c[key]
            for source, n in c["by_source"].items():
                by_source.setdefault(source, Counter())[split] += n
    index = {
        **meta,
        "splits": files,
        "tokens": {split: totals["tokens"][split] for split in SPLITS},
        "pad_tokens": {split: totals["pad_tokens"][split] for split in SPLITS},
        "samples": {split: totals["samples"][split] for split in SPLITS},
        "docs": {split: totals["docs"][split] for split in SPLITS},
        "tokens_by_source": {s: {split: c[split] for split in SPLITS} for s, c in sorted(by_source.items())},
    }
    return index, {"docs_in": docs_in, "skipped": dict(sorted(skipped.items()))}


def run_tokenize(cfg: TokenizeConfig, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> TokenizeStats:
    tokenizer_ref, doc_refs = split_inputs(inputs)
    tokenizer, special = load_tokenizer(out.store, tokenizer_ref)
    # a literal "<|eos|>" in a document is text, not EOS; set before the shards share the
    # tokenizer across threads (setting it while another thread encodes would conflict)
    tokenizer.encode_special_tokens = True
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    shards = doc_shards(out.store, doc_refs)
    work = partial(tokenize_shard, cfg, out, shards, tokenizer, special, dtype)
    map_pending(work, len(shards), lambda i: shard_file("train", i), out, compute, "shards")
    meta = {
        "seq_len": cfg.seq_len,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_id": special["eos"],
        "pad_id": special["pad"],
        "bos_id": special["bos"],
        "packing": cfg.packing,
        "add_bos": cfg.add_bos,
        "val_fraction": cfg.val_fraction,
        "tokenizer": tokenizer_ref.model_dump(include={"stage", "version", "digest"}),
    }
    index, doc_counts = build_index(out, len(shards), meta)
    if cfg.val_fraction > 0 and not index["splits"]["val"]:
        log.warning(
            "tokenize: none of the %d documents fell into the validation split (val_fraction=%s); "
            "stages that evaluate on 'val' will fail: raise tokenize.val_fraction", sum(index["docs"].values()), cfg.val_fraction,
        )
    out.write_json(INDEX_FILE, index)
    slots = sum(index["tokens"].values()) + sum(index["pad_tokens"].values())
    return TokenizeStats(
        shards=len(shards),
        seq_len=cfg.seq_len,
        dtype=dtype.name,
        vocab_size=vocab_size,
        docs_in=doc_counts["docs_in"],
        skipped=doc_counts["skipped"],
        docs=index["docs"],
        samples=index["samples"],
        tokens=index["tokens"],
        pad_tokens=index["pad_tokens"],
        tokens_by_source=index["tokens_by_source"],
        fill=round(sum(index["tokens"].values()) / slots, 6) if slots else 0.0,
    )
