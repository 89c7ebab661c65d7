import io

import numpy as np
import pyarrow as pa
import pytest
import torch

from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.model.loader import LoaderError, TokenLoader
from lmfoundry.tasks.tokens.tokenize import samples_to_arrow
from tests.helpers import commit_docs

SEQ_LEN = 7


def identifiable_rows(first: int, n: int) -> np.ndarray:
    """Row k holds k in every column except the last, which holds k + 1 (a shifted target)."""
    rows = np.repeat(np.arange(first, first + n, dtype=np.uint16)[:, None], SEQ_LEN + 1, axis=1)
    rows[:, -1] += 1
    return rows


def two_batch_file(rows: np.ndarray) -> bytes:
    """An Arrow file whose samples are split over two record batches."""
    table = pa.ipc.open_file(pa.BufferReader(samples_to_arrow(rows))).read_all()
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema) as writer:
        for batch in table.to_batches():
            writer.write_batch(batch.slice(0, 3))
            writer.write_batch(batch.slice(3))
    return sink.getvalue()


def commit_token_stage(store, sizes: list[int], val: int = 0):
    """A committed stage laid out like `tokenize` whose sample k is identifiable_rows(k, 1)."""
    out = store.open_for_write("tokenize", f"fixture{'-'.join(map(str, sizes))}")
    entries, first = [], 0
    for i, n in enumerate(sizes):
        rows = identifiable_rows(first, n)
        path = f"train/part-{i:05d}.arrow"
        out.write_bytes(path, two_batch_file(rows) if n > 3 and i == 0 else samples_to_arrow(rows), rows=n)
        entries.append({"path": path, "samples": n})
        first += n
    val_entries = []
    if val:
        out.write_bytes("val/part-00000.arrow", samples_to_arrow(identifiable_rows(1000, val)), rows=val)
        val_entries.append({"path": "val/part-00000.arrow", "samples": val})
    index = {"seq_len": SEQ_LEN, "dtype": "uint16", "vocab_size": 2000, "eos_id": 1, "pad_id": 2,
             "splits": {"train": entries, "val": val_entries}, "tokens": {}}
    out.write_json("index.json", index)
    return store.commit(out, {"stats": {}})


def sample_ids(batch: torch.Tensor) -> list[int]:
    assert batch.dtype == torch.int64 and batch.shape[1] == SEQ_LEN + 1
    assert torch.equal(batch[:, -1], batch[:, 0] + 1)
    return batch[:, 0].tolist()


def take(loader: TokenLoader, steps: int) -> list[torch.Tensor]:
    return [next(loader) for _ in range(steps)]


def test_every_epoch_visits_each_sample_once_in_a_new_order(store):
    ref = commit_token_stage(store, [10, 0, 17, 10])
    loader = TokenLoader.from_stage(store, ref, batch_size=37)
    assert loader.num_samples == 37 and loader.seq_len == SEQ_LEN
    epochs = [sample_ids(next(loader)) for _ in range(3)]
    assert all(sorted(e) == list(range(37)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] == sample_ids(next(TokenLoader.from_stage(store, ref, batch_size=37)))
    assert epochs[0] != sample_ids(next(TokenLoader.from_stage(store, ref, batch_size=37, seed=5)))
    assert epochs[1] == sample_ids(next(TokenLoader.from_stage(store, ref, batch_size=37, seed=1)))  # epoch e uses seed + e
    in_order = TokenLoader.from_stage(store, ref, batch_size=37, shuffle=False)
    assert sample_ids(next(in_order)) == list(range(37))


def test_resuming_after_k_steps_yields_what_an_uninterrupted_run_yields_next(store):
    ref = commit_token_stage(store, [10, 17, 10])
    for world in (1, 2):
        uninterrupted = [take(TokenLoader.from_stage(store, ref, batch_size=4, rank=r, world_size=world, seed=3), 30) for r in range(world)]
        for rank in range(world):
            first = TokenLoader.from_stage(store, ref, batch_size=4, rank=rank, world_size=world, seed=3)
            take(first, 11)  # 11 steps of 4*world cross an epoch boundary of 37
            state = first.state_dict()
            assert state == {"sample": 11 * 4 * world, "seed": 3}
            restored = TokenLoader.from_stage(store, ref, batch_size=4, rank=rank, world_size=world, seed=99)
            restored.load_state_dict(state)
            started = TokenLoader.from_stage(store, ref, batch_size=4, rank=rank, world_size=world, seed=3, start_sample=state["sample"])
            for resumed in (restored, started):
                assert all(torch.equal(a, b) for a, b in zip(take(resumed, 19), uninterrupted[rank][11:]))


def test_two_ranks_with_batch_b_see_what_one_rank_with_batch_2b_sees_without_overlap(store):
    ref = commit_token_stage(store, [13, 27])  # 40 samples: an epoch is 5 steps of 2 x 4
    one = TokenLoader.from_stage(store, ref, batch_size=8)
    ranks = [TokenLoader.from_stage(store, ref, batch_size=4, rank=r, world_size=2) for r in range(2)]
    seen = [[], []]
    for step in range(12):
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat(parts), next(one))
        for r in range(2):
            seen[r].append(sample_ids(parts[r]))
    for epoch in range(2):
        per_rank = [{s for step in seen[r][epoch * 5 : epoch * 5 + 5] for s in step} for r in range(2)]
        assert not per_rank[0] & per_rank[1] and per_rank[0] | per_rank[1] == set(range(40))
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict() == {"sample": 96, "seed": 0}


