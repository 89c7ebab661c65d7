"""Stage `near_dedup`: remove near-duplicate documents with MinHash LSH, without chaining.

Run alone: ``lmf run --until near_dedup`` (settings: the ``near_dedup`` config section).

Five resumable steps; every file is marked when complete, so a run that stops resumes at
the next unmarked file. Each step holds one input shard or one partition at a time:

1. ``sigs/part-S.parquet`` per input shard S: each document's MinHash signature
   (tasks/dedup/minhash.py: datasketch's hash and permutation scheme, vectorised), its shingle
   hash set (for exact verification), length and quality score; and its LSH band keys,
   split by key into ``buckets/p-P/part-S.parquet`` for P bucket partitions. Bands x rows
   come from the threshold and the false positive / negative weights (datasketch's
   optimiser) unless set; the S-curve probability at the threshold is in the stats.
2. ``groups/part-P.parquet`` per bucket partition: the band keys that two or more documents
   share, with their documents (the LSH candidates).
3. ``components/``: connected components of the candidate graph (a vectorised union-find
   over the band groups as stars, one file at a time), cut into Q cluster partitions of
   about ``cluster_partition_bytes`` each (whole components).
4. ``clusters/part-Q.parquet`` per cluster partition: the keeper and removals of each
   component (below): one row per member of a cluster that removed something, with its
   cluster id (the keeper's input position), keeper id, similarity and cluster size.
5. ``data/part-S.parquet`` (kept documents, input order) and ``removed/part-S.parquet``
   (the removed documents whole, with reason, cluster, keeper_id and similarity);
   ``clusters/summary.json`` (cluster count and size histogram).

Why not "one keeper per connected component" (datatrove)? Candidates chain: A~B and B~C
put A and C in one component even when A and C share little, and removing C for A is a bad
removal. Here a document is removed only if its own similarity with the document that
stays for it reaches the threshold: within a component, documents are visited in keeper
order (first seen, longest, or highest quality; then input order). The first open one
becomes a keeper; its LSH candidates are compared with it (exact Jaccard of the shingle
sets with ``verify``, else the MinHash estimate); those at or above the threshold are
removed into its cluster, and *their* candidates are compared with the keeper too, and so
on: the cluster grows along verified edges but every member is checked against the keeper
itself. Documents that fail stay open and are clustered again around the next keeper.
So every removal is verified against a surviving keeper (no chaining), no two survivors
that are LSH candidates of each other are near-duplicates, and near-duplicates of a
near-duplicate are found even when LSH missed their pair. The work is bounded by the LSH
candidate pairs (a keeper checks each document once), each checked with the cheap MinHash
estimate first and with exact Jaccard only near the threshold.

Memory: step 1 holds one input shard (its text and shingle sets); step 2 one bucket
partition (``bucket_partition_rows``); step 4 one cluster partition (whole components, so
one giant component can exceed the budget). Step 3 keeps a few arrays of 8-byte integers
per candidate document (one sharing a band with another; never per corpus document or per
pair) and streams the band-group files.

Determinism: document numbers are global input positions and every order is sorted on
them, so the same input gives byte-identical files, and splitting the same documents into
a different number of shards gives the same survivors, clusters and keepers.
"""
from __future__ import annotations

import io
import json
import logging
import math
import posixpath
from collections import Counter
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel

from lmfoundry.infra.config import ComputeConfig, NearDedupConfig
from lmfoundry.infra.docs import DATA_PREFIX, shard_name
from lmfoundry.infra.parallel import map_pending
from lmfoundry.infra.store import StageDir, StageRef
from lmfoundry.tasks.dedup import minhash

CODE_VERSION = "1"
log = logging.getLogger("lmfoundry.near_dedup")

PLAN = "plan.json"
COMPONENTS_INDEX = "components/index.json"
SUMMARY = "clusters/summary.json"
MISSING_TEXT = "missing_text"
SIGS_ROW_GROUP_BYTES = 2**20  # shingle-set bytes per row group of sigs/ files
SIGS_ROW_GROUP_ROWS = 1024
NEAR_DUPLICATE = "near_duplicate"


