"""Memory-mapped, deterministic, resumable loader of the `tokenize` stage's token shards.

Usage (one data-parallel rank)::

    loader = TokenLoader.from_stage(store, tokenize_ref, split="train", batch_size=8,
                                    seed=0, rank=rank, world_size=world)
    for step, batch in zip(range(steps), loader):  # LongTensor [8, seq_len + 1], forever
        inputs, targets = batch[:, :-1], batch[:, 1:]  # ignore targets == loader.pad_id
        ...
    checkpoint["loader"] = loader.state_dict()        # {"sample": ..., "seed": ...}
    loader.load_state_dict(checkpoint["loader"])      # continues exactly where it stopped

The loader is its own iterator: every ``next()`` is one step (``zip(loader, range(n))`` would
draw one step more than it uses; put the loader last in a zip). ``eval_batches()`` walks a split
once, e.g. for validation loss.

Contract (issue 7 <-> issue 8; COMMON.md "Token shards", unchanged):

- Files: ``train/part-NNNNN.arrow`` and ``val/part-NNNNN.arrow``, uncompressed Arrow IPC files with
  one column ``tokens``: fixed_size_list<uint16|uint32>[seq_len + 1]; ``index.json`` with
  seq_len, dtype, vocab_size, eos_id, pad_id, splits {"train": [{"path", "samples"}], "val": [...]},
  tokens. Also present: bos_id, packing, add_bos, pad_tokens, samples, docs, tokens_by_source.
- Samples are numbered 0..N-1 in the order of the index's file list. The stream of global
  positions 0, 1, 2, ... walks epoch e = position // N through
  ``numpy.random.default_rng(seed + e).permutation(N)`` (the identity with shuffle=False), so an
  epoch boundary may fall inside a step. Step t consumes global positions [t*B*W, (t+1)*B*W),
  rank r takes [r*B, (r+1)*B) of it: W ranks with batch B see exactly what one rank with batch
  B*W sees, and no two ranks share a position.
- ``state_dict()["sample"]`` is the global position of the next step (shared by all ranks), so a
  run may even resume with another world size or batch size and see no sample twice.

Files are memory-mapped (``pa.memory_map`` + ``ipc.open_file``): nothing is read until a batch
needs it and no copy is made besides the batch itself. On an s3:// store each file is downloaded
once into the local cache (``LMF_CACHE``, default ~/.cache/lmfoundry) and mapped from there.
Bookkeeping costs about 40 bytes of RAM per sample (row offsets, two epochs' orders).
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch
from numpy.lib.stride_tricks import as_strided

from lmfoundry.infra.store import StageRef, Store
from lmfoundry.model.token_format import INDEX_FILE, TOKENS_COLUMN


class LoaderError(ValueError):
    """The token shards cannot be loaded as asked (missing split, empty split, wrong shapes)."""


def map_token_file(path: str, width: int, column: str = TOKENS_COLUMN) -> list[np.ndarray]:
    """Zero-copy [rows, width] views of every record batch of one Arrow token file (of one fixed-width column)."""
    reader = pa.ipc.open_file(pa.memory_map(path, "r"))
    if reader.schema.get_field_index(column) < 0:
        raise LoaderError(f"{path} has no column '{column}' (it has {reader.schema.names}); re-run the stage that wrote it")
    column_type = reader.schema.field(column).type
    if not pa.types.is_fixed_size_list(column_type) or column_type.list_size != width:
        raise LoaderError(f"{path}: column '{column}' is {column_type}, expected fixed_size_list[{width}]; re-run the stage that wrote it")
    blocks = []
    for i in range(reader.num_record_batches):
        column_data = reader.get_batch(i).column(column)
        if len(column_data):
            blocks.append(column_data.flatten().to_numpy(zero_copy_only=True).reshape(len(column_data), width))
    return blocks


def address_window(blocks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """One read-only view through which every row of every block is a row: (window, start of each sample).

    numpy cannot gather rows from several arrays in one call, and a per-file gather costs more
    Python work per batch than the copy itself. The blocks all live in this process's address
    space, so a sliding-window view anchored at the lowest block address reaches each block's
    rows at their element offset from that anchor: window[start] is the row that begins there.
    Only starts of real rows are ever indexed, so the gaps between the memory maps are never
    touched. None when a block is not aligned to the element size (the plain path is used).

    Use the window only as ``window[integer_array]``: a numpy function that first copies its
    input (np.take, np.ascontiguousarray) would read the unmapped gaps.
    """
    width, itemsize = blocks[0].shape[1], blocks[0].itemsize
    addresses = np.array([block.ctypes.data for block in blocks], dtype=np.int64)
    anchor = int(np.argmin(addresses))
    byte_offsets = addresses - addresses[anchor]
    if np.any(byte_offsets % itemsize):
        return None
    element_offsets = byte_offsets // itemsize
    span = int(max(offset + block.size for offset, block in zip(element_offsets.tolist(), blocks)))
    window = as_strided(blocks[anchor], shape=(span - width + 1, width), strides=(itemsize, itemsize), writeable=False)
    starts = np.concatenate([offset + np.arange(len(block), dtype=np.int64) * width for offset, block in zip(element_offsets.tolist(), blocks)])
    return window, starts


class TokenLoader:
    """Batches of token samples in a seeded order, split across ranks, resumable by global position."""

    def __init__(
        self,
        files: list[str],
        seq_len: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_sample: int = 0,
        shuffle: bool = True,
        index: dict[str, Any] | None = None,
        column: str = TOKENS_COLUMN,
    ):
        if batch_size < 1:
            raise LoaderError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} is outside world_size {world_size}")
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.position = start_sample
        self.index = index or {}
        self.blocks = [block for path in files for block in map_token_file(path, seq_len + 1, column)]
        if len({block.dtype for block in self.blocks}) > 1:
            raise LoaderError(f"token files {files} mix dtypes {sorted({str(b.dtype) for b in self.blocks})}; they must come from one tokenize stage")
        sizes = np.array([len(b) for b in self.blocks], dtype=np.int64)
        self._block_ends = np.cumsum(sizes)
        self._block_starts = self._block_ends - sizes
        self.num_samples = int(sizes.sum())
        if self.num_samples == 0:
            raise LoaderError(f"no token samples in {len(files)} file(s); add documents or change the split")
        self._window = address_window(self.blocks)
        self._permutations: dict[int, np.ndarray] = {}
        self._epoch_starts: dict[int, np.ndarray] = {}  # window row starts in an epoch's order (the hot path)

    @classmethod
    def from_stage(
        cls,
        store: Store,
        ref: StageRef,
        split: str = "train",
        batch_size: int = 8,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_sample: int = 0,
        shuffle: bool = True,
        column: str = TOKENS_COLUMN,
    ) -> "TokenLoader":
        reader = store.reader(ref)
        index = reader.read_json(INDEX_FILE)
        if split not in index["splits"]:
            raise LoaderError(f"stage {ref.stage}/{ref.version} has no split '{split}'; it has {sorted(index['splits'])}")
        entries = index["splits"][split]
        if not entries:
            raise LoaderError(
                f"split '{split}' of stage {ref.stage}/{ref.version} has no samples; "
                "add documents, or for 'val' raise tokenize.val_fraction"
            )
        files = [reader.local_path(entry["path"]) for entry in entries]
        loader = cls(
            files, index["seq_len"], batch_size, seed=seed, rank=rank, world_size=world_size,
            start_sample=start_sample, shuffle=shuffle, index=index, column=column,
        )
        expected = sum(entry["samples"] for entry in entries)
        if loader.num_samples != expected:
            raise LoaderError(f"split '{split}' of {ref.stage}/{ref.version}: index.json lists {expected} samples, the files hold {loader.num_samples}")
        return loader

    # ------------------------------------------------------------------ order

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def pad_id(self) -> int | None:
        return self.index.get("pad_id")

    @property
    def eos_id(self) -> int | None:
        return self.index.get("eos_id")

    def permutation(self, epoch: int) -> np.ndarray:
        """Sample indices in the order epoch `epoch` visits them."""
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # iteration needs at most the current and the next epoch
                self._permutations.pop(min(self._permutations))
            order = np.random.default_rng(self.seed + epoch).permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
            self._permutations[epoch] = order
        return self._permutations[epoch]

    def samples_at(self, positions: np.ndarray) -> np.ndarray:
        """Global stream positions -> sample indices."""
        epochs, offsets = np.divmod(np.asarray(positions, dtype=np.int64), self.num_samples)
        samples = np.empty_like(offsets)
        for epoch in np.unique(epochs).tolist():
            at = epochs == epoch
            samples[at] = self.permutation(epoch)[offsets[at]]
        return samples

    def step_samples(self, step_start: int) -> np.ndarray:
        """The sample indices of this rank's batch in the step starting at global position `step_start`."""
        first = step_start + self.rank * self.batch_size
        epoch, offset = divmod(first, self.num_samples)
        if offset + self.batch_size <= self.num_samples:  # the usual case: one slice of one epoch
            return self.permutation(epoch)[offset : offset + self.batch_size]
        return self.samples_at(np.arange(first, first + self.batch_size, dtype=np.int64))

    def rows(self, samples: np.ndarray) -> np.ndarray:
        """The token rows of the given sample indices, as int64 [len(samples), seq_len + 1]."""
        if self._window is None:
            return self.rows_reference(samples)
        window, starts = self._window
        return window[starts[samples]].astype(np.int64)

    def rows_reference(self, samples: np.ndarray) -> np.ndarray:
        """rows(), file by file: the plain implementation the fast path is tested against."""
        out = np.empty((len(samples), self.seq_len + 1), dtype=np.int64)
        block_ids = np.searchsorted(self._block_ends, samples, side="right")
        for block in np.unique(block_ids).tolist():
            at = block_ids == block
            out[at] = self.blocks[block][samples[at] - self._block_starts[block]]
        return out

    def batch_at(self, step_start: int) -> torch.Tensor:
        """This rank's batch of the step that starts at global position `step_start`: LongTensor [B, seq_len + 1]."""
        return torch.from_numpy(self.rows(self.step_samples(step_start)))

    # ------------------------------------------------------------------ iteration and resume

    def __iter__(self) -> "TokenLoader":
        return self

    def __next__(self) -> torch.Tensor:
        first = self.position + self.rank * self.batch_size
        epoch, offset = divmod(first, self.num_samples)
        if self._window is not None and offset + self.batch_size <= self.num_samples:
            # batch_at() inlined for the usual step (one slice of one epoch): per-call overhead
            # is a visible share of a step that only copies a few rows
            starts = self._epoch_starts.get(epoch)
            if starts is None:
                if len(self._epoch_starts) >= 2:
                    self._epoch_starts.pop(min(self._epoch_starts))
                starts = self._epoch_starts[epoch] = self._window[1][self.permutation(epoch)]
            batch = torch.from_numpy(self._window[0][starts[offset : offset + self.batch_size]].astype(np.int64))
        else:
            batch = self.batch_at(self.position)
        self.position += self.global_batch  # before returning: state_dict() names the next step
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"sample": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            self._permutations.clear()
            self._epoch_starts.clear()
        self.position, self.seed = int(state["sample"]), int(state["seed"])

    def eval_batches(self) -> Iterator[torch.Tensor]:
        """Every sample once, in file order, split across ranks like training steps.

        Every rank gets the same number of batches, ceil(N / (B*W)); near the end a rank's batch
        may be shorter or empty, so sum losses and token counts and all-reduce both.
        """
        for step_start in range(0, self.num_samples, self.global_batch):
            first = min(step_start + self.rank * self.batch_size, self.num_samples)
            last = min(first + self.batch_size, self.num_samples)
            yield torch.from_numpy(self.rows(np.arange(first, last, dtype=np.int64)))


