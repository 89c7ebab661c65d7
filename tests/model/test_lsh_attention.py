"""LSH attention (model/lsh_attention.py): causality, the dense limit, determinism, packing, training.

    .venv/bin/pytest -q tests/model/test_lsh_attention.py
"""
from __future__ import annotations

import pytest
import torch

from lmfoundry.infra.config import ModelConfig
from lmfoundry.model.lsh_attention import dense_shared_qk_attention, hash_buckets, lsh_attention, n_buckets_for
from lmfoundry.model.losses import lm_loss, split_batch
from lmfoundry.model.transformer import Transformer, resolve

VOCAB = 61


# one torch thread (tests/model/conftest.py): on two shared cores intra-op threads spin against other processes
pytestmark = pytest.mark.usefixtures("one_thread")


def lsh_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    fields = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "attention": "lsh", "lsh_bucket_size": 8, "lsh_n_hashes": 2, **overrides}
    return Transformer(resolve(ModelConfig(**fields), VOCAB))


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_hashes", [1, 2])
def test_a_future_token_never_changes_an_earlier_logit(n_hashes):
    model = lsh_model(lsh_n_hashes=n_hashes).eval()  # 40 tokens in chunks of 8: several buckets, sorted chunks, look-back
    x = tokens(2, 40)
    with torch.no_grad():
        base = model(x)[0]
        for t in (5, 17, 33):
            changed = x.clone()
            changed[:, t] = (changed[:, t] + 1) % VOCAB
            out = model(changed)[0]
            # equal up to summation order (a sort moves slots): a leak would show at ~1e-1
            assert (base[:, :t] - out[:, :t]).abs().max().item() < 1e-6, t
            assert not torch.allclose(base[:, t:], out[:, t:])


def test_one_chunk_equals_dense_shared_qk_attention():
    torch.manual_seed(0)
    q, v = torch.randn(2, 3, 13, 8), torch.randn(2, 3, 13, 8)
    dense = dense_shared_qk_attention(q, v)
    for n_hashes in (1, 3):  # one bucket: every round is the dense answer, and so is their mix
        out = lsh_attention(q, v, n_hashes=n_hashes, bucket_size=16, seed=0)
        assert (out - dense).abs().max().item() < 1e-5
    # the reference by hand for token 2: softmax over keys 0, 1 (its own key is masked away)
    k = torch.nn.functional.normalize(q, dim=-1)
    scores = torch.stack([(q[0, 0, 2] * k[0, 0, j]).sum() for j in (0, 1)]) / 8**0.5
    assert torch.allclose(dense[0, 0, 2], torch.softmax(scores, 0) @ v[0, 0, :2], atol=1e-6)
    assert torch.allclose(dense[:, :, 0], v[:, :, 0])  # the first token has only itself


def test_many_chunks_approximate_dense_and_more_rounds_get_closer():
    """Clustered, peaked queries (the case LSH is for): the tokens a query would weigh most share
    its bucket, so LSH is close to dense, and closer with more hashing rounds."""
    torch.manual_seed(1)
    centers = torch.nn.functional.normalize(torch.randn(1, 4, 8, 16), dim=-1)
    assign = torch.randint(0, 8, (128,))
    q = 32 * (centers[:, :, assign] + 0.05 * torch.randn(1, 4, 128, 16))
    v = torch.randn(1, 4, 128, 16)
    dense = dense_shared_qk_attention(q, v)
    errors = [(lsh_attention(q, v, n, 16, seed=0) - dense).norm().item() / dense.norm().item() for n in (1, 2, 8)]
    assert n_buckets_for(128, 16) == 8
    assert errors[2] < errors[1] < errors[0] and errors[2] < 0.4, errors