class NearDedupStats(BaseModel):
    docs_in: int
    docs_out: int
    removed: dict[str, int]  # by reason: near_duplicate, missing_text
    unshingled: int  # kept without a signature: no word in the text
    lsh: dict[str, Any]  # num_perm, bands, rows, threshold, S-curve probability and areas
    band_groups: int  # band keys shared by two or more documents
    group_memberships: int
    candidate_docs: int  # documents sharing at least one band key with another
    components: int  # connected groups of candidates
    largest_component: int
    comparisons: int  # keeper-vs-candidate similarity checks (MinHash estimate)
    exact_comparisons: int  # of those, the ones close enough to compute exact Jaccard (verify)
    rejected: int  # compared but below the threshold: LSH candidates that stay
    clusters: int  # clusters with at least one removal
    largest_cluster: int
    cluster_sizes: dict[str, int]  # histogram: "2", "3-4", "5-8", ...
    partitions: dict[str, int]


# --------------------------------------------------------------------------- the plan


def doc_inputs(out: StageDir, inputs: list[StageRef]) -> list[dict[str, Any]]:
    """Every input document shard in order, with its row count and global first document number."""
    shards, offset = [], 0
    for ref_index, ref in enumerate(inputs):
        reader = out.store.reader(ref)
        for path in reader.files(DATA_PREFIX, ".parquet"):
            rows = reader.manifest["files"][path].get("rows")
            if rows is None:
                rows = pq.ParquetFile(reader.local_path(path)).metadata.num_rows
            shards.append({"ref": ref_index, "path": path, "rows": int(rows), "offset": offset})
            offset += int(rows)
    return shards


def make_plan(cfg: NearDedupConfig, out: StageDir, inputs: list[StageRef]) -> dict[str, Any]:
    """Shard layout and LSH layout, fixed once per stage version so a resumed run reuses it."""
    if out.done(PLAN):
        return json.loads(out.read_bytes(PLAN))
    shards = doc_inputs(out, inputs)
    docs = sum(s["rows"] for s in shards)
    if cfg.bands is not None:
        bands, rows = cfg.bands, cfg.rows
    else:
        bands, rows = minhash.choose_bands(cfg.threshold, cfg.num_perm, cfg.false_positive_weight, cfg.false_negative_weight)
    plan = {
        "shards": shards,
        "docs": docs,
        "bands": bands,
        "rows": rows,
        "bucket_partitions": max(1, math.ceil(docs * bands / cfg.bucket_partition_rows)),
    }
    out.write_json(PLAN, plan)
    return plan


def lsh_summary(cfg: NearDedupConfig, plan: dict[str, Any]) -> dict[str, Any]:
    bands, rows = plan["bands"], plan["rows"]
    fp_area, fn_area = minhash.s_curve_areas(cfg.threshold, bands, rows)
    return {
        "num_perm": cfg.num_perm,
        "bands": bands,
        "rows": rows,
        "threshold": cfg.threshold,
        "p_collision_at_threshold": round(minhash.collision_probability(cfg.threshold, bands, rows), 6),
        "false_positive_area": round(fp_area, 6),
        "false_negative_area": round(fn_area, 6),
        "false_positive_weight": cfg.false_positive_weight,
        "false_negative_weight": cfg.false_negative_weight,
    }


def _input_table(out: StageDir, inputs: list[StageRef], shard: dict[str, Any], columns: list[str] | None = None) -> pa.Table:
    ref = inputs[shard["ref"]]
    try:
        return out.store.reader(ref).read_table(shard["path"], columns=columns)
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise RuntimeError(
            f"near_dedup: cannot read input shard {shard['path']} of stage {ref.stage}/{ref.version} ({exc}); "
            f"check the store, or run the {ref.stage} stage again (lmf run --force {ref.stage})"
        ) from exc


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


# --------------------------------------------------------------------------- step 1: signatures


def quality_scores(meta: list[str | None], field: str) -> np.ndarray:
    """meta[field] as float per document; NaN when absent or not a number."""
    out = np.full(len(meta), np.nan)
    for i, raw in enumerate(meta):
        try:
            value = json.loads(raw).get(field) if raw else None
        except (ValueError, AttributeError):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[i] = float(value)
    return out


