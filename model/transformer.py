"""A decoder-only Transformer in the modern form, in one readable file.

    from lmfoundry.infra.config import ModelConfig
    from lmfoundry.model.transformer import Transformer
    model = Transformer(resolve(ModelConfig(d_model=256, n_layers=4), vocab_size=4096))
    logits, aux = model(tokens)          # tokens [B, T] -> logits [B, T, V]; aux: MoE balance loss
    logits, aux = model(tokens, positions, segments)  # packed rows: several conversations per row
    logits, aux, hidden = model(tokens, return_hidden=True)  # hidden [B, T, D]: final normed states
    logits, aux = model(new_tokens, positions, segments, cache=cache)  # generation (model/generate.py)

Pre-norm blocks: RMSNorm -> grouped-query attention with rotary embeddings (through
``F.scaled_dot_product_attention``, which picks flash / memory-efficient kernels on GPUs) ->
RMSNorm -> SwiGLU feed-forward, or a DeepSeekMoE-style mixture of experts (model/moe.py).
Module names follow Hugging Face's Llama so the export (model/export.py) is a key rename.
Distribution (ZeRO, precision, checkpoints) is applied from outside by model/train.py.

Packed rows (SFT): ``positions`` [B, T] restart at 0 at each packed conversation and index the
rotary tables, and ``segments`` [B, T] (any integer id per conversation) make attention
block-diagonal causal, so a token never sees another conversation. Without them the row is
one causal sequence and SDPA's ``is_causal`` fast path runs.

Generation (model/generate.py) passes a ``KVCache``: each call appends its tokens' keys and
values to preallocated buffers and attends over every filled slot, so a new token costs one
token's work. Slot s is the same in every row of a batch (prompts are left-padded); the
caller gives each token its position and segment (padding gets a segment of its own).

Issue 20 options, each in its own file: ``model.attention: lsh`` swaps Attention for Reformer-style
LSH attention (model/lsh_attention.py), ``model.share_layers: k`` repeats one block over each group
of k layers (model/sharing.py), and ``activation_checkpointing`` (off | all | every:K | attention)
chooses what backward recomputes (model/checkpointing.py).

Shape letters: B batch, T sequence, D d_model, H query heads, K key/value heads,
Dh head dim (D / H), F feed-forward hidden, V vocabulary.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmfoundry.infra.config import ModelConfig
from lmfoundry.model.losses import fused_cross_entropy, linear_cross_entropy
from lmfoundry.model.checkpointing import OFF, checkpointed, parse_policy, run_block
from lmfoundry.model.lsh_attention import LSHAttention, keys_per_query
from lmfoundry.model.moe import MoE
from lmfoundry.model.sharing import is_shared_copy, shared_layers, unique_state_dict


def resolve(cfg: ModelConfig, vocab_size: int | None = None) -> ModelConfig:
    """Fill the fields that default from data or other fields (vocab, ffn_hidden, expert width).

    With ``pad_vocab_to`` > 1 the vocabulary rows round up to its multiple and
    ``token_vocab_size`` keeps the tokenizer's own size (generation and export use only those rows)."""
    vocab = cfg.vocab_size or vocab_size
    if not vocab:
        raise ValueError("model.vocab_size is 0 and no vocabulary size was given by the token shards")
    real = cfg.token_vocab_size or vocab
    padded = cfg.pad_vocab_to * math.ceil(vocab / cfg.pad_vocab_to)
    ffn = cfg.ffn_hidden or 64 * math.ceil(8 * cfg.d_model / 3 / 64)
    expert = cfg.moe_expert_hidden or max(8, ffn // (cfg.moe_top_k + cfg.moe_shared_experts))
    update = {"vocab_size": padded, "token_vocab_size": real if real != padded else 0, "ffn_hidden": ffn}
    return cfg.model_copy(update={**update, "moe_expert_hidden": expert if cfg.moe_experts else 0})


def token_vocab(cfg: ModelConfig) -> int:
    """The tokenizer's vocabulary size: vocab_size less the padding rows (never a real token)."""
    return cfg.token_vocab_size or cfg.vocab_size


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
        # normalise in fp32: bf16 squares lose too much precision
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, Dh] for rotary embeddings, the first and second half of Dh rotated as pairs."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)  # [Dh/2]
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # [T, Dh/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, Dh]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_at(positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables cos, sin [P, Dh] at explicit positions [B, T] (each below P) -> [B, 1, T, Dh] (the 1
    broadcasts over heads). Indexing a table built once needs no host sync on positions.max()."""
    return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """segments [B, T] -> bool [B, 1, T, T], True where query t may attend key s: s <= t, same segment."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()  # [T, T]
    same = segments.unsqueeze(2) == segments.unsqueeze(1)  # [B, T, T]
    return (same & causal).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, Dh]: rotate pairs (i, i + Dh/2) by position-dependent angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.sequence_parallel = None  # set by model/parallel.py: attention through DeepSpeed Ulysses
        # set by model/accel.py use_fa3: flash_attn_func(q, k, v [B, T, heads, Dh], causal=True) for unmasked rows
        self.causal_kernel = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None, cache: "LayerCache | None" = None
    ) -> torch.Tensor:  # [B, T, D]
        B, T, _ = x.shape
        # head counts come from the projections' widths: under tensor parallelism (model/parallel.py)
        # a rank holds H / tp query and K / tp key/value heads
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, K, T, Dh]
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, K, T, Dh]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # generation: keep these keys/values, attend over every filled slot
            k, v = cache.store(k, v)  # [B, K, S, Dh], S = filled slots + T
        if self.sequence_parallel is not None:  # Ulysses (model/parallel.py): attend over the whole sequence, H / sp heads
            y = self.sequence_parallel(q, k, v, mask)
        elif self.causal_kernel is not None and mask is None and cache is None:  # FlashAttention 3 takes [B, T, heads, Dh]
            out = self.causal_kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            out = out[0] if isinstance(out, tuple) else out  # some releases also return the log-sum-exp
            return self.o_proj(out.reshape(B, T, -1))
        else:
            y = attend(q, k, v, mask)  # [B, H, T, Dh]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # [B, T, D]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, T, Dh], k, v [B, K, S, Dh] -> [B, H, T, Dh]; causal, or the given mask [B, 1, T, S]."""
    gqa = k.shape[1] != q.shape[1]  # each group of H / K query heads shares one key/value head
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # block-diagonal causal: a token's own slot is always allowed, so no row is empty
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D] through [..., F]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = LSHAttention(cfg, layer_index) if cfg.attention == "lsh" else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.moe_experts:
            z_ratio = cfg.moe_z_loss_weight / cfg.moe_aux_weight if cfg.moe_z_loss_weight else 0.0  # the trainer scales aux by moe_aux_weight
            self.mlp = MoE(cfg.d_model, cfg.moe_expert_hidden, cfg.moe_experts, cfg.moe_top_k, cfg.moe_shared_experts, expert=SwiGLU, z_loss_ratio=z_ratio)
        else:
            self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None, cache: "LayerCache | None" = None,
        checkpoint_attention: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if checkpoint_attention:  # model/checkpointing.py "attention": norm + attention recomputed in backward
            x = x + checkpointed(lambda h: self.self_attn(self.input_layernorm(h), cos, sin, mask), x)
        else:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)  # [B, T, D]
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            out, aux = self.mlp(h)
        else:
            out, aux = self.mlp(h), x.new_zeros(())
        return x + out, aux


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.vocab_size or not cfg.ffn_hidden:
            raise ValueError("build the model from resolve(cfg, vocab_size), which fills vocab_size and ffn_hidden")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = shared_layers(cfg, lambda i: Block(cfg, i))  # model.share_layers: repeats of one block
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.activation_checkpointing = False
        # sequence parallelism (model/parallel.py): this rank holds slice `sequence_rank` of `sequence_shards`
        self.sequence_rank, self.sequence_shards = 0, 1
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # rope(): tables by (length, device, dtype)
        self.record_activations = False  # set on logging steps: per-layer output mean/std
        self.activation_stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norm weights stay at one
            # residual output projections scaled down so the stream's variance does not grow with depth
            scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        return_hidden: bool = False,
        cache: "KVCache | None" = None,
        targets: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        loss_chunk: int = 4096,
    ):
        """tokens [B, T] -> logits [B, T, V], mean MoE balance loss over MoE layers (0 when dense);
        with return_hidden also the final normed hidden states [B, T, D] (what lm_head reads).
        With targets [B, T]: (CESums, aux) instead, the output projection fused with the
        cross-entropy `loss_chunk` tokens at a time (model/losses.py): no [B, T, V] logits.

        positions [B, T]: rotary position of each token (default 0..T-1); segments [B, T]: tokens
        attend only to earlier tokens of the same segment (default: one segment per row).
        cache: the tokens follow the cache's filled slots (positions and segments required)."""
        hidden, aux = self.hidden_states(tokens, positions, segments, cache)
        if targets is not None:
            if type(self.lm_head) is nn.Linear:  # not replaced by a tensor-parallel layer: fuse it with the loss
                return linear_cross_entropy(hidden, self.lm_head.weight, targets, label_smoothing, loss_chunk), aux
            return fused_cross_entropy(self.lm_head(hidden), targets, label_smoothing, loss_chunk), aux
        logits = self.lm_head(hidden)  # [B, T, V]
        return (logits, aux, hidden) if return_hidden else (logits, aux)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        cache: "KVCache | None" = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward() without the output projection: (final normed hidden [B, T, D], aux); heads read this."""
        if cache is not None:
            return self._cached_hidden_states(tokens, positions, segments, cache)
        T = tokens.shape[1]
        x = self.embed_tokens(tokens)  # [B, T, D]
        cos, sin = self.rope(T * self.sequence_shards, x.device, x.dtype)  # [T, Dh] (whole sequence under SP)
        if positions is not None:  # packed or left-padded rows: positions count within the row, so each is below T
            cos, sin = rope_at(positions, cos, sin)  # [B, 1, T, Dh]
        elif self.sequence_shards > 1:  # a sequence-parallel slice: its tokens' global positions
            start = self.sequence_rank * T
            cos, sin = cos[start : start + T], sin[start : start + T]
        # lsh attention takes the segment ids [B, T] themselves: a dense [B, 1, T, T] mask would defeat it
        mask = None if segments is None else segments if self.cfg.attention == "lsh" else block_causal_mask(segments)
        aux_total = x.new_zeros((), dtype=torch.float32)
        self.activation_stats = []
        policy = parse_policy(self.activation_checkpointing) if self.training else OFF  # model/checkpointing.py
        for index, layer in enumerate(self.layers):
            x, aux = run_block(policy, index, layer, x, cos, sin, mask)
            aux_total = aux_total + aux
            if self.record_activations:
                detached = x.detach().float()
                self.activation_stats.append((detached.mean(), detached.std()))
        return self.norm(x), aux_total / max(1, self.n_moe_layers)

    def rope(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, Dh], built once per (length, device, dtype) and reused by every forward."""
        tables = self._rope_cache.get((length, device, dtype))
        if tables is None:
            head_dim = self.cfg.d_model // self.cfg.n_heads
            if torch.compiler.is_compiling():  # traced into a whole-model graph: it computes them on the device
                return rope_tables(length, head_dim, self.cfg.rope_theta, device, dtype)
            with torch.inference_mode(False):  # made during generation, they must still serve training's autograd
                tables = rope_tables(length, head_dim, self.cfg.rope_theta, device, dtype)
            self._rope_cache[(length, device, dtype)] = tables
        return tables

    def _cached_hidden_states(self, tokens, positions, segments, cache: "KVCache") -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states() for tokens that follow the cache's filled slots; fills their slots."""
        if positions is None or segments is None:
            raise ValueError("a cached forward needs the positions and segments of its tokens")
        mask = cache.attention_mask(segments)  # [B, 1, T, S]; checks that the tokens fit
        x = self.embed_tokens(tokens)  # [B, T, D]
        cos, sin = cache.cos[positions].unsqueeze(1), cache.sin[positions].unsqueeze(1)  # [B, 1, T, Dh]
        aux_total = x.new_zeros((), dtype=torch.float32)
        for layer, layer_cache in zip(self.layers, cache.layers):
            x, aux = layer(x, cos, sin, mask, layer_cache)
            aux_total = aux_total + aux
        cache.length += tokens.shape[1]
        return self.norm(x), aux_total / max(1, self.n_moe_layers)

    # ------------------------------------------------------------------ accounting
    @property
    def n_moe_layers(self) -> int:
        return self.cfg.n_layers if self.cfg.moe_experts else 0

    def num_parameters(self) -> int:
        """Distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def active_matmul_parameters(self) -> int:
        """Weights one token multiplies through in a forward pass: every linear layer, the output
        projection (even when tied), only top_k of the routed experts; not the embedding lookup."""
        total = 0
        for name, module in self.named_modules(remove_duplicate=False):  # a shared layer counts per application
            if isinstance(module, nn.Linear):
                total += module.weight.numel()
        if self.cfg.moe_experts:
            per_expert = 3 * self.cfg.d_model * self.cfg.moe_expert_hidden
            idle = self.cfg.moe_experts - self.cfg.moe_top_k
            total -= self.cfg.n_layers * idle * per_expert
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the weights (forward 2N, backward 4N) plus attention
        scores and weighted values, 2 * 2 * T * D per layer forward, times 3 for training (LSH
        attention: its keys per query, lsh_attention.keys_per_query, instead of T)."""
        return 6 * self.active_matmul_parameters() + 12 * self.cfg.n_layers * self.cfg.d_model * keys_per_query(self.cfg, seq_len)

    def expert_load(self) -> list[list[float]]:
        """Per MoE layer, the fraction of routed slots each expert took in the last forward."""
        return [layer.mlp.load.tolist() for layer in self.layers if isinstance(layer.mlp, MoE)]


