"""Loaders of the post-training data stages: packed SFT rows and preference pairs.

    sft = SftLoader.from_stage(store, sft_data_ref, "train", batch_size=8, seed=0, rank=r, world_size=w)
    batch = next(sft)        # {"tokens", "loss_mask", "positions"}: LongTensor [8, seq_len + 1] each
    pairs = PreferenceLoader.from_stage(store, preference_data_ref, "train", batch_size=8, seed=0)
    batch = next(pairs)      # {"tokens" [16, L], "mask" [16, L], "lengths" [16], "index" [8], ...}:
                             # the 8 chosen sides first, then their 8 rejected sides, right-padded

Both follow model/loader.py's contract: a seeded order per epoch over global stream positions,
step t of W ranks with batch B takes positions [t*B*W, (t+1)*B*W), rank r its slice, and
``state_dict()["sample"]`` resumes exactly. ``eval_batches()`` walks a split once in file order.

Formats (the post-training contract; written by tasks/chat/, uncompressed Arrow IPC files):

- sft_data: ``index.json`` {"format": "sft", "seq_len", "pad_id", ...}; columns ``tokens``
  fixed_size_list<uint32>, ``loss_mask`` <uint8> (1 where that token is a target), ``positions``
  <uint16> (0 at each packed conversation's first token), all [seq_len + 1]. SftLoader is three
  TokenLoaders (one per column) walking the same order.
- preference_data: ``index.json`` {"format": "preference", "seq_len", "pad_id", ...}; one row per
  pair: ``chosen``/``rejected`` list<uint32>, ``chosen_mask``/``rejected_mask`` list<uint8> (1 on
  the reply's scored tokens), ``prompt_len`` uint32, ``id`` string. Pairs are read through the
  memory map; a batch is padded to its longest side.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

from lmfoundry.infra.store import StageRef, Store
from lmfoundry.model.loader import LoaderError, TokenLoader
from lmfoundry.model.token_format import INDEX_FILE

SFT_COLUMNS = ("tokens", "loss_mask", "positions")
PAIR_LISTS = ("chosen", "chosen_mask", "rejected", "rejected_mask")


def read_index(store: Store, ref: StageRef, fmt: str) -> tuple[Any, dict]:
    reader = store.reader(ref)
    if INDEX_FILE not in reader.manifest["files"]:
        raise LoaderError(f"stage {ref.stage}/{ref.version} holds no {INDEX_FILE}: not a {fmt} data stage")
    index = reader.read_json(INDEX_FILE)
    if index.get("format") != fmt:
        raise LoaderError(f"{ref.stage}/{ref.version}/{INDEX_FILE} has format {index.get('format')!r}, expected {fmt!r}: list the {fmt}_data stage as this input")
    return reader, index


def split_files(reader, index: dict, ref: StageRef, split: str) -> list[str]:
    if split not in index["splits"]:
        raise LoaderError(f"stage {ref.stage}/{ref.version} has no split '{split}'; it has {sorted(index['splits'])}")
    entries = index["splits"][split]
    if not sum(entry["samples"] for entry in entries):
        raise LoaderError(f"split '{split}' of stage {ref.stage}/{ref.version} has no samples; add data, or for 'val' raise val_fraction")
    return [reader.local_path(entry["path"]) for entry in entries]


def segment_ids(positions: torch.Tensor) -> torch.Tensor:
    """positions [B, T] -> segment ids [B, T]: a new segment wherever a position is 0."""
    return (positions == 0).cumsum(dim=-1)


class SftLoader:
    """Packed SFT rows, resumable; every batch is a dict of LongTensors [B, seq_len + 1]."""

    def __init__(self, parts: dict[str, TokenLoader]):
        self.parts = parts
        self.tokens = parts["tokens"]
        sizes = {name: part.num_samples for name, part in parts.items()}
        if len(set(sizes.values())) != 1:
            raise LoaderError(f"the SFT columns hold different numbers of rows {sizes}; re-run the sft_data stage")

    @classmethod
    def from_stage(cls, store: Store, ref: StageRef, split: str = "train", batch_size: int = 8, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> "SftLoader":
        reader, index = read_index(store, ref, "sft")
        files = split_files(reader, index, ref, split)
        parts = {
            column: TokenLoader(files, index["seq_len"], batch_size, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle, index=index, column=column)
            for column in SFT_COLUMNS
        }
        loader = cls(parts)
        expected = sum(entry["samples"] for entry in index["splits"][split])
        if loader.num_samples != expected:
            raise LoaderError(f"split '{split}' of {ref.stage}/{ref.version}: index.json lists {expected} rows, the files hold {loader.num_samples}")
        return loader

    @property
    def index(self) -> dict:
        return self.tokens.index

    @property
    def seq_len(self) -> int:
        return self.tokens.seq_len

    @property
    def num_samples(self) -> int:
        return self.tokens.num_samples

    @property
    def global_batch(self) -> int:
        return self.tokens.global_batch

    @property
    def pad_id(self) -> int | None:
        return self.tokens.pad_id

    def __iter__(self) -> "SftLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return {name: next(part) for name, part in self.parts.items()}

    def state_dict(self) -> dict[str, int]:
        return self.tokens.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        for part in self.parts.values():
            part.load_state_dict(state)

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        for batches in zip(*(part.eval_batches() for part in self.parts.values())):
            yield dict(zip(self.parts, batches))


# ---------------------------------------------------------------------- preference pairs


def _list_column(batch: pa.RecordBatch, name: str, path: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [rows + 1], values) of a list column, zero-copy from the memory map."""
    column = batch.column(name)
    if not pa.types.is_list(column.type):
        raise LoaderError(f"{path}: column '{name}' is {column.type}, expected a list; re-run the preference_data stage")
    if column.null_count:
        raise LoaderError(f"{path}: column '{name}' has {column.null_count} null rows; re-run the preference_data stage")
    offsets = column.offsets.to_numpy(zero_copy_only=False)
    return offsets, column.values.to_numpy(zero_copy_only=False)