def test_buckets_are_deterministic_under_the_seed_and_angular():
    keys = torch.nn.functional.normalize(torch.randn(1, 2, 64, 8), dim=-1)
    a, b, c = (hash_buckets(keys, 2, 8, seed) for seed in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < 8
    assert torch.equal(hash_buckets(2.5 * keys, 2, 8, 3), a)  # only the direction counts
    model_a, model_b = lsh_model(seed=0).eval(), lsh_model(seed=0).eval()
    x = tokens(1, 32)
    with torch.no_grad():
        assert torch.equal(model_a(x)[0], model_b(x)[0])
        other = lsh_model(seed=0, lsh_seed=9).eval()
        assert not torch.equal(model_a(x)[0], other(x)[0])  # other rotations, other buckets


def test_packed_segments_never_see_each_other():
    torch.manual_seed(2)
    q, v = torch.randn(1, 2, 24, 8), torch.randn(1, 2, 24, 8)
    segments = torch.tensor([[0] * 10 + [1] * 14])
    packed = lsh_attention(q, v, 2, 32, seed=0, segments=segments)
    alone = lsh_attention(q[:, :, 10:], v[:, :, 10:], 2, 32, seed=0)
    assert (packed[:, :, 10:] - alone).abs().max().item() < 1e-5
    assert (packed - dense_shared_qk_attention(q, v, segments)).abs().max().item() < 1e-5


def test_packed_row_through_the_model_equals_each_conversation_alone():
    model = lsh_model(lsh_bucket_size=32).eval()  # every conversation fits a chunk: comparable alone
    pieces = [tokens(1, n, seed=n)[0] for n in (7, 12, 5)]
    row = torch.cat(pieces).unsqueeze(0)
    positions = torch.cat([torch.arange(len(p)) for p in pieces]).unsqueeze(0)
    segments = torch.cat([torch.full((len(p),), i) for i, p in enumerate(pieces)]).unsqueeze(0)
    with torch.no_grad():
        packed = model(row, positions, segments)[0]
        start = 0
        for piece in pieces:
            alone = model(piece.unsqueeze(0))[0]
            assert (packed[0, start : start + len(piece)] - alone[0]).abs().max().item() < 1e-5
            start += len(piece)


def test_lsh_model_trains_and_refuses_the_kv_cache_and_export(tmp_path):
    from lmfoundry.model.export import ExportError, export_llama
    from lmfoundry.model.transformer import KVCache, save_model

    model = lsh_model(lsh_bucket_size=4)
    assert not any("k_proj" in name for name, _ in model.named_parameters())  # shared QK
    inputs, targets = split_batch(tokens(4, 25, seed=3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = lm_loss(model(inputs)[0], targets).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    with pytest.raises(ValueError, match="model.attention is 'lsh'.*use_cache=False"):
        model.eval()(inputs[:, :3], torch.arange(3).expand(4, 3), torch.zeros(4, 3, dtype=torch.long), cache=KVCache(model.cfg, 4, 8))
    save_model(model.state_dict(), model.cfg, tmp_path / "ours")
    with pytest.raises(ExportError, match="model.attention 'lsh'"):
        export_llama(tmp_path / "ours", tmp_path / "hf", max_seq_len=32)


def test_flops_count_the_keys_lsh_scores():
    lsh, dense = lsh_model(lsh_bucket_size=64, lsh_n_hashes=2), lsh_model(attention="dense")
    weights_lsh, weights_dense = 6 * lsh.active_matmul_parameters(), 6 * dense.active_matmul_parameters()
    assert weights_dense - weights_lsh == 6 * 2 * 32 * 16  # no k_proj: 2 layers x d_model x kv width
    assert lsh.flops_per_token(1024) == weights_lsh + 12 * 2 * 32 * (2 * 128)  # 2 rounds x (own + previous chunk)
    assert lsh.flops_per_token(48) == weights_lsh + 12 * 2 * 32 * (2 * 48)  # one chunk: the row, per round
    assert dense.flops_per_token(1024) == weights_dense + 12 * 2 * 32 * 1024


def test_dense_default_keeps_the_identity():
    assert "attention" not in ModelConfig().identity() and "lsh_n_hashes" not in ModelConfig().identity()
    assert ModelConfig(attention="lsh").identity()["attention"] == "lsh"
