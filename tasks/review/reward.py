"""The reward-model margin of preference pairs: r(chosen) - r(rejected) from a reward model trained earlier.

The reward model of this run is trained after the review point (annotate_pairs sits before
reward_model), so the one named here comes from an earlier run, another pipeline in the same
store, or a directory:

    review_pairs:
      reward_model: reward_model@3f2a9c0d1e2b4a5c   # a committed version of stage reward_model in this store
      reward_model: /models/rm                       # or a directory: model.safetensors, model_config.json, reward.json

A store version is immutable, so the string itself is the identity; a directory's files are
hashed into the stage's input fingerprint (a retrained model in the same place: a new version).
Scores are computed on CPU without gradients, the sides of several pairs per forward, each side
right-padded and read at its last real token as the reward_model stage trained it.
"""
from __future__ import annotations

import hashlib
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from lmfoundry.infra.store import Store

FIELD = "review_pairs.reward_model"
STORE_REF = re.compile(r"^([a-z_][a-z0-9_]*)@([0-9a-f]{16})$")
FILES = ("model.safetensors", "model_config.json", "reward.json")  # what model/heads.save_reward_model writes
HOW = (
    "name a committed version as reward_model@<version> (`lmf status` / the store's stages/reward_model/ list them) "
    "or a directory holding model.safetensors, model_config.json and reward.json (a reward_model stage's model/ folder)"
)


class RewardModelError(ValueError):
    pass


def store_ref(value: str) -> tuple[str, str] | None:
    """(stage, version) when the value names a store version, else None (a directory)."""
    match = STORE_REF.match(value.strip())
    return (match.group(1), match.group(2)) if match else None


@lru_cache(maxsize=8)
def _hash_files(directory: str, stamp: tuple) -> str:
    digest = hashlib.sha256()
    for name in FILES:
        digest.update(name.encode() + b"\0")
        with open(os.path.join(directory, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def fingerprint(value: str | None) -> str:
    """The input fingerprint of a directory's model (contents of its three files); "" for none or a
    store version (its name is already in the identity). Never raises: a missing model is the
    stage's error, with instructions, when it runs."""
    if not value or store_ref(value):
        return ""
    directory = os.path.abspath(os.path.expanduser(value))
    try:
        stamp = tuple((name, os.stat(os.path.join(directory, name)).st_size, os.stat(os.path.join(directory, name)).st_mtime_ns) for name in FILES)
        return f"reward-model:{_hash_files(directory, stamp)}"
    except OSError:
        return f"reward-model:missing:{directory}"


def model_directory(store: Store, value: str) -> str:
    """A local directory holding the named reward model; a RewardModelError naming the field if not."""
    ref = store_ref(value)
    if ref is not None:
        stage, version = ref
        if store.manifest(stage, version) is None:
            raise RewardModelError(f"{FIELD}: stage '{stage}' version {version} is not committed in {store.url}; {HOW}")
        reader = store.reader(store.ref(stage, version))
        paths = {os.path.basename(p): reader.local_path(p) for p in reader.files("model/")}
        if not set(FILES) <= set(paths):
            raise RewardModelError(f"{FIELD}: {stage}/{version} holds no reward model (model/ lacks {sorted(set(FILES) - set(paths))}); {HOW}")
        return os.path.dirname(paths[FILES[0]])
    directory = Path(value).expanduser()
    missing = [name for name in FILES if not (directory / name).is_file()]
    if missing:
        raise RewardModelError(f"{FIELD}: {value} is not a reward model directory (missing {', '.join(missing)}); {HOW}")
    return str(directory)


def load(store: Store, value: str):
    """The reward model (fp32, eval mode) and its reward.json."""
    from lmfoundry.model.heads import load_reward_model, reward_stats

    directory = model_directory(store, value)
    try:
        model = load_reward_model(directory)
    except Exception as exc:  # safetensors raises its own error type for a damaged file
        raise RewardModelError(f"{FIELD}: cannot load the reward model in {directory}: {exc}; {HOW}") from exc
    return model.eval(), reward_stats(directory)


def side_scores(model, sides: list[list[int]], pad_id: int, batch_size: int = 16) -> list[float]:
    """The reward of each token sequence (prompt + reply), batch_size sequences per forward."""
    import torch

    vocab = model.cfg.vocab_size
    top = max((max(ids) for ids in sides if ids), default=-1)
    if top >= vocab:
        raise RewardModelError(f"{FIELD}: the pairs hold token id {top} but the reward model's vocabulary has {vocab}: it was trained with another tokenizer; name a reward model trained on this tokenizer")
    scores: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(sides), batch_size):
            chunk = sides[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            tokens = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            for row, ids in enumerate(chunk):
                tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            lengths = torch.tensor([len(ids) for ids in chunk], dtype=torch.long)
            out, _ = model(tokens, lengths)
            scores += out.tolist()
    return scores


def pair_margins(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 16) -> list[dict[str, Any]]:
    """Per pair (chosen sequence, rejected sequence): {"rm_chosen", "rm_rejected", "rm_margin"}.
    The sides are scored in order, batch_size sequences per forward (padding never changes a score:
    attention is causal and each side is read at its own last token)."""
    sides = [ids for pair in pairs for ids in pair]
    if any(not ids for ids in sides):
        raise RewardModelError(f"{FIELD}: a preference pair has an empty side; rebuild the preference_data stage")
    scores = side_scores(model, sides, pad_id, batch_size)
    out = []
    for i in range(len(pairs)):
        chosen, rejected = scores[2 * i], scores[2 * i + 1]
        out.append({"rm_chosen": round(chosen, 6), "rm_rejected": round(rejected, 6), "rm_margin": round(chosen - rejected, 6)})
    return out
