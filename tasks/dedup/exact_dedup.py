"""Stage `exact_dedup`: drop documents whose normalised text was seen before.

Three resumable steps, each file marked when complete:
1. per input shard, a 128-bit hash of every document's normalised text (``hashes/``);
2. one vectorised pass over all hashes (Arrow group-by) picks the keeper of each group:
   the first occurrence in input order, so the result never depends on worker count;
3. per input shard, the kept documents (``data/``) and the removed ones with the id of
   their keeper (``removed/``), so nothing silently vanishes.

Memory is ~40 bytes per document in step 2 (hash + index), never the texts.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from lmfoundry.infra.config import ComputeConfig, ExactDedupConfig
from lmfoundry.infra.docs import shard_name, doc_shards
from lmfoundry.infra.parallel import map_pending, map_shards, progress
from lmfoundry.infra.store import StageDir, StageRef

CODE_VERSION = "1"

_WHITESPACE = re.compile(r"\s+")


class ExactDedupStats(BaseModel):
    docs_in: int
    docs_out: int
    duplicates_removed: int
    duplicate_groups: int


def normalize(text: str, mode: str) -> str:
    if mode == "none":
        return text
    if mode == "nfkc_lower_whitespace":
        text = unicodedata.normalize("NFKC", text)
    if mode in ("lower_whitespace", "nfkc_lower_whitespace"):
        text = text.lower()
    return _WHITESPACE.sub(" ", text).strip()


def text_hash(text: str, mode: str) -> bytes:
    return hashlib.blake2b(normalize(text, mode).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def hash_shard(cfg: ExactDedupConfig, out: StageDir, shards: list[tuple[StageRef, str]], index: int) -> None:
    ref, path = shards[index]
    texts = out.store.reader(ref).read_table(path, columns=["text"]).column("text").to_pylist()
    hashes = pa.array([text_hash(t, cfg.normalize) for t in texts], type=pa.binary(16))
    out.write_table(shard_name(index, "hashes/"), pa.table({"hash": hashes}))


def choose_keepers(out: StageDir, n_shards: int) -> pa.Table:
    """Per document (shard, row): the global index of its group's first occurrence."""
    parts = []
    for i in range(n_shards):
        hashes = out.read_table(shard_name(i, "hashes/")).column("hash")
        n = len(hashes)
        parts.append(pa.table({"hash": hashes, "shard": np.full(n, i, np.int32), "row": np.arange(n, dtype=np.int64)}))
    table = pa.concat_tables(parts) if parts else pa.table({"hash": pa.array([], pa.binary(16)), "shard": pa.array([], pa.int32()), "row": pa.array([], pa.int64())})
    table = table.append_column("order", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    first = table.group_by("hash").aggregate([("order", "min")]).rename_columns(["hash", "keeper_order"])
    joined = table.join(first, "hash").sort_by([("order", "ascending")])
    return joined


def shard_decisions(out: StageDir, shards: list[tuple[StageRef, str]], keepers: pa.Table) -> list[tuple[int, np.ndarray, list[str]]]:
    """Per input shard i: (i, keep mask of its rows, the keeper's id for each removed row).

    Each shard's task gets only its own slice: a worker process or Dask task is sent a few
    bytes per document, never the corpus's table; and each shard's ids are read once here,
    not once by every shard whose duplicates it keeps (both made the cost per document grow
    with the corpus)."""
    n_shards = len(shards)
    shard = keepers["shard"].to_numpy()
    row = keepers["row"].to_numpy()
    keeper = keepers["keeper_order"].to_numpy()  # rows are in global order: position == order
    keep = keeper == np.arange(len(keeper))
    gone = np.flatnonzero(~keep)
    keeper_ids = np.empty(len(gone), object)
    gone_shard, gone_row = shard[keeper[gone]], row[keeper[gone]]
    for s in np.unique(gone_shard).tolist():
        ref, path = shards[s]
        ids = out.store.reader(ref).read_table(path, columns=["id"]).column("id").to_numpy(zero_copy_only=False)
        mine = gone_shard == s
        keeper_ids[mine] = ids[gone_row[mine]]
    bounds = np.searchsorted(shard, np.arange(n_shards + 1))
    gone_bounds = np.searchsorted(shard[gone], np.arange(n_shards + 1))
    return [(i, keep[bounds[i] : bounds[i + 1]], keeper_ids[gone_bounds[i] : gone_bounds[i + 1]].tolist()) for i in range(n_shards)]


def write_shard(out: StageDir, shards: list[tuple[StageRef, str]], decision: tuple[int, np.ndarray, list[str]]) -> None:
    index, keep, keeper_ids = decision
    ref, path = shards[index]
    docs = out.store.reader(ref).read_table(path)
    keep_mask = pa.array(keep)
    out.write_table(shard_name(index), docs.filter(keep_mask))
    removed = docs.filter(pc.invert(keep_mask)).select(["id", "url", "source"])
    out.write_table(shard_name(index, "removed/"), removed.append_column("keeper", pa.array(keeper_ids, pa.string())))


def run_exact_dedup(cfg: ExactDedupConfig, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> ExactDedupStats:
    shards = doc_shards(out.store, inputs)
    map_pending(partial(hash_shard, cfg, out, shards), len(shards), lambda i: shard_name(i, "hashes/"), out, compute, "hash")
    keepers = choose_keepers(out, len(shards))
    pending = [d for d in shard_decisions(out, shards, keepers) if not out.done(shard_name(d[0]))]
    map_shards(partial(write_shard, out, shards), progress(pending, compute, "exact_dedup write"), compute)
    kept = pc.sum(pc.equal(keepers["order"], keepers["keeper_order"])).as_py() or 0
    groups = keepers.filter(pc.not_equal(keepers["order"], keepers["keeper_order"]))
    return ExactDedupStats(
        docs_in=keepers.num_rows,
        docs_out=kept,
        duplicates_removed=keepers.num_rows - kept,
        duplicate_groups=len(set(groups["keeper_order"].to_pylist())),
    )
