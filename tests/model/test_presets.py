"""The GPU pretraining presets (configs/pretrain-350m.yaml, configs/pretrain-1b.yaml) load, resolve
to the fast path on cuda and build the parameter counts their comments promise (on the meta
device: shapes only, nothing allocated)."""
from __future__ import annotations

import pytest
import torch

from lmfoundry.infra.config import REPO_ROOT, load_config
from lmfoundry.model.engine import batch_split
from lmfoundry.model.transformer import Transformer, resolve


def by_hand(d: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int) -> int:
    """Tied embedding + per layer: q, o (d x d), k, v (d x kv_heads * 128), SwiGLU 3 d f, two norms; final norm."""
    head = d // heads
    attention = 2 * d * d + 2 * d * kv_heads * head
    return vocab * d + layers * (attention + 3 * d * ffn + 2 * d) + d


@pytest.mark.parametrize(
    "preset, shape, params, micro, accumulation",
    [
        ("configs/pretrain-350m.yaml", (1024, 24, 8, 8, 2752), 337_167_360, 32, 8),
        ("configs/pretrain-1b.yaml", (2048, 20, 16, 8, 5504), 995_182_592, 16, 32),
    ],
)
def test_preset_builds_its_parameter_count(preset, shape, params, micro, accumulation):
    cfg = load_config(REPO_ROOT / preset)
    assert (cfg.pretrain.precision, cfg.pretrain.distributed.backend, cfg.pretrain.distributed.compile) == ("bf16", "nccl", True)
    assert cfg.model.d_model // cfg.model.n_heads == 128 and cfg.model.pad_vocab_to == 128
    # a trained tokenizer can come out smaller than asked: the rows still pad to a multiple of 128
    real = cfg.tokenizer.vocab_size - 37
    model_cfg = resolve(cfg.model, real)
    assert model_cfg.vocab_size == cfg.tokenizer.vocab_size == 32768 and model_cfg.token_vocab_size == real
    with torch.device("meta"):
        model = Transformer(model_cfg)
    assert all(p.is_meta for p in model.parameters())
    assert model.num_parameters() == by_hand(*shape, vocab=32768) == params
    # one H200: the per-rank batch splits into the commented micro batches
    assert batch_split(cfg.pretrain.global_batch_size, 1, cfg.pretrain.distributed.micro_batch_size) == (micro, accumulation)
    assert cfg.tokenize.seq_len == 2048
