"""near_dedup: signatures equal datasketch's, accuracy against brute-force exact Jaccard on a
planted corpus, no chaining, keeper policies, determinism across shard counts, resume."""
from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
import scipy.sparse as sp
from datasketch import MinHash, MinHashLSH
from datasketch.hashfunc import sha1_hash64
from scipy.sparse.csgraph import connected_components

from lmfoundry.infra import faults
from lmfoundry.infra.config import NearDedupConfig, PipelineConfig
from lmfoundry.infra.docs import iter_docs
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.tasks.dedup import minhash
from lmfoundry.tasks.dedup import lsh_clusters as lc
from lmfoundry.tasks.dedup import near_dedup as nd
from tests.helpers import commit_docs

SPEC = StageSpec("near_dedup", "lmfoundry.tasks.dedup.near_dedup:run_near_dedup", section="near_dedup")


def words_of(text: str) -> list[str]:
    return minhash.normalize(text).decode().split()


def reference_shingles(text: str, n: int = 5) -> set[str]:
    """The definition, written plainly: word n-grams of the normalised text."""
    w = words_of(text)
    return {" ".join(w[i : i + n]) for i in range(max(1, len(w) - n + 1))} if w else set()


def exact_jaccard(a: str, b: str) -> float:
    sa, sb = reference_shingles(a), reference_shingles(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def commit_once(store, rows_by_shard):
    version = hashlib.sha256(repr(rows_by_shard).encode()).hexdigest()[:16]
    if store.is_committed("fixture_docs", version):
        return store.ref("fixture_docs", version)
    return commit_docs(store, rows_by_shard, version=version)


def run(store, rows_by_shard, salt="", compute=None, **cfg):
    ref = commit_once(store, rows_by_shard)
    root = PipelineConfig(near_dedup=NearDedupConfig(**cfg), compute=compute or {"workers": 1, "progress": False})
    return run_stage(store, SPEC, root, [ref], salt=salt)


def removed_rows(store, ref) -> list[dict]:
    reader = store.reader(ref)
    return [r for path in reader.files("removed/", ".parquet") for r in reader.read_table(path).to_pylist()]


def output_digests(store, ref) -> dict[str, str]:
    files = store.manifest(ref.stage, ref.version)["files"]
    return {p: m["checksum"] for p, m in files.items() if p.startswith(("data/", "removed/", "clusters/"))}


# ---------------------------------------------------------------- a planted corpus

VOCAB = [f"w{i}" for i in range(20_000)]


def planted_corpus(seed: int = 7, families: int = 90) -> list[dict]:
    """Base documents of random words, each with 1-4 variants at a spread of similarities
    (word substitutions, insertions, deletions, an appended paragraph); in shuffled order."""
    rng = random.Random(seed)
    docs = []
    for f in range(families):
        base = [rng.choice(VOCAB) for _ in range(rng.randint(80, 200))]
        docs.append((f, base))
        for _ in range(rng.randint(1, 4)):
            variant = list(base)
            edits = rng.choice([0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 8])
            for _ in range(edits):
                kind = rng.random()
                at = rng.randrange(len(variant))
                if kind < 0.6:
                    variant[at] = rng.choice(VOCAB)
                elif kind < 0.8:
                    variant.insert(at, rng.choice(VOCAB))
                else:
                    del variant[at]
            if rng.random() < 0.15:
                variant += [rng.choice(VOCAB) for _ in range(rng.randint(5, 25))]
            docs.append((f, variant))
    rng.shuffle(docs)
    return [{"id": f"doc{i:04d}", "text": " ".join(words), "meta": {"family": fam}} for i, (fam, words) in enumerate(docs)]


def brute_force_jaccard(texts: list[str]) -> np.ndarray:
    """Exact Jaccard of every pair, by a sparse product of shingle incidence vectors."""
    vocab: dict[str, int] = {}
    rows, cols = [], []
    for i, t in enumerate(texts):
        for s in reference_shingles(t):
            rows.append(i)
            cols.append(vocab.setdefault(s, len(vocab)))
    m = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(texts), len(vocab)))
    inter = (m @ m.T).toarray()
    size = np.diag(inter)
    return inter / (size[:, None] + size[None, :] - inter)


# ---------------------------------------------------------------- building blocks