def _batches(lengths: np.ndarray, batch_bytes: int) -> list[tuple[int, int]]:
    bounds, start, size = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if size and size + n > batch_bytes:
            bounds.append((start, i))
            start, size = i, 0
        size += n
    if start < len(lengths):
        bounds.append((start, len(lengths)))
    return bounds


def signature_shard(cfg: NearDedupConfig, out: StageDir, inputs: list[StageRef], plan: dict[str, Any], index: int) -> None:
    shard = plan["shards"][index]
    columns = ["id", "text"] + (["meta"] if cfg.keeper == "quality" else [])
    table = _input_table(out, inputs, shard, columns)
    raw_texts = table.column("text").to_pylist()
    missing = np.array([t is None for t in raw_texts], bool)
    texts = ["" if t is None else t for t in raw_texts]
    lengths = np.fromiter(map(len, texts), np.int64, len(texts))
    sig_parts, set_parts = [], []
    for lo, hi in _batches(lengths, cfg.batch_bytes):
        sets = minhash.shingle_sets(texts[lo:hi], cfg.ngram)
        sig_parts.append(minhash.signatures(sets, cfg.num_perm, cfg.seed))
        set_parts.append(sets)
    sigs = np.concatenate(sig_parts) if sig_parts else np.zeros((0, cfg.num_perm), np.uint32)
    sizes = np.concatenate([s.sizes() for s in set_parts]) if set_parts else np.zeros(0, np.int64)
    docs = np.arange(shard["offset"], shard["offset"] + len(texts), dtype=np.int64)

    # documents without any shingle get no band key: they are nobody's near-duplicate
    has_band = sizes > 0
    keys = minhash.band_keys(sigs[has_band], plan["bands"], plan["rows"]).ravel()
    key_docs = np.repeat(docs[has_band], plan["bands"])
    partitions = plan["bucket_partitions"]
    part_of = keys % np.uint64(partitions)
    for p in range(partitions):
        mine = part_of == p
        write_hash_table(out, _bucket_path(p, index), pa.table({"key": keys[mine], "doc": key_docs[mine]}))

    quality = quality_scores(table.column("meta").to_pylist(), cfg.quality_field) if cfg.keeper == "quality" else np.full(len(texts), np.nan)
    sig_columns = {
        "doc": docs,
        "id": table.column("id"),
        "length": lengths,
        "quality": quality,
        "shingles": sizes,
        "signature": pa.FixedSizeListArray.from_arrays(pa.array(sigs.ravel()), cfg.num_perm),
    }
    if cfg.verify:
        hashes = np.concatenate([s.hashes for s in set_parts]) if set_parts else np.zeros(0, np.uint64)
        offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        sig_columns["shingle_set"] = sets_to_arrow(minhash.ShingleSets(hashes, offsets))
    # written last: its marker says the shard's bucket files are complete too
    write_hash_table(out, shard_name(index, "sigs/"), pa.table(sig_columns), row_bytes=sizes * 8, unshingled=int(((sizes == 0) & ~missing).sum()))


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


# --------------------------------------------------------------------------- step 5: filter