class PreferenceLoader:
    """Preference pairs in a seeded order, split across ranks, resumable; padded in collate."""

    # the order contract is TokenLoader's, shared by reusing its methods: they read only
    # num_samples, seed, shuffle, rank, batch_size and the permutation cache
    permutation = TokenLoader.permutation
    samples_at = TokenLoader.samples_at
    step_samples = TokenLoader.step_samples
    global_batch = TokenLoader.global_batch

    def __init__(self, files: list[str], batch_size: int, pad_id: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, start_sample: int = 0, shuffle: bool = True, index: dict | None = None):
        if batch_size < 1:
            raise LoaderError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} is outside world_size {world_size}")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.position, self.pad_id = seed, shuffle, start_sample, pad_id
        self.index = index or {}
        self.seq_len = self.index.get("seq_len")
        self.blocks: list[dict[str, Any]] = []
        for path in files:
            reader = pa.ipc.open_file(pa.memory_map(path, "r"))
            missing = [c for c in (*PAIR_LISTS, "id") if reader.schema.get_field_index(c) < 0]
            if missing:
                raise LoaderError(f"{path} lacks the columns {missing} of a preference shard (it has {reader.schema.names}); re-run the preference_data stage")
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                if batch.num_rows:
                    block = {name: _list_column(batch, name, path) for name in PAIR_LISTS}
                    block["id"] = batch.column("id").to_pylist()
                    self._check_block(block, path)
                    self.blocks.append(block)
        sizes = np.array([len(b["id"]) for b in self.blocks], dtype=np.int64)
        self._block_ends = np.cumsum(sizes)
        self.num_samples = int(sizes.sum())
        if self.num_samples == 0:
            raise LoaderError(f"no preference pairs in {len(files)} file(s); add data or change the split")
        self._permutations: dict[int, np.ndarray] = {}
        self.reference: np.ndarray | None = None  # [N, 2] float32 (chosen, rejected) log-probs, set by DPO

    @staticmethod
    def _check_block(block: dict[str, Any], path: str) -> None:
        for side in ("chosen", "rejected"):
            offsets, mask_offsets = block[side][0], block[f"{side}_mask"][0]
            if not np.array_equal(offsets - offsets[0], mask_offsets - mask_offsets[0]):
                raise LoaderError(f"{path}: '{side}' and '{side}_mask' differ in length on some row; re-run the preference_data stage")
            if np.any(np.diff(offsets) < 2):
                raise LoaderError(f"{path}: a '{side}' row has fewer than 2 tokens (nothing to score); re-run the preference_data stage")

    @classmethod
    def from_stage(cls, store: Store, ref: StageRef, split: str = "train", batch_size: int = 8, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> "PreferenceLoader":
        reader, index = read_index(store, ref, "preference")
        loader = cls(split_files(reader, index, ref, split), batch_size, index["pad_id"], seed=seed, rank=rank, world_size=world_size, shuffle=shuffle, index=index)
        expected = sum(entry["samples"] for entry in index["splits"][split])
        if loader.num_samples != expected:
            raise LoaderError(f"split '{split}' of {ref.stage}/{ref.version}: index.json lists {expected} pairs, the files hold {loader.num_samples}")
        return loader

    # ------------------------------------------------------------------ rows and collate

    def side(self, sample: int, name: str) -> np.ndarray:
        block_id = int(np.searchsorted(self._block_ends, sample, side="right"))
        row = sample - (int(self._block_ends[block_id - 1]) if block_id else 0)
        offsets, values = self.blocks[block_id][name]
        return values[offsets[row] : offsets[row + 1]]

    def pair_id(self, sample: int) -> str:
        block_id = int(np.searchsorted(self._block_ends, sample, side="right"))
        return self.blocks[block_id]["id"][sample - (int(self._block_ends[block_id - 1]) if block_id else 0)]

    def ids(self) -> list[str]:
        return [i for block in self.blocks for i in block["id"]]

    def collate(self, samples: np.ndarray) -> dict[str, torch.Tensor]:
        """Pairs -> one right-padded batch of 2n rows: chosen sides [0, n), rejected sides [n, 2n).

        "tokens"/"mask" [2n, L] (pad_id / 0 beyond each side), "lengths" [2n], "index" [n] sample
        numbers, and with a reference set "reference" [n, 2] float32. An empty selection gives
        2 pad columns, so every rank still runs a forward (ZeRO-3 gathers need every rank)."""
        sides = [(self.side(s, "chosen"), self.side(s, "chosen_mask")) for s in samples]
        sides += [(self.side(s, "rejected"), self.side(s, "rejected_mask")) for s in samples]
        width = max([len(ids) for ids, _ in sides] + [2])
        tokens = np.full((len(sides), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(sides), width), dtype=np.int64)
        for row, (ids, m) in enumerate(sides):
            tokens[row, : len(ids)] = ids
            mask[row, : len(m)] = m
        batch = {
            "tokens": torch.from_numpy(tokens),
            "mask": torch.from_numpy(mask),
            "lengths": torch.tensor([len(ids) for ids, _ in sides], dtype=torch.long),
            "index": torch.from_numpy(np.asarray(samples, dtype=np.int64)),
        }
        if self.reference is not None:
            batch["reference"] = torch.from_numpy(self.reference[np.asarray(samples, dtype=np.int64)]).reshape(-1, 2)
        return batch

    # ------------------------------------------------------------------ iteration and resume

    def __iter__(self) -> "PreferenceLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.collate(self.step_samples(self.position))
        self.position += self.global_batch
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"sample": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            self._permutations.clear()
        self.position, self.seed = int(state["sample"]), int(state["seed"])

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every pair once, in file order, split across ranks like training steps (see TokenLoader)."""
        for step_start in range(0, self.num_samples, self.global_batch):
            first = min(step_start + self.rank * self.batch_size, self.num_samples)
            last = min(first + self.batch_size, self.num_samples)
            yield self.collate(np.arange(first, last, dtype=np.int64))