TRICKY = [
    "",
    "one two",
    "Ünïcode ﬁne\u00a0text here and  there x y z",
    "a b c d e",
    "  \t\x1c x\x1fy \r\n ",
    "\u2028line sep\x85 next\u3000wide ＦＵＬＬ",
    "A B C D E F G H",
    "repeat repeat repeat repeat repeat repeat repeat",
]


def test_signatures_and_shingle_sets_equal_datasketch():
    rng = random.Random(1)
    texts = TRICKY + [" ".join(rng.choice(VOCAB[:300]) for _ in range(rng.randint(0, 60))) for _ in range(40)]
    arr, _ = minhash.normalized_buffer(texts)
    assert arr.tobytes() == b"\n".join(map(minhash.normalize, texts))
    sets = minhash.shingle_sets(texts, 5)
    sigs = minhash.signatures(sets, 64, 3)
    for i, text in enumerate(texts):
        shingles = {s.encode() for s in reference_shingles(text)}
        expected = MinHash(num_perm=64, seed=3)
        expected.update_batch(shingles)
        assert np.array_equal(sigs[i], expected.hashvalues), text
        assert sets.of(i).tolist() == sorted(sha1_hash64(s) for s in shingles), text


def test_jaccard_and_estimate():
    texts = [" ".join(VOCAB[:100]), " ".join(VOCAB[:90] + VOCAB[500:510]), " ".join(VOCAB[200:260])]
    sets = minhash.shingle_sets(texts, 5)
    exact = minhash.jaccard_one_to_many(sets, 0, np.array([1, 2]))
    assert exact == pytest.approx([exact_jaccard(texts[0], texts[1]), 0.0])
    sigs = minhash.signatures(sets, 256, 1)
    estimate = minhash.estimated_jaccard_one_to_many(sigs, 0, np.array([1, 2]))
    assert abs(estimate[0] - exact[0]) < 0.1 and estimate[1] < 0.05


def test_band_layout_follows_datasketch_and_s_curve():
    for threshold, num_perm, weights in [(0.8, 128, (0.5, 0.5)), (0.8, 128, (0.1, 0.9)), (0.7, 256, (0.3, 0.7)), (0.9, 64, (0.5, 0.5))]:
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=weights)
        assert minhash.choose_bands(threshold, num_perm, *weights) == (lsh.b, lsh.r)
    bands, rows = minhash.choose_bands(0.8, 128, 0.5, 0.5)
    assert minhash.collision_probability(0.8, bands, rows) == pytest.approx(1 - (1 - 0.8**rows) ** bands)
    fp, fn = minhash.s_curve_areas(0.8, bands, rows)
    # weighting false negatives more moves the S-curve left: fewer misses, more candidates
    b2, r2 = minhash.choose_bands(0.8, 128, 0.1, 0.9)
    fp2, fn2 = minhash.s_curve_areas(0.8, b2, r2)
    assert fn2 < fn and fp2 > fp


def test_union_matches_scipy_connected_components():
    rng = np.random.default_rng(0)
    n = 400
    a, b = rng.integers(0, n, 300), rng.integers(0, n, 300)
    parent = np.arange(n)
    lc.union(parent, a[:150], b[:150])  # in two batches, like the band-group files
    lc.union(parent, a[150:], b[150:])
    lc._compress(parent)
    _, labels = connected_components(sp.coo_matrix((np.ones(300), (a, b)), shape=(n, n)), directed=False)
    same_ours = parent[:, None] == parent[None, :]
    same_scipy = labels[:, None] == labels[None, :]
    assert np.array_equal(same_ours, same_scipy)
    assert all(parent[i] <= i for i in range(n))  # each component is named by its smallest member


def test_band_groups_and_their_stars():
    keys = np.array([5, 9, 5, 5, 9, 7], np.uint64)
    docs = np.array([30, 11, 10, 20, 12, 99])
    group_keys, group_docs = lc.band_groups(keys, docs)
    assert list(zip(group_keys.tolist(), group_docs.tolist())) == [(5, 10), (5, 20), (5, 30), (9, 11), (9, 12)]
    a, b = lc.star_edges(group_keys, group_docs)
    assert list(zip(a.tolist(), b.tolist())) == [(10, 20), (10, 30), (11, 12)]