# ---------------------------------------------------------------------- generation cache


class KVCache:
    """Keys and values of earlier tokens, preallocated for ``max_len`` slots (model/generate.py).

    Every row fills the same slots (batches are left-padded); ``length`` slots are filled.
    ``segments`` [B, max_len] keeps each filled slot's segment for the attention mask, and the
    rotary tables cover positions 0 .. max_len - 1 (a position never exceeds its slot)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype: torch.dtype = torch.float32):
        head_dim = cfg.d_model // cfg.n_heads
        self.max_len, self.length = max_len, 0
        self.layers = [LayerCache(self, batch, cfg.n_kv_heads, max_len, head_dim, device, dtype) for _ in range(cfg.n_layers)]
        self.segments = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.cos, self.sin = rope_tables(max_len, head_dim, cfg.rope_theta, device, dtype)  # [max_len, Dh]

    def attention_mask(self, segments: torch.Tensor) -> torch.Tensor:
        """segments [B, T] of the next T tokens -> additive mask [B, 1, T, length + T]: 0 where the
        key slot is earlier or the same and in the same segment, -inf elsewhere."""
        start, end = self.length, self.length + segments.shape[1]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} slots; {end} were asked for")
        self.segments[:, start:end] = segments
        same = segments.unsqueeze(2) == self.segments[:, :end].unsqueeze(1)  # [B, T, S]
        if end - start > 1:  # one new token (a decoding step) sees every filled slot: no causal part
            slots = torch.arange(end, device=segments.device)
            same &= slots.unsqueeze(0) <= slots[start:].unsqueeze(1)  # [T, S] causal
        # additive (0 / -inf) once per step: SDPA would convert a bool mask in every layer
        return torch.zeros(same.shape, dtype=self.cos.dtype, device=same.device).masked_fill_(~same, float("-inf")).unsqueeze(1)


class LayerCache:
    """One layer's buffers of a KVCache: k, v [B, K, max_len, Dh]."""

    def __init__(self, cache: KVCache, batch: int, kv_heads: int, max_len: int, head_dim: int, device, dtype):
        self.cache = cache
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def store(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, K, T, Dh] into the next T slots; return every filled slot [B, K, length + T, Dh]."""
        start, end = self.cache.length, self.cache.length + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


# ---------------------------------------------------------------------- saved weights

WEIGHTS = "model.safetensors"
CONFIG = "model_config.json"


def save_model(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, directory: str | Path) -> None:
    """Our own format (works for dense and MoE): model.safetensors + model_config.json."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage: a tied lm_head is rebuilt from the embedding on load
    state_dict = unique_state_dict(state_dict, cfg)  # shared layers: once, under their group's first layer
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True))


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """A Transformer from save_model's directory (e.g. a pretrain stage's model/ folder)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = ModelConfig.model_validate_json((directory / CONFIG).read_text())
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(load_file(str(directory / WEIGHTS)), strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight") and not is_shared_copy(k, cfg)]
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS} does not match model_config.json: missing {missing}, unexpected {unexpected}")
    return model.to(dtype)
