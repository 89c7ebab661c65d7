"""MinHash LSH clustering for near_dedup (steps 2-4 of tasks/dedup/near_dedup.py): band groups,
connected components with a vectorised union-find, and keepers verified against each member."""
from __future__ import annotations

import io
import json
import math
import posixpath
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmfoundry.infra.config import NearDedupConfig
from lmfoundry.infra.docs import shard_name
from lmfoundry.infra.store import StageDir
from lmfoundry.tasks.dedup import minhash

COMPONENTS_INDEX = "components/index.json"
SIGS_ROW_GROUP_BYTES = 2**20  # shingle-set bytes per row group of sigs/ files
SIGS_ROW_GROUP_ROWS = 1024


# --------------------------------------------------------------------------- hash-table files


def write_hash_table(out: StageDir, relpath: str, table: pa.Table, row_bytes: np.ndarray | None = None, **extra: Any) -> None:
    """Parquet without compression or dictionaries: random hashes gain nothing from either,
    and trying costs more than the hashing did. With `row_bytes`, row groups hold about
    SIGS_ROW_GROUP_BYTES each, so the cluster step reads little beyond the documents it needs."""
    sink = io.BytesIO()
    with pq.ParquetWriter(sink, table.schema, compression="none", use_dictionary=False, write_statistics=False) as writer:
        if row_bytes is None:
            writer.write_table(table)
        else:
            for lo, hi in _row_groups(row_bytes, table.num_rows):
                writer.write_table(table.slice(lo, hi - lo), row_group_size=max(hi - lo, 1))
    out.write_bytes(relpath, sink.getvalue(), rows=table.num_rows, **extra)