def test_files_are_memory_mapped_without_copies(store):
    ref = commit_token_stage(store, [10, 17])
    before = pa.total_allocated_bytes()
    loader = TokenLoader.from_stage(store, ref, batch_size=4)
    assert pa.total_allocated_bytes() == before
    assert all(not block.flags.owndata and not block.flags.writeable for block in loader.blocks)
    with open("/proc/self/maps") as maps:
        mapped = maps.read()
    assert all(store.reader(ref).local_path(f"train/part-0000{i}.arrow") in mapped for i in range(2))
    assert len(loader.blocks) == 3  # the first file holds two record batches


def test_fast_gather_across_files_matches_the_file_by_file_reference(store):
    ref = commit_token_stage(store, [10, 1, 17, 4, 9])
    loader = TokenLoader.from_stage(store, ref, batch_size=5)
    assert loader._window is not None  # the fast path is the one in use
    everything = np.arange(loader.num_samples)
    for samples in (everything, np.random.default_rng(1).permutation(everything), np.array([40, 0, 40, 9, 10, 11], dtype=np.int64)):
        fast = loader.rows(samples)
        assert fast.dtype == np.int64 and np.array_equal(fast, loader.rows_reference(samples))
        assert fast[:, 0].tolist() == samples.tolist()
    ranked = TokenLoader.from_stage(store, ref, batch_size=5, rank=1, world_size=2, seed=4)
    for step in range(25):  # 25 steps of 10 cross six epochs of 41
        positions = np.arange(step * 10 + 5, step * 10 + 10)
        want = ranked.rows_reference(ranked.samples_at(positions))
        assert np.array_equal(next(ranked).numpy(), want) and np.array_equal(ranked.batch_at(step * 10).numpy(), want)


def test_eval_batches_cover_each_sample_once_with_equal_batch_counts_per_rank(store):
    ref = commit_token_stage(store, [10, 13], val=11)
    ranks = [list(TokenLoader.from_stage(store, ref, split="val", batch_size=2, rank=r, world_size=3).eval_batches()) for r in range(3)]
    assert [len(r) for r in ranks] == [2, 2, 2]
    ids = sorted(i for batches in ranks for batch in batches for i in sample_ids(batch))
    assert ids == list(range(1000, 1011))


def test_bad_requests_fail_with_a_clear_message(store):
    ref = commit_token_stage(store, [5])
    with pytest.raises(LoaderError, match="no samples"):
        TokenLoader.from_stage(store, ref, split="val")
    with pytest.raises(LoaderError, match="no split 'test'"):
        TokenLoader.from_stage(store, ref, split="test")
    with pytest.raises(LoaderError, match="outside world_size"):
        TokenLoader.from_stage(store, ref, rank=2, world_size=2)


def test_real_stages_on_an_s3_store_cache_shards_locally(s3_store, tmp_path, monkeypatch):
    monkeypatch.setenv("LMF_CACHE", str(tmp_path / "cache"))
    texts = [f"Document {i}: naïve café 数据 🚀 " * (1 + i % 5) for i in range(60)]
    docs_ref = commit_docs(s3_store, [[{"id": f"d{i}", "text": t} for i, t in enumerate(texts)]])
    cfg = PipelineConfig.model_validate({"tokenizer": {"vocab_size": 300}, "tokenize": {"seq_len": 16, "val_fraction": 0.1}})
    tok = run_stage(s3_store, StageSpec("train_tokenizer", "lmfoundry.tasks.tokens.train_tokenizer:run_train_tokenizer", section="tokenizer"), cfg, [docs_ref])
    ref = run_stage(s3_store, StageSpec("tokenize", "lmfoundry.tasks.tokens.tokenize:run_tokenize", section="tokenize"), cfg, [docs_ref, tok.ref]).ref
    loader = TokenLoader.from_stage(s3_store, ref, batch_size=3, shuffle=False)
    assert (tmp_path / "cache" / "tokenize" / ref.version / "train" / "part-00000.arrow").exists()
    stored = pa.ipc.open_file(pa.BufferReader(s3_store.reader(ref).read_bytes("train/part-00000.arrow"))).read_all()
    expected = stored.column("tokens").combine_chunks().flatten().to_numpy().reshape(-1, 17)
    got = torch.cat(list(loader.eval_batches())).numpy()
    assert np.array_equal(got, expected) and loader.pad_id == 2 and loader.eos_id == 1