def filter_shard(out: StageDir, inputs: list[StageRef], plan: dict[str, Any], partitions: int, index: int) -> None:
    shard = plan["shards"][index]
    lo, hi = shard["offset"], shard["offset"] + shard["rows"]
    decided = []
    for q in range(partitions):
        t = out.read_table(shard_name(q, "clusters/"))
        doc = t.column("doc")
        decided.append(t.filter(pc.and_(pc.and_(pc.greater_equal(doc, lo), pc.less(doc, hi)), t.column("removed"))))
    removals = pa.concat_tables(decided).sort_by("doc") if decided else None
    docs = _input_table(out, inputs, shard)
    reason = np.full(len(docs), "", object)
    cluster = np.full(len(docs), -1, np.int64)
    keeper_id = np.full(len(docs), None, object)
    similarity = np.full(len(docs), np.nan)
    if removals is not None and removals.num_rows:
        rows = removals.column("doc").to_numpy() - lo
        reason[rows] = NEAR_DUPLICATE
        cluster[rows] = removals.column("cluster").to_numpy()
        keeper_id[rows] = np.array(removals.column("keeper_id").to_pylist(), object)
        similarity[rows] = removals.column("similarity").to_numpy()
    reason[docs.column("text").is_null().to_numpy(zero_copy_only=False)] = MISSING_TEXT
    gone = reason != ""
    removed = docs.filter(pa.array(gone)).append_column("reason", pa.array(reason[gone].tolist(), pa.string()))
    removed = removed.append_column("cluster", pa.array(cluster[gone])).append_column("keeper_id", pa.array(keeper_id[gone].tolist(), pa.string()))
    removed = removed.append_column("similarity", pa.array(similarity[gone]))
    counts = dict(Counter(reason[gone].tolist()))
    out.write_table(shard_name(index, "removed/"), removed, counts=counts)
    out.write_table(shard_name(index), docs.filter(pa.array(~gone)), counts=counts)


# --------------------------------------------------------------------------- the stage


def _size_bucket(size: int) -> str:
    if size <= 2:
        return str(size)
    top = 1 << (size - 1).bit_length()
    return f"{top // 2 + 1}-{top}"


def run_near_dedup(cfg: NearDedupConfig, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> NearDedupStats:
    plan = make_plan(cfg, out, inputs)
    n_shards = len(plan["shards"])
    map_pending(partial(signature_shard, cfg, out, inputs, plan), n_shards, lambda i: shard_name(i, "sigs/"), out, compute, "signatures")
    map_pending(partial(groups_partition, out, plan), plan["bucket_partitions"], lambda p: shard_name(p, "groups/"), out, compute, "band groups")
    index = find_components(cfg, out, plan)
    map_pending(partial(cluster_partition, cfg, out, plan), index["partitions"], lambda q: shard_name(q, "clusters/"), out, compute, "clusters")
    map_pending(partial(filter_shard, out, inputs, plan, index["partitions"]), n_shards, shard_name, out, compute, "filter")
    return collect_stats(cfg, out, plan, index)


def collect_stats(cfg: NearDedupConfig, out: StageDir, plan: dict[str, Any], index: dict[str, Any]) -> NearDedupStats:
    removed, cluster_sizes = Counter(), Counter()
    checks = Counter()
    for q in range(index["partitions"]):
        counts = out.marker(shard_name(q, "clusters/"))["counts"]
        checks.update({k: counts[k] for k in ("comparisons", "exact_comparisons", "rejected")})
        for size, count in counts["cluster_sizes"]:
            cluster_sizes[int(size)] += count
    docs_out = unshingled = 0
    for i in range(len(plan["shards"])):
        marker = out.marker(shard_name(i))
        docs_out += marker["rows"]
        removed.update(marker["counts"])
    for i in range(len(plan["shards"])):
        sigs = out.marker(shard_name(i, "sigs/"))
        unshingled += sigs.get("unshingled", 0)
    histogram = Counter()
    for size, count in cluster_sizes.items():
        histogram[_size_bucket(size)] += count
    summary = {
        "clusters": sum(cluster_sizes.values()),
        "largest_cluster": max(cluster_sizes, default=0),
        "cluster_sizes": dict(sorted(histogram.items(), key=lambda kv: int(kv[0].split("-")[0]))),
    }
    if not out.done(SUMMARY):
        out.write_json(SUMMARY, summary)
    return NearDedupStats(
        docs_in=plan["docs"],
        docs_out=docs_out,
        removed=dict(sorted(removed.items())),
        unshingled=unshingled,
        lsh=lsh_summary(cfg, plan),
        band_groups=index["band_groups"],
        group_memberships=index["group_memberships"],
        candidate_docs=index["candidate_docs"],
        components=index["components"],
        largest_component=index["largest_component"],
        comparisons=checks["comparisons"],
        exact_comparisons=checks["exact_comparisons"],
        rejected=checks["rejected"],
        partitions={"input_shards": len(plan["shards"]), "bucket": plan["bucket_partitions"], "cluster": index["partitions"]},
        **summary,
    )