def _row_groups(row_bytes: np.ndarray, rows: int) -> list[tuple[int, int]]:
    if rows == 0:
        return [(0, 0)]
    group = (np.concatenate(([0], np.cumsum(row_bytes)[:-1])) // SIGS_ROW_GROUP_BYTES).astype(np.int64)
    group = np.maximum(group, np.arange(rows) // SIGS_ROW_GROUP_ROWS)  # and never too many rows
    group = np.maximum.accumulate(group)
    cuts = np.flatnonzero(np.diff(group)) + 1
    bounds = np.concatenate(([0], cuts, [rows]))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def _bucket_path(partition: int, shard: int) -> str:
    return f"buckets/p-{partition:05d}/part-{shard:05d}.parquet"


# --------------------------------------------------------------------------- step 2: band groups


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique for large arrays (numpy's own is many times slower here than a sort)."""
    values = np.sort(values)
    return values[np.concatenate(([True], values[1:] != values[:-1]))] if len(values) else values


def band_groups(keys: np.ndarray, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (key, doc) rows of band keys shared by at least two documents, sorted by key then doc."""
    order = np.lexsort((docs, keys))
    keys, docs = keys[order], docs[order]
    if len(keys) == 0:
        return keys, docs
    first = np.concatenate(([True], keys[1:] != keys[:-1]))
    last = np.concatenate((keys[1:] != keys[:-1], [True]))
    shared = ~(first & last)
    return keys[shared], docs[shared]


def star_edges(keys: np.ndarray, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each band group as edges from its first document to the others: k-1 edges, not k^2."""
    if len(keys) == 0:
        return docs, docs
    first = np.concatenate(([True], keys[1:] != keys[:-1]))
    head = docs[np.flatnonzero(first)[np.cumsum(first) - 1]]
    other = ~first & (docs != head)
    return head[other], docs[other]


def groups_partition(out: StageDir, plan: dict[str, Any], partition: int) -> None:
    keys, docs = [np.zeros(0, np.uint64)], [np.zeros(0, np.int64)]
    for s in range(len(plan["shards"])):
        table = out.read_table(_bucket_path(partition, s))
        keys.append(table.column("key").to_numpy())
        docs.append(table.column("doc").to_numpy())
    keys, docs = band_groups(np.concatenate(keys), np.concatenate(docs))
    write_hash_table(out, shard_name(partition, "groups/"), pa.table({"key": keys, "doc": docs}))


def _groups(out: StageDir, partition: int) -> tuple[np.ndarray, np.ndarray]:
    table = out.read_table(shard_name(partition, "groups/"))
    return table.column("key").to_numpy(), table.column("doc").to_numpy()


# --------------------------------------------------------------------------- step 3: components


def union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Connect a[i] with b[i] for all i in a forest where every node points below itself.

    Vectorised union-find: hook the larger root under the smaller one, compress every path
    fully, repeat until each pair shares a root.
    """
    while True:
        _compress(parent)
        ra, rb = parent[a], parent[b]
        apart = ra != rb
        if not apart.any():
            return
        lo, hi = np.minimum(ra[apart], rb[apart]), np.maximum(ra[apart], rb[apart])
        np.minimum.at(parent, hi, lo)


def _compress(parent: np.ndarray) -> None:
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return
        parent[:] = grand


def member_bytes(cfg: NearDedupConfig, out: StageDir, plan: dict[str, Any], nodes: np.ndarray) -> np.ndarray:
    """About how much memory each candidate document needs in the cluster step."""
    shingles = np.zeros(len(nodes), np.int64)
    for s, shard in enumerate(plan["shards"]):
        lo, hi = np.searchsorted(nodes, [shard["offset"], shard["offset"] + shard["rows"]])
        if hi > lo:
            counts = pa.concat_tables(_read_rows(out, shard_name(s, "sigs/"), nodes[lo:hi] - shard["offset"], ["shingles"]))
            shingles[lo:hi] = counts.column("shingles").to_numpy()
    return shingles * (8 if cfg.verify else 0) + cfg.num_perm * 4 + 64


def cluster_partitions(component_root: np.ndarray, weight: np.ndarray, budget: int) -> tuple[np.ndarray, int]:
    """Assign whole components to partitions of about `budget` total weight.

    Components are laid out in a hashed (deterministic, size-independent) order and cut every
    `budget`; a partition exceeds it by at most one component. Returns (partition per node, count).
    """
    if len(component_root) == 0:
        return np.zeros(0, np.int64), 1
    roots, node_root = np.unique(component_root, return_inverse=True)
    per_root = np.bincount(node_root, weights=weight)
    order = np.argsort(minhash.fmix64(roots.astype(np.uint64)), kind="stable")
    before = np.concatenate(([0.0], np.cumsum(per_root[order])[:-1]))
    part_of_root = np.empty(len(roots), np.int64)
    part_of_root[order] = (before // budget).astype(np.int64)
    used = sorted_unique(part_of_root)
    part_of_root = np.searchsorted(used, part_of_root)  # no empty partitions
    return part_of_root[node_root], len(used)


def find_components(cfg: NearDedupConfig, out: StageDir, plan: dict[str, Any]) -> dict[str, Any]:
    """Connected components of the candidate graph, split into cluster partitions (once)."""
    if out.done(COMPONENTS_INDEX):
        return json.loads(out.read_bytes(COMPONENTS_INDEX))
    return compute_components(cfg, out, plan)


def compute_components(cfg: NearDedupConfig, out: StageDir, plan: dict[str, Any]) -> dict[str, Any]:
    nodes = np.zeros(0, np.int64)
    memberships = groups = 0
    for p in range(plan["bucket_partitions"]):
        keys, docs = _groups(out, p)
        memberships += len(keys)
        groups += int((keys[1:] != keys[:-1]).sum()) + 1 if len(keys) else 0
        nodes = np.union1d(nodes, docs)
    parent = np.arange(len(nodes))
    for p in range(plan["bucket_partitions"]):
        a, b = star_edges(*_groups(out, p))
        union(parent, np.searchsorted(nodes, a), np.searchsorted(nodes, b))
    _compress(parent)
    component = nodes[parent]  # each component is named by its first document
    sizes = np.bincount(parent, minlength=len(nodes)) if len(nodes) else np.zeros(0, np.int64)
    part_of, partitions = cluster_partitions(parent, member_bytes(cfg, out, plan, nodes), cfg.cluster_partition_bytes)
    for q in range(partitions):
        mine = part_of == q
        out.write_table(shard_name(q, "components/"), pa.table({"doc": nodes[mine], "component": component[mine]}))
    index = {
        "partitions": partitions,
        "band_groups": int(groups),
        "group_memberships": int(memberships),
        "candidate_docs": int(len(nodes)),
        "components": int((sizes > 0).sum()),
        "largest_component": int(sizes.max()) if len(sizes) else 0,
    }
    out.write_json(COMPONENTS_INDEX, index)
    return index


# --------------------------------------------------------------------------- step 4: clusters


class Members:
    """The documents of one cluster partition: ids, keeper order, similarity data, band groups."""

    def __init__(self, docs: np.ndarray, component: np.ndarray, info: pa.Table, cfg: NearDedupConfig):
        self.docs, self.component = docs, component
        self.ids = info.column("id").to_pylist()
        self.length = info.column("length").to_numpy()
        self.quality = info.column("quality").to_numpy(zero_copy_only=False)
        self.signatures = _fixed_list_numpy(info.column("signature"), cfg.num_perm)
        self.sets = sets_from_arrow(info.column("shingle_set")) if cfg.verify else None
        # exact Jaccard only when the estimate is within 4.5 standard deviations (of an
        # estimate at the threshold) below it: a pair at the threshold is missed ~3e-6 times
        self.estimate_margin = 4.5 * math.sqrt(cfg.threshold * (1 - cfg.threshold) / cfg.num_perm)
        self.exact_comparisons = 0
        self.group_members = self.doc_groups = np.zeros(0, np.int64)
        self.group_indptr = np.zeros(1, np.int64)
        self.doc_indptr = np.zeros(len(docs) + 1, np.int64)

    def set_groups(self, keys: np.ndarray, positions: np.ndarray) -> None:
        """Band groups as (key, member position) rows sorted by key: CSR both ways."""
        starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1]))) if len(keys) else np.zeros(0, np.int64)
        self.group_members = positions
        self.group_indptr = np.concatenate((starts, [len(keys)]))
        group_of_row = np.repeat(np.arange(len(starts)), np.diff(self.group_indptr))
        order = np.argsort(positions, kind="stable")
        self.doc_groups = group_of_row[order]
        self.doc_indptr = np.searchsorted(positions[order], np.arange(len(self.docs) + 1))

    def colliding(self, frontier: np.ndarray) -> np.ndarray:
        """Members that share a band with any frontier member (LSH candidates), sorted."""
        groups = self.doc_groups[minhash.gather_ranges(self.doc_indptr[frontier], self.doc_indptr[frontier + 1])]
        return sorted_unique(self.group_members[minhash.gather_ranges(self.group_indptr[groups], self.group_indptr[groups + 1])])

    def similarity(self, k: int, others: np.ndarray, threshold: float) -> np.ndarray:
        """Similarity of member k with each of others: exact Jaccard (verify) or the MinHash estimate."""
        estimate = minhash.estimated_jaccard_one_to_many(self.signatures, k, others)
        if self.sets is None:
            return estimate
        close = estimate >= threshold - self.estimate_margin
        self.exact_comparisons += int(close.sum())
        exact = estimate.copy()
        exact[close] = minhash.jaccard_one_to_many(self.sets, k, others[close])
        return exact

    def keeper_order(self, policy: str) -> np.ndarray:
        """Member positions sorted by component, then keeper preference, then input order."""
        if policy == "longest":
            return np.lexsort((self.docs, -self.length, self.component))
        if policy == "quality":
            score = np.where(np.isnan(self.quality), np.inf, -self.quality)  # missing ranks last
            return np.lexsort((self.docs, score, self.component))
        return np.lexsort((self.docs, self.component))


def _fixed_list_numpy(column: pa.ChunkedArray, width: int) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.flatten().to_numpy().reshape(-1, width)


def sets_to_arrow(sets: minhash.ShingleSets) -> pa.LargeBinaryArray:
    """One binary value per document: its sorted uint64 hashes, little endian. Cheaper to
    write and read back (no list levels to decode) than a list<uint64> column."""
    offsets = pa.py_buffer((sets.offsets * 8).astype("<i8"))
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(sets), [None, offsets, pa.py_buffer(sets.hashes.astype("<u8"))])


def sets_from_arrow(column: pa.ChunkedArray | pa.LargeBinaryArray) -> minhash.ShingleSets:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return minhash.ShingleSets(np.zeros(0, np.uint64), np.zeros(1, np.int64))
    _, offsets, data = arr.buffers()
    offsets = np.frombuffer(offsets, "<i8")[arr.offset : arr.offset + len(arr) + 1]
    hashes = np.frombuffer(data, np.uint8)[offsets[0] : offsets[-1]].view("<u8")
    return minhash.ShingleSets(hashes.astype(np.uint64, copy=False), (offsets - offsets[0]) // 8)


def load_members(cfg: NearDedupConfig, out: StageDir, plan: dict[str, Any], partition: int) -> Members:
    comp = out.read_table(shard_name(partition, "components/"))
    docs, component = comp.column("doc").to_numpy(), comp.column("component").to_numpy()
    columns = ["id", "length", "quality", "signature"] + (["shingle_set"] if cfg.verify else [])
    parts = []
    for s, shard in enumerate(plan["shards"]):
        lo, hi = np.searchsorted(docs, [shard["offset"], shard["offset"] + shard["rows"]])
        if hi > lo:
            parts.extend(_read_rows(out, shard_name(s, "sigs/"), docs[lo:hi] - shard["offset"], columns))
    info = pa.concat_tables(parts) if parts else _empty_sigs(cfg)
    members = Members(docs, component, info, cfg)
    group_keys, positions = [np.zeros(0, np.uint64)], [np.zeros(0, np.int64)]
    for p in range(plan["bucket_partitions"]):
        keys, group_docs = _groups(out, p)
        # a band group lies inside one component, so it belongs to this partition whole or not at all
        mine = np.isin(group_docs, docs, kind="sort") if len(group_docs) else np.zeros(0, bool)
        group_keys.append(keys[mine])
        positions.append(np.searchsorted(docs, group_docs[mine]))
    members.set_groups(np.concatenate(group_keys), np.concatenate(positions))
    return members


def _read_rows(out: StageDir, relpath: str, rows: np.ndarray, columns: list[str]) -> list[pa.Table]:
    """The given (sorted) rows of a Parquet file, reading only the row groups that hold them."""
    with out.store.fs.open(posixpath.join(out.path, relpath), "rb") as fh:
        parquet = pq.ParquetFile(fh)
        starts = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
        group_of = np.searchsorted(starts, rows, side="right") - 1
        tables = []
        for g in np.unique(group_of).tolist():
            mine = rows[group_of == g] - starts[g]
            tables.append(parquet.read_row_group(g, columns=columns).take(pa.array(mine)))
        return tables


def _empty_sigs(cfg: NearDedupConfig) -> pa.Table:
    cols = {
        "id": pa.array([], pa.string()),
        "length": pa.array([], pa.int64()),
        "quality": pa.array([], pa.float64()),
        "signature": pa.FixedSizeListArray.from_arrays(pa.array([], pa.uint32()), cfg.num_perm),
    }
    if cfg.verify:
        cols["shingle_set"] = pa.array([], pa.large_binary())
    return pa.table(cols)


def choose_keepers(members: Members, policy: str, threshold: float) -> dict[str, Any]:
    """Keeper-centred clustering in keeper order (see the module docstring).

    The first open member becomes a keeper; its LSH candidates are compared with it; those
    similar enough are removed into its cluster, and their own candidates are compared with
    the keeper in turn (never with each other), until no new member is close enough.
    Returns per member its keeper's position (itself for a keeper) and its similarity with
    the keeper, plus counts.
    """
    n = len(members.docs)
    keeper = np.arange(n)
    similarity = np.ones(n)
    open_ = np.ones(n, bool)
    seen_by = np.full(n, -1)  # the keeper that already compared this member
    comparisons = rejected = 0
    for k in members.keeper_order(policy).tolist():
        if not open_[k]:
            continue
        open_[k] = False
        frontier = np.array([k])
        while len(frontier):
            near = members.colliding(frontier)
            near = near[open_[near] & (seen_by[near] != k)]
            if not len(near):
                break
            seen_by[near] = k
            sim = members.similarity(k, near, threshold)
            close = sim >= threshold
            comparisons += len(near)
            rejected += int((~close).sum())
            frontier = near[close]
            open_[frontier] = False
            keeper[frontier] = k
            similarity[frontier] = sim[close]
    return {
        "keeper": keeper,
        "similarity": similarity,
        "comparisons": comparisons,
        "exact_comparisons": members.exact_comparisons,
        "rejected": rejected,
    }


def cluster_partition(cfg: NearDedupConfig, out: StageDir, plan: dict[str, Any], partition: int) -> None:
    members = load_members(cfg, out, plan, partition)
    result = choose_keepers(members, cfg.keeper, cfg.threshold)
    keeper = result["keeper"]
    removed = keeper != np.arange(len(keeper))
    in_cluster = removed.copy()
    in_cluster[keeper[removed]] = True
    rows = np.flatnonzero(in_cluster)  # keepers that removed something, and the removed
    ids = members.ids
    sizes = np.bincount(keeper[rows], minlength=len(keeper))
    table = pa.table(
        {
            "doc": members.docs[rows],
            "id": pa.array([ids[i] for i in rows.tolist()], pa.string()),
            "cluster": members.docs[keeper[rows]],
            "keeper_id": pa.array([ids[i] for i in keeper[rows].tolist()], pa.string()),
            "similarity": result["similarity"][rows],
            "removed": removed[rows],
            "cluster_size": sizes[keeper[rows]],
        }
    )
    counts = {
        "comparisons": result["comparisons"],
        "exact_comparisons": result["exact_comparisons"],
        "rejected": result["rejected"],
        "removed": int(removed.sum()),
        "cluster_sizes": sorted(Counter(sizes[sizes > 1].tolist()).items()),
    }
    out.write_table(shard_name(partition, "clusters/"), table, counts=counts)
