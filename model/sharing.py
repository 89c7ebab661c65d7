"""Cross-layer parameter sharing, ALBERT-style (``model.share_layers: k``): each group of k
consecutive layers applies one block's weights k times.

    model:
      n_layers: 8
      share_layers: 2     # layers 0-1 share block 0's weights, 2-3 block 2's, ...; 1 = off

``Transformer.layers`` still has ``n_layers`` entries (the same module object repeated inside a
group), so everything that walks the layers (the forward loop, the KV cache, activation stats,
checkpointing) sees every application. What changes:

- ``parameters()`` yields each shared tensor once: ``num_parameters()`` counts unique weights,
  and DeepSpeed/ZeRO partitions each once (autograd sums the k gradients into it);
- ``state_dict()`` names a shared tensor under every layer that uses it. Our saved format keeps
  only the first layer of each group (``unique_state_dict``; safetensors refuses aliases) and
  ``load_model`` fills the rest by sharing; the Hugging Face export unrolls
  (``unrolled_state_dict``: a plain Llama with the weights copied into every layer);
- FLOPs count every application (``Transformer.flops_per_token``), so MFU stays right.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from lmfoundry.infra.config import ModelConfig

_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


def group_of(layer: int, share: int) -> int:
    """The layer whose weights layer `layer` applies (the first of its group)."""
    return layer - layer % share


def shared_layers(cfg: ModelConfig, make_block: Callable[[int], nn.Module]) -> nn.ModuleList:
    """n_layers entries; entry i is the block made for the first layer of i's group."""
    share = cfg.share_layers
    blocks: dict[int, nn.Module] = {}
    for i in range(cfg.n_layers):
        if group_of(i, share) not in blocks:
            blocks[group_of(i, share)] = make_block(i)
    return nn.ModuleList(blocks[group_of(i, share)] for i in range(cfg.n_layers))


def _layer_index(key: str) -> int | None:
    match = _LAYER.search(key)
    return int(match.group(2)) if match else None


def unique_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Drop the keys of layers that only repeat their group's first layer (any key prefix)."""
    if cfg.share_layers == 1:
        return state
    return {k: v for k, v in state.items() if (i := _layer_index(k)) is None or i % cfg.share_layers == 0}


def is_shared_copy(key: str, cfg: ModelConfig) -> bool:
    """True for a key that load_state_dict may report missing: a layer filled by sharing."""
    i = _layer_index(key)
    return cfg.share_layers > 1 and i is not None and i % cfg.share_layers != 0


def unrolled_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every layer's keys, each repeat a copy of its group's first layer (a plain, unshared model)."""
    if cfg.share_layers == 1:
        return state
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        i = _layer_index(key)
        if i is None:
            out[key] = tensor
            continue
        if i % cfg.share_layers:
            continue  # taken from the group's first layer, whether or not the state named it
        for j in range(i, min(i + cfg.share_layers, cfg.n_layers)):
            match = _LAYER.search(key)
            out[key[: match.start()] + f"{match.group(1)}layers.{j}." + key[match.end():]] = tensor.clone()
    return out