def pin(batch: Any) -> Any:
    """A batch (a tensor, or a dict of them) in page-locked memory, so that
    ``.to("cuda", non_blocking=True)`` is an asynchronous copy; other values pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {key: pin(value) for key, value in batch.items()}
    return batch


class Prefetcher:
    """Any training loader (TokenLoader, SftLoader, PreferenceLoader) with its next batch made in a
    background thread while the current step runs, pinned when the batches go to a GPU::

        loader = Prefetcher(TokenLoader.from_stage(...), pin_memory=device.type == "cuda")
        batch = next(loader)                      # the same batches, in the same order
        state = loader.state_dict()               # names the next batch this wrapper will return
        loader.load_state_dict(state)             # drops the batch made ahead, continues from `state`

    The wrapped loader is only ever used by one thread at a time: a batch is drawn in the worker,
    and anything else (state, eval_batches, attributes) first waits for that draw to finish.
    """

    def __init__(self, loader, pin_memory: bool = False):
        from concurrent.futures import ThreadPoolExecutor

        self.loader, self.pin_memory = loader, pin_memory
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._ahead = None  # (the wrapped loader's state before the batch, future of the batch)

    def _draw(self):
        batch = next(self.loader)
        return pin(batch) if self.pin_memory else batch

    def _start(self) -> None:
        # the wrapped loader is idle here (no draw in flight), so its state is exact
        self._ahead = (self.loader.state_dict(), self._pool.submit(self._draw))

    def _settle(self) -> None:
        """Wait for a draw in flight (its error, if any, surfaces at the next __next__)."""
        if self._ahead is not None:
            self._ahead[1].exception()

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        if self._ahead is None:
            self._start()
        _, future = self._ahead
        batch = future.result()
        self._start()  # the next batch is drawn while the caller trains on this one
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The position of the next batch __next__ returns (the one drawn ahead, if any)."""
        if self._ahead is None:
            return self.loader.state_dict()
        return dict(self._ahead[0])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._settle()
        self._ahead = None
        self.loader.load_state_dict(state)

    def close(self) -> None:
        self._settle()
        self._ahead = None
        self._pool.shutdown(wait=True)

    def __getattr__(self, name: str):
        if name in ("loader", "_ahead", "_pool", "pin_memory"):  # not set yet (during __init__)
            raise AttributeError(name)
        self._settle()
        return getattr(self.loader, name)
