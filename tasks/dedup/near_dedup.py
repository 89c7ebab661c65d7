"""Stage `near_dedup`: remove near-duplicate documents with MinHash LSH, without chaining.

Run alone: ``lmf run --until near_dedup`` (settings: the ``near_dedup`` config section).

Five resumable steps (2-4, the clustering, in tasks/dedup/lsh_clusters.py); every file is marked when complete, so a run that stops resumes at
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

import json
import logging
import math
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
from lmfoundry.tasks.augment.documents import VARIANT_MARK
from lmfoundry.tasks.dedup.lsh_clusters import _bucket_path, cluster_partition, find_components, groups_partition, sets_to_arrow, write_hash_table

CODE_VERSION = "1"
log = logging.getLogger("lmfoundry.near_dedup")

PLAN = "plan.json"
SUMMARY = "clusters/summary.json"
MISSING_TEXT = "missing_text"
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
    # augment_docs variants: kept, removed_near_own_source, removed_near_other (empty without them)
    augmented: dict[str, int] = {}


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
    augmented = augmented_outcomes(docs.column("id"), reason, keeper_id)
    out.write_table(shard_name(index, "removed/"), removed, counts=counts)
    out.write_table(shard_name(index), docs.filter(pa.array(~gone)), counts=counts, augmented=augmented)


def augmented_outcomes(ids: pa.ChunkedArray, reason: np.ndarray, keeper_id: np.ndarray) -> dict[str, int]:
    """What became of the augment_docs stage's variants (ids carrying VARIANT_MARK): kept, or
    removed as a near-duplicate of their own source family (source or a sibling variant: the
    rewrite was too light to count as a new document) or of another document."""
    family = lambda doc_id: doc_id.split(VARIANT_MARK, 1)[0]  # noqa: E731
    variant = pc.match_substring(ids, VARIANT_MARK).to_numpy(zero_copy_only=False)
    variant_keeper = np.array([k is not None and VARIANT_MARK in k for k in keeper_id], dtype=bool)
    outcome: Counter = Counter()
    for i in np.flatnonzero(variant | variant_keeper).tolist():  # none in a corpus without variants
        doc_id = ids[i].as_py()
        is_variant = VARIANT_MARK in doc_id
        if reason[i] == NEAR_DUPLICATE and family(doc_id) == family(keeper_id[i]) and (is_variant or VARIANT_MARK in keeper_id[i]):
            outcome["removed_near_own_source"] += 1
        elif is_variant:
            outcome["removed_near_other" if reason[i] else "kept"] += 1
    return dict(outcome)


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
    checks, augmented = Counter(), Counter()
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
        augmented.update(marker.get("augmented", {}))
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
        augmented=dict(sorted(augmented.items())),
        **summary,
    )