def test_dense_near_threshold_component_stays_linear(store):
    """A site template: 400 pages that collide in LSH but sit just below the threshold.
    The work is bounded by the LSH candidate pairs (no two-hop blow-up)."""
    rng = random.Random(29)
    base = [rng.choice(VOCAB) for _ in range(300)]
    rows = []
    for i in range(400):
        page = list(base)
        for _ in range(7):
            page[rng.randrange(300)] = rng.choice(VOCAB)
        rows.append({"id": f"p{i}", "text": " ".join(page)})
    stats = run(store, [rows]).stats
    assert stats["largest_component"] > 300 and stats["removed"] == {}
    # LSH candidate pairs: documents sharing at least one band key
    sigs = minhash.signatures(minhash.shingle_sets([r["text"] for r in rows], 5), 128, 1)
    keys = minhash.band_keys(sigs, stats["lsh"]["bands"], stats["lsh"]["rows"])
    colliding = sum(bool(set(keys[i]) & set(keys[j])) for i in range(len(rows)) for j in range(i))
    assert 0 < stats["exact_comparisons"] <= stats["comparisons"] <= colliding  # each candidate pair at most once


# ---------------------------------------------------------------- the stage


def test_accuracy_on_planted_near_duplicates(store):
    rows = planted_corpus()
    texts = [r["text"] for r in rows]
    jac = brute_force_jaccard(texts)
    outcome = run(store, [rows[:200], rows[200:]])
    index = {r["id"]: i for i, r in enumerate(rows)}
    removed = {index[r["id"]]: index[r["keeper_id"]] for r in removed_rows(store, outcome.ref)}
    kept = {index[d["id"]] for d in iter_docs(store, [outcome.ref])}
    assert len(kept) + len(removed) == len(rows) and not kept & set(removed)

    upper = np.triu(np.ones_like(jac, bool), 1)
    true_pairs = np.argwhere(upper & (jac >= 0.8))
    assert len(true_pairs) > 150  # the corpus really plants near-duplicates...
    assert ((jac > 0.6) & (jac < 0.8) & upper).sum() > 30  # ...and pairs just below the threshold
    caught = sum(1 for i, j in true_pairs if i in removed or j in removed)
    recall = caught / len(true_pairs)
    with_keeper = np.array([jac[d, k] for d, k in removed.items()])
    precision = float((with_keeper >= 0.8).mean())
    assert recall >= 0.95, recall
    assert precision >= 0.99, precision
    assert (with_keeper < 0.7).sum() == 0
    assert all(k in kept for k in removed.values())  # every keeper survives
    stats = outcome.stats
    assert stats["docs_out"] == len(kept) and stats["removed"] == {"near_duplicate": len(removed)}
    assert stats["lsh"]["p_collision_at_threshold"] == pytest.approx(
        minhash.collision_probability(0.8, stats["lsh"]["bands"], stats["lsh"]["rows"]), abs=1e-6
    )
    assert stats["rejected"] > 0  # verification turned some LSH candidates down


def chain(rng: random.Random) -> list[str]:
    """A, B, C with J(A,B) and J(B,C) >= 0.8 but J(A,C) < 0.7: B changes 4 words of A, C 4 more."""
    a = [rng.choice(VOCAB) for _ in range(200)]
    b, c = list(a), list(a)
    for at in (20, 50, 80, 110):
        b[at] = c[at] = rng.choice(VOCAB)
    for at in (130, 150, 170, 190):
        c[at] = rng.choice(VOCAB)
    return [" ".join(a), " ".join(b), " ".join(c)]


def test_no_transitive_chaining(store):
    a, b, c = chain(random.Random(3))
    assert exact_jaccard(a, b) >= 0.8 and exact_jaccard(b, c) >= 0.8 and exact_jaccard(a, c) < 0.7
    rows = [{"id": "a", "text": a}, {"id": "b", "text": b}, {"id": "c", "text": c}, {"id": "other", "text": " ".join(VOCAB[:50])}]
    outcome = run(store, [rows])
    assert [d["id"] for d in iter_docs(store, [outcome.ref])] == ["a", "c", "other"]
    (gone,) = removed_rows(store, outcome.ref)
    assert gone["id"] == "b" and gone["keeper_id"] == "a" and gone["reason"] == "near_duplicate"
    assert gone["similarity"] == pytest.approx(exact_jaccard(a, b))
    assert gone["text"] == b  # the removed document is kept whole in the side artifact
    members = store.reader(outcome.ref).read_table("clusters/part-00000.parquet").to_pylist()
    assert {(m["id"], m["cluster_size"], m["removed"]) for m in members} == {("a", 2, False), ("b", 2, True)}


