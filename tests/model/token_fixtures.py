"""Small committed `tokenize` / `train_tokenizer` stages for model and pretrain tests.

The token stage follows the contract of COMMON.md "Token shards" (what tasks/tokens/tokenize.py
writes): Arrow IPC files with one fixed_size_list column ``tokens`` and an index.json.
The data is a sparse Markov chain, so a model can beat the unigram baseline quickly.
"""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa

from lmfoundry.infra.store import StageRef, Store

EOS, PAD, BOS = 0, 1, 2


def markov_tokens(n_samples: int, seq_len: int, vocab_size: int, seed: int = 0, branching: int = 2, chain_seed: int = 0) -> np.ndarray:
    """[n_samples, seq_len + 1] tokens where each token has `branching` possible successors.

    The chain depends on `chain_seed` only, so train and val (different `seed`) share it."""
    successors = np.random.default_rng(chain_seed).integers(3, vocab_size, size=(vocab_size, branching))
    rng = np.random.default_rng(seed + 1000)
    out = np.empty((n_samples, seq_len + 1), dtype=np.int64)
    out[:, 0] = rng.integers(3, vocab_size, size=n_samples)
    for t in range(1, seq_len + 1):
        out[:, t] = successors[out[:, t - 1], rng.integers(0, branching, size=n_samples)]
    return out


def arrow_file(samples: np.ndarray, dtype=np.uint16) -> bytes:
    width = samples.shape[1]
    values = pa.array(samples.astype(dtype).ravel())
    table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(values, width)})
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(1, len(samples) // 2))  # several record batches
    return sink.getvalue()


def commit_tokens(store: Store, train: np.ndarray, val: np.ndarray, vocab_size: int, stage: str = "tokenize", shards: int = 2) -> StageRef:
    """A committed token stage: train split over `shards` files, val in one."""
    version = hashlib.sha256(train.tobytes() + val.tobytes() + str(vocab_size).encode()).hexdigest()[:16]
    out = store.open_for_write(stage, version)
    splits: dict[str, list] = {"train": [], "val": []}
    for split, parts in (("train", np.array_split(train, shards)), ("val", [val])):
        for i, part in enumerate(parts):
            path = f"{split}/part-{i:05d}.arrow"
            out.write_bytes(path, arrow_file(part), rows=len(part))
            splits[split].append({"path": path, "samples": len(part)})
    seq_len = train.shape[1] - 1
    index = {
        "seq_len": seq_len,
        "dtype": "uint16",
        "vocab_size": vocab_size,
        "eos_id": EOS,
        "pad_id": PAD,
        "bos_id": BOS,
        "splits": splits,
        "tokens": {"train": int(train.size), "val": int(val.size)},
    }
    out.write_json("index.json", index)
    return store.commit(out, {"stats": {}})


def commit_tokenizer(store: Store, vocab_size: int, stage: str = "train_tokenizer") -> StageRef:
    """A word-level tokenizer over 't3'..'tN' plus eos/pad/bos, in HF tokenizers format."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|eos|>": EOS, "<|pad|>": PAD, "<|bos|>": BOS, **{f"t{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<|eos|>", "<|pad|>", "<|bos|>"])
    out = store.open_for_write(stage, f"v{vocab_size}")
    out.write_bytes("tokenizer.json", tokenizer.to_str().encode())
    out.write_json("special_tokens.json", {"eos": EOS, "pad": PAD, "bos": BOS})
    return store.commit(out, {"stats": {}})


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in open(path).read().splitlines() if line.strip()]
