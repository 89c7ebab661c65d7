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

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from lmfoundry.infra.config import ComputeConfig, ExactDedupConfig
from lmfoundry.infra.docs import shard_name, doc_shards
from lmfoundry.infra.parallel import map_pending
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
        parts.append(pa.table({"hash": hashes, "shard": pa.array([i] * n, pa.int32()), "row": pa.array(range(n), pa.int64())}))
    table = pa.concat_tables(parts) if parts else pa.table({"hash": pa.array([], pa.binary(16)), "shard": pa.array([], pa.int32()), "row": pa.array([], pa.int64())})
    table = table.append_column("order", pa.array(range(table.num_rows), pa.int64()))
    first = table.group_by("hash").aggregate([("order", "min")]).rename_columns(["hash", "keeper_order"])
    joined = table.join(first, "hash").sort_by([("order", "ascending")])
    return joined


def write_shard(out: StageDir, shards: list[tuple[StageRef, str]], keepers: pa.Table, index: int) -> None:
    ref, path = shards[index]
    docs = out.store.reader(ref).read_table(path)
    mine = keepers.filter(pc.equal(keepers["shard"], index))
    keep_mask = pc.equal(mine["order"], mine["keeper_order"])
    out.write_table(shard_name(index), docs.filter(keep_mask))
    removed = docs.filter(pc.invert(keep_mask)).select(["id", "url", "source"])
    keeper_ids = keepers.take(mine.filter(pc.invert(keep_mask))["keeper_order"])
    out.write_table(shard_name(index, "removed/"), removed.append_column("keeper", _ids_of(out, shards, keeper_ids)))


def _ids_of(out: StageDir, shards, rows: pa.Table) -> pa.Array:
    """Document ids at the given (shard, row) positions."""
    ids = []
    cache: dict[int, list[str]] = {}
    for shard, row in zip(rows["shard"].to_pylist(), rows["row"].to_pylist()):
        if shard not in cache:
            ref, path = shards[shard]
            cache[shard] = out.store.reader(ref).read_table(path, columns=["id"]).column("id").to_pylist()
        ids.append(cache[shard][row])
    return pa.array(ids, pa.string())


def run_exact_dedup(cfg: ExactDedupConfig, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> ExactDedupStats:
    shards = doc_shards(out.store, inputs)
    map_pending(partial(hash_shard, cfg, out, shards), len(shards), lambda i: shard_name(i, "hashes/"), out, compute, "hash")
    keepers = choose_keepers(out, len(shards))
    map_pending(partial(write_shard, out, shards, keepers), len(shards), shard_name, out, compute, "write")
    kept = pc.sum(pc.equal(keepers["order"], keepers["keeper_order"])).as_py() or 0
    groups = keepers.filter(pc.not_equal(keepers["order"], keepers["keeper_order"]))
    return ExactDedupStats(
        docs_in=keepers.num_rows,
        docs_out=kept,
        duplicates_removed=keepers.num_rows - kept,
        duplicate_groups=len(set(groups["keeper_order"].to_pylist())),
    )