def test_keeper_policies(store):
    rng = random.Random(5)
    base = [rng.choice(VOCAB) for _ in range(200)]
    short = " ".join(base[:-2])
    full = " ".join(base)
    longer = " ".join(base + base[:4])
    rows = [
        {"id": "short", "text": short, "meta": {"quality": 0.9}},
        {"id": "longer", "text": longer, "meta": {"quality": 0.2}},
        {"id": "full", "text": full, "meta": {"note": "no score"}},
    ]

    def survivors(**cfg):
        outcome = run(store, [rows], **cfg)
        return [d["id"] for d in iter_docs(store, [outcome.ref])]

    assert survivors(keeper="first") == ["short"]
    assert survivors(keeper="longest") == ["longer"]
    assert survivors(keeper="quality") == ["short"]
    rows[0]["meta"] = {}
    assert survivors(keeper="quality") == ["longer"]  # a document without a score ranks last


def test_malformed_and_empty_documents(store):
    text = " ".join(VOCAB[:80])
    rows = [
        {"id": "a", "text": text},
        {"id": "b", "text": text + " extra"},
        {"id": "none", "text": None},
        {"id": "empty", "text": "   "},
        {"id": "empty2", "text": ""},
    ]
    outcome = run(store, [rows])
    assert [d["id"] for d in iter_docs(store, [outcome.ref])] == ["a", "empty", "empty2"]
    assert outcome.stats["removed"] == {"missing_text": 1, "near_duplicate": 1}
    assert outcome.stats["unshingled"] == 2
    reasons = {r["id"]: (r["reason"], r["cluster"]) for r in removed_rows(store, outcome.ref)}
    assert reasons == {"b": ("near_duplicate", 0), "none": ("missing_text", -1)}


def test_estimated_similarity_without_verification(store):
    rows = planted_corpus(seed=11, families=25)
    outcome = run(store, [rows], verify=False)
    removed = removed_rows(store, outcome.ref)
    assert removed and all(r["similarity"] >= 0.8 for r in removed)
    texts = {r["id"]: r["text"] for r in rows}
    assert np.mean([exact_jaccard(texts[r["id"]], texts[r["keeper_id"]]) >= 0.7 for r in removed]) > 0.95


def test_deterministic_and_independent_of_shard_count(store, tmp_path):
    from lmfoundry.infra.store import Store

    rows = planted_corpus(seed=13, families=40)
    one = run(store, [rows])
    three = run(store, [rows[:50], rows[50:51], rows[51:]])
    # another store, two worker processes and small partitions: the same bytes
    parallel = {"workers": 2, "task_runner": "processes", "progress": False}
    again = run(Store(str(tmp_path / "other")), [rows], compute=parallel, bucket_partition_rows=300, cluster_partition_bytes=50_000)

    def decisions(s, outcome):
        return sorted((r["id"], r["keeper_id"], r["cluster"], r["similarity"]) for r in removed_rows(s, outcome.ref))

    assert [d["id"] for d in iter_docs(store, [one.ref])] == [d["id"] for d in iter_docs(store, [three.ref])]
    assert decisions(store, one) == decisions(store, three)
    assert len(decisions(store, one)) > 20
    drop = ("partitions",)
    assert {k: v for k, v in one.stats.items() if k not in drop} == {k: v for k, v in three.stats.items() if k not in drop}
    assert again.stats["partitions"]["bucket"] > 1 and again.stats["partitions"]["cluster"] > 1

    def outputs(s, ref):  # cluster partition files depend on the partition count; the rest must not
        return {p: d for p, d in output_digests(s, ref).items() if not p.startswith("clusters/part-")}

    assert outputs(store, one.ref) == outputs(Store(str(tmp_path / "other")), again.ref)
    rerun = run(Store(str(tmp_path / "third")), [rows], salt="x")
    assert output_digests(store, one.ref) == output_digests(Store(str(tmp_path / "third")), rerun.ref)


