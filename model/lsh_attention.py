"""Reformer-style LSH attention (``model.attention: lsh``): each query attends only to the keys
that hash into its neighbourhood, so memory grows as T x chunk instead of T x T.

    model:
      attention: lsh        # default dense (SDPA)
      lsh_n_hashes: 2       # hashing rounds; more rounds, fewer missed neighbours, more work
      lsh_bucket_size: 64   # chunk length: a query sees its own chunk and the previous one
      lsh_seed: 0           # seeds the random rotations (the same buckets on every call)

How one forward runs (per batch row, head and hashing round):
1. shared-QK: the keys are the unit-normalised queries (there is no k_proj), so a token lands
   in the same bucket as the tokens whose keys its query would score highest;
2. hash: rotate the keys by a random matrix R [Dh, n_buckets/2] and take the argmax over
   [kR, -kR] (angular LSH); n_buckets = 2 * ceil(T / (2 * bucket_size)), so a bucket holds
   about one chunk of tokens;
3. sort by (bucket, position), cut the sorted row into chunks of ``lsh_bucket_size`` and let
   each chunk attend to itself and to the previous chunk;
4. masks: causal by true position (a key later than its query is never seen, wherever the sort
   put it), the packed-row segment (a token never sees another conversation), and a token's
   own key only when it has nothing else (Reformer: a query scores its own shared key highest);
5. undo the sort; the rounds are combined with weights softmax over rounds of each round's
   logsumexp (a round that found more, stronger keys counts more).

When the whole row fits in one chunk there is a single bucket and this is exactly dense causal
attention with shared QK and the same self rule (tests/model/test_lsh_attention.py checks it).

Where it stops: no KV cache (buckets move as the row grows; generate with ``use_cache=False``,
which recomputes the row), no Hugging Face export (Llama has no LSH attention). Rotations are
fixed per layer by ``lsh_seed`` rather than drawn afresh each step, so evaluation and training
see the same buckets and a run is reproducible.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmfoundry.infra.config import ModelConfig

# a query's own key: far below any real score, far above a masked one (Reformer uses -1e5 too)
SELF_SCORE = -1e5


def n_buckets_for(seq_len: int, bucket_size: int) -> int:
    """Even bucket count so a bucket holds about ``bucket_size`` tokens; 1 when the row fits one chunk."""
    if seq_len <= bucket_size:
        return 1
    return 2 * math.ceil(seq_len / (2 * bucket_size))


def keys_per_query(cfg: ModelConfig, seq_len: int) -> int:
    """Keys each query is scored against, for the FLOP count (Transformer.flops_per_token): T for
    dense attention (the full square, as the dense count has always been); for LSH its own chunk
    and the previous one in every hashing round (the whole row, once, when it fits one chunk)."""
    if cfg.attention != "lsh":
        return seq_len
    per_round = seq_len if seq_len <= cfg.lsh_bucket_size else 2 * cfg.lsh_bucket_size
    return cfg.lsh_n_hashes * per_round


def rotations(head_dim: int, n_hashes: int, n_buckets: int, seed: int, device) -> torch.Tensor:
    """Random rotations R [n_hashes, Dh, n_buckets / 2], the same for the same seed and size."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + n_buckets)
    return torch.randn(n_hashes, head_dim, n_buckets // 2, generator=generator).to(device)


def hash_buckets(keys: torch.Tensor, n_hashes: int, n_buckets: int, seed: int) -> torch.Tensor:
    """keys [B, H, T, Dh] -> bucket ids [B, H, n_hashes, T] (angular LSH: argmax of [kR, -kR])."""
    B, H, T, _ = keys.shape
    if n_buckets == 1:
        return torch.zeros(B, H, n_hashes, T, dtype=torch.long, device=keys.device)
    R = rotations(keys.shape[-1], n_hashes, n_buckets, seed, keys.device).to(keys.dtype)
    rotated = torch.einsum("bhtd,ndr->bhntr", keys.detach(), R)  # no gradient through a hash
    return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)