def test_partitioned_run_equals_single_partition(store):
    rows = planted_corpus(seed=17, families=40)
    single = run(store, [rows[:100], rows[100:]])
    # partition sizes are execution settings (same version): a salt makes a second version
    split = run(store, [rows[:100], rows[100:]], salt="split", bucket_partition_rows=200, cluster_partition_bytes=20_000)
    assert split.stats["partitions"]["bucket"] > 3 and split.stats["partitions"]["cluster"] > 3

    def outputs(ref):
        return {p: d for p, d in output_digests(store, ref).items() if not p.startswith("clusters/part-")}

    assert outputs(single.ref) == outputs(split.ref)
    assert len(removed_rows(store, single.ref)) > 20


@pytest.mark.parametrize("fail_after", [2, 7, 11])
def test_resume_after_interruption(store, monkeypatch, fail_after):
    rows = planted_corpus(seed=19, families=30)
    shards = [rows[:40], rows[40:80], rows[80:]]
    ref = commit_docs(store, shards)
    root = PipelineConfig(compute={"workers": 1, "progress": False})
    monkeypatch.setenv("LMF_FAULT", f"near_dedup:after_file:{fail_after}:fail")
    with pytest.raises(faults.InjectedFault):
        run_stage(store, SPEC, root, [ref])
    monkeypatch.delenv("LMF_FAULT")
    resumed = run_stage(store, SPEC, root, [ref])
    manifest = store.manifest(resumed.ref.stage, resumed.ref.version)
    assert manifest["resumed_files"] >= fail_after
    clean = run_stage(store, SPEC, root, [ref], salt="clean")
    assert output_digests(store, resumed.ref) == output_digests(store, clean.ref)
    assert resumed.stats == clean.stats
    assert run_stage(store, SPEC, root, [ref]).status == "skipped"


def test_config_validation():
    with pytest.raises(ValueError, match="both bands and rows"):
        NearDedupConfig(bands=10)
    with pytest.raises(ValueError, match="exceeds num_perm"):
        NearDedupConfig(bands=20, rows=10)
    cfg = NearDedupConfig(bands=16, rows=8)
    assert "bucket_partition_rows" not in cfg.identity() and cfg.identity()["bands"] == 16


def test_quality_scores_parse_meta():
    metas = [json.dumps({"quality": 0.5}), json.dumps({"quality": "high"}), None, "not json", json.dumps({"quality": True})]
    assert np.array_equal(nd.quality_scores(metas, "quality"), [0.5, np.nan, np.nan, np.nan, np.nan], equal_nan=True)


def test_empty_input_and_empty_shard(store):
    nothing = run(store, [])
    assert nothing.stats["docs_in"] == 0 and nothing.stats["docs_out"] == 0
    text = " ".join(VOCAB[:40])
    outcome = run(store, [[], [{"id": "x", "text": text}], [], [{"id": "y", "text": text}]])
    assert [d["id"] for d in iter_docs(store, [outcome.ref])] == ["x"]
    assert store.reader(outcome.ref).files("data/") == [f"data/part-0000{i}.parquet" for i in range(4)]


def test_reads_exact_dedup_output(store):
    exact = StageSpec("exact_dedup", "lmfoundry.tasks.dedup.exact_dedup:run_exact_dedup", section="exact_dedup")
    rng = random.Random(23)
    base = [rng.choice(VOCAB) for _ in range(120)]
    near = list(base)
    near[60] = "changed"
    rows = [{"id": "a", "text": " ".join(base)}, {"id": "copy", "text": " ".join(base)}, {"id": "near", "text": " ".join(near)}]
    root = PipelineConfig(compute={"workers": 1, "progress": False})
    deduped = run_stage(store, exact, root, [commit_docs(store, [rows])])
    outcome = run_stage(store, SPEC, root, [deduped.ref])
    assert [d["id"] for d in iter_docs(store, [outcome.ref])] == ["a"]
    assert [r["id"] for r in removed_rows(store, outcome.ref)] == ["near"]


def test_unreadable_input_names_the_shard(store):
    ref = commit_docs(store, [[{"id": "a", "text": "some words here and there"}]])
    path = store.version_path(ref.stage, ref.version) + "/data/part-00000.parquet"
    with open(path, "wb") as f:
        f.write(b"not parquet")
    # the store's checked read names the stage, version and file, and un-commits it for repair
    with pytest.raises(RuntimeError, match=r"damaged file\(s\) in stage 'fixture_docs' .*data/part-00000\.parquet: truncated"):
        run_stage(store, SPEC, PipelineConfig(compute={"workers": 1, "progress": False}), [ref])