def lsh_attention(
    q: torch.Tensor, v: torch.Tensor, n_hashes: int, bucket_size: int, seed: int, segments: torch.Tensor | None = None
) -> torch.Tensor:
    """q, v [B, H, T, Dh] (rotary already applied to q) -> [B, H, T, Dh]; keys = normalised q.

    segments [B, T]: packed conversations (attention stays inside a segment); None: one per row."""
    B, H, T, Dh = q.shape
    L = bucket_size
    pad = (-T) % L
    Tp = T + pad  # whole chunks; padded slots sit at positions >= T, so causality hides them
    k = F.normalize(q, dim=-1)
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    buckets = hash_buckets(k, n_hashes, n_buckets_for(T, L), seed)  # [B, H, n, Tp]
    pos = torch.arange(Tp, device=q.device)
    order = (buckets * Tp + pos).argsort(dim=-1)  # sort by bucket, then position
    undo = order.argsort(dim=-1)

    def sort(x: torch.Tensor) -> torch.Tensor:  # [B, H, Tp, Dh] -> [B, H, n, C, L, Dh] in hash order
        idx = order.unsqueeze(-1).expand(-1, -1, -1, -1, Dh)
        return x.unsqueeze(2).expand(-1, -1, n_hashes, -1, -1).gather(3, idx).view(B, H, n_hashes, Tp // L, L, Dh)

    sq, sk, sv = sort(q), sort(k), sort(v)
    spos = order.view(B, H, n_hashes, Tp // L, L)  # true position of each sorted slot
    sbucket = buckets.gather(3, order).view(B, H, n_hashes, Tp // L, L)
    slot = torch.arange(Tp, device=q.device).view(Tp // L, L)  # sorted index

    def with_previous(t: torch.Tensor, chunk_dim: int) -> torch.Tensor:
        """Keys of a chunk: the previous chunk, then its own (one chunk: only its own)."""
        return t if t.shape[chunk_dim] == 1 else torch.cat([t.roll(1, dims=chunk_dim), t], dim=chunk_dim + 1)

    kk, vv, kpos, kbucket = (with_previous(t, 3) for t in (sk, sv, spos, sbucket))
    kslot = with_previous(slot, 0)  # [C, 2L]; the first chunk's "previous" wraps round to the last
    scores = torch.einsum("bhncid,bhncjd->bhncij", sq / math.sqrt(Dh), kk)  # [B, H, n, C, L, 2L]
    qp, kp = spos.unsqueeze(-1), kpos.unsqueeze(-2)
    # the L most recent sorted slots of the query's own bucket: the same bucket's tokens lie together
    # in position order, so these are its up to L latest earlier bucket-mates, whatever later tokens
    # hash to (plain chunk boundaries would move when a later token changes bucket: not causal)
    distance = slot.unsqueeze(-1) - kslot.unsqueeze(-2)  # [C, L, 2L]; negative where roll wrapped
    allowed = (kp <= qp) & (sbucket.unsqueeze(-1) == kbucket.unsqueeze(-2)) & (distance >= 0) & (distance < L)
    if segments is not None:
        seg = F.pad(segments, (0, pad), value=-1) if pad else segments  # [B, Tp]
        sseg = seg.view(B, 1, 1, Tp).expand(-1, H, n_hashes, -1).gather(3, order).view(B, H, n_hashes, Tp // L, L)
        kseg = with_previous(sseg, 3)
        allowed &= sseg.unsqueeze(-1) == kseg.unsqueeze(-2)
    # own key first, then the masks (a padded slot's own key is never used: its output is cut off)
    # in place: the einsum's backward does not read its output, so no copy of the scores is kept
    scores.masked_fill_(kp == qp, SELF_SCORE).masked_fill_(~allowed, float("-inf"))
    # softmax, not exp(scores - lse): near SELF_SCORE fp32 has too few bits for that difference
    out = torch.einsum("bhncij,bhncjd->bhncid", torch.softmax(scores, dim=-1), vv)  # [B, H, n, C, L, Dh]
    if n_hashes == 1:
        return unsort_rows(out, undo)[:, :, 0, :T]
    lse = scores.logsumexp(dim=-1, keepdim=True)  # [B, H, n, C, L, 1]: how much each round found

    out, lse = unsort_rows(out, undo), unsort_rows(lse, undo)
    weights = torch.softmax(lse, dim=2)  # [B, H, n, Tp, 1]: each round by how much it found
    return (weights * out).sum(dim=2)[:, :, :T]


def unsort_rows(x: torch.Tensor, undo: torch.Tensor) -> torch.Tensor:
    """[B, H, n, C, L, X] in hash order -> [B, H, n, Tp, X] in position order (undo [B, H, n, Tp])."""
    B, H, n, C, L, X = x.shape
    return x.reshape(B, H, n, C * L, X).gather(3, undo.unsqueeze(-1).expand(-1, -1, -1, -1, X))


class LSHAttention(nn.Module):
    """Drop-in for transformer.Attention with ``model.attention: lsh`` (same q/v/o names; no k_proj).

    ``mask`` here is the packed row's segment ids [B, T] (Transformer.hidden_states passes them
    instead of a dense T x T mask, which would defeat the point)."""

    def __init__(self, cfg: ModelConfig, layer_index: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.n_hashes, self.bucket_size = cfg.lsh_n_hashes, cfg.lsh_bucket_size
        self.seed = cfg.lsh_seed * 1000 + layer_index  # each layer its own rotations
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        from lmfoundry.model.transformer import apply_rope

        if cache is not None:
            raise ValueError(
                "model.attention is 'lsh', which has no KV cache (buckets change as the row grows): "
                "generate with use_cache=False, or use model.attention: dense"
            )
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, Dh]
        v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # [B, H, T, Dh]
        q = apply_rope(q, cos, sin)
        y = lsh_attention(q, v, self.n_hashes, self.bucket_size, self.seed, segments=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def dense_shared_qk_attention(q: torch.Tensor, v: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
    """The reference LSH approximates: q, v [B, H, T, Dh] -> [B, H, T, Dh], every earlier key
    (keys = normalised q), a token's own key only when it has nothing else. O(T^2) memory."""
    T = q.shape[2]
    k = F.normalize(q, dim=-1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, T, T]
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if segments is not None:
        allowed = allowed & (segments.unsqueeze(2) == segments.unsqueeze(1)).unsqueeze(1)
    eye = torch.eye(T, dtype=torch.bool, device=q.device)
    scores = scores.masked_fill(eye, SELF_SCORE).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
