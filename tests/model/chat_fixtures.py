"""Small committed `sft_data` / `preference_data` / `train_tokenizer` stages for post-training tests.

They follow the post-training contract exactly (what tasks/chat/ writes): uncompressed Arrow IPC
files plus an index.json. Conversations are rendered with the real chat template
(model/chat.py) over a word-level vocabulary: token id i is the word ``t{i}``, so test data can
be written as id lists and decoded by eye.

    store = Store(str(tmp_path))
    sft = commit_sft_data(store, [conversation(3, seed=i) for i in range(40)], val=[...], seq_len=32)
    prefs = commit_preference_data(store, *separable_pairs(200, seed=0), seq_len=32)
    tokenizer = commit_chat_tokenizer(store)
"""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa

from lmfoundry.infra.store import StageRef, Store
from lmfoundry.model.chat import render

EOS, PAD, BOS, SYSTEM, USER, ASSISTANT, END = range(7)
SPECIAL = {"eos": EOS, "pad": PAD, "bos": BOS, "system": SYSTEM, "user": USER, "assistant": ASSISTANT, "end": END}
FIRST_WORD = 7
VOCAB = 64


def words(ids) -> str:
    return " ".join(f"t{i}" for i in ids)


def encode(text: str) -> list[int]:
    return [int(w[1:]) for w in text.split()]


def conversation(turns: int, seed: int, vocab: int = VOCAB, length: tuple[int, int] = (2, 6), system: bool = False) -> list[dict]:
    """Alternating user/assistant messages of random words; the assistant repeats the user's words
    reversed, so a model can learn the replies from the prompts."""
    rng = np.random.default_rng(seed)
    messages = [{"role": "system", "content": words(rng.integers(FIRST_WORD, vocab, 2))}] if system else []
    for _ in range(turns):
        asked = rng.integers(FIRST_WORD, vocab, int(rng.integers(*length)))
        messages += [{"role": "user", "content": words(asked)}, {"role": "assistant", "content": words(asked[::-1])}]
    return messages


def pack(conversations: list[list[dict]], seq_len: int) -> dict[str, np.ndarray]:
    """Whole conversations first-fit into rows of seq_len + 1 tokens; the tail of a row is padding
    with its own positions 0, 1, ... and mask 0. Returns tokens / loss_mask / positions [rows, seq_len + 1]."""
    width = seq_len + 1
    rows: list[list[tuple[list[int], list[int]]]] = []
    for messages in conversations:
        ids, mask = render(messages, encode, SPECIAL)
        if len(ids) > width:
            raise ValueError(f"a fixture conversation of {len(ids)} tokens does not fit seq_len + 1 = {width}")
        for row in rows:
            if sum(len(i) for i, _ in row) + len(ids) <= width:
                row.append((ids, mask))
                break
        else:
            rows.append([(ids, mask)])
    out = {name: np.zeros((len(rows), width), dtype=np.int64) for name in ("tokens", "loss_mask", "positions")}
    for r, row in enumerate(rows):
        tokens = [t for ids, _ in row for t in ids]
        mask = [m for _, ms in row for m in ms]
        positions = [p for ids, _ in row for p in range(len(ids))]
        pad = width - len(tokens)
        out["tokens"][r] = tokens + [PAD] * pad
        out["loss_mask"][r] = mask + [0] * pad
        out["positions"][r] = positions + list(range(pad))
    return out


def _ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(1, (table.num_rows + 1) // 2))  # several record batches
    return sink.getvalue()


def sft_table(rows: dict[str, np.ndarray]) -> pa.Table:
    width = rows["tokens"].shape[1]
    types = {"tokens": pa.uint32(), "loss_mask": pa.uint8(), "positions": pa.uint16()}
    return pa.table({
        name: pa.FixedSizeListArray.from_arrays(pa.array(rows[name].ravel(), type=types[name]), width) for name in ("tokens", "loss_mask", "positions")
    })


def _index(fmt: str, seq_len: int, vocab: int, splits: dict, **extra) -> dict:
    return {"format": fmt, "seq_len": seq_len, "pad_id": PAD, "eos_id": EOS, "bos_id": BOS, "end_id": END, "vocab_size": vocab, "splits": splits, **extra}


def commit_sft_data(store: Store, train: list[list[dict]], val: list[list[dict]], seq_len: int = 32, vocab: int = VOCAB, stage: str = "sft_data") -> StageRef:
    """A committed sft_data stage: the train conversations packed into two files, val into one."""
    version = hashlib.sha256(json.dumps([train, val, seq_len, vocab]).encode()).hexdigest()[:16]
    if store.is_committed(stage, version):  # the same data committed by an earlier test
        return store.ref(stage, version)
    out = store.open_for_write(stage, version)
    splits: dict[str, list] = {"train": [], "val": []}
    assistant_tokens = 0
    for split, conversations in (("train", train), ("val", val)):
        rows = pack(conversations, seq_len)
        assistant_tokens += int(rows["loss_mask"].sum())
        parts = np.array_split(np.arange(len(rows["tokens"])), 2 if split == "train" and len(rows["tokens"]) > 1 else 1)
        for i, part in enumerate(parts):
            path = f"{split}/part-{i:05d}.arrow"
            out.write_bytes(path, _ipc(sft_table({k: v[part] for k, v in rows.items()})), rows=len(part))
            splits[split].append({"path": path, "samples": len(part)})
    out.write_json("index.json", _index("sft", seq_len, vocab, splits, conversations=len(train) + len(val), assistant_tokens=assistant_tokens, packing="reset_positions"))
    return store.commit(out, {"stats": {}})


# ---------------------------------------------------------------------- preference pairs


def pair_rows(pairs: list[tuple[list[dict], str, str]]) -> dict[str, list]:
    """(prompt messages, chosen reply text, rejected reply text) -> the preference columns."""
    cols: dict[str, list] = {name: [] for name in ("chosen", "chosen_mask", "rejected", "rejected_mask", "prompt_len", "id")}
    for prompt, chosen, rejected in pairs:
        prompt_len = len(render(prompt, encode, SPECIAL)[0])
        for side, reply in (("chosen", chosen), ("rejected", rejected)):
            ids, mask = render([*prompt, {"role": "assistant", "content": reply}], encode, SPECIAL)
            cols[side].append(ids)
            cols[f"{side}_mask"].append(mask)
        cols["prompt_len"].append(prompt_len)
        cols["id"].append(hashlib.sha256(json.dumps([prompt, chosen, rejected]).encode()).hexdigest()[:16])
    return cols


def preference_table(cols: dict[str, list]) -> pa.Table:
    return pa.table({
        "chosen": pa.array(cols["chosen"], type=pa.list_(pa.uint32())),
        "chosen_mask": pa.array(cols["chosen_mask"], type=pa.list_(pa.uint8())),
        "rejected": pa.array(cols["rejected"], type=pa.list_(pa.uint32())),
        "rejected_mask": pa.array(cols["rejected_mask"], type=pa.list_(pa.uint8())),
        "prompt_len": pa.array(cols["prompt_len"], type=pa.uint32()),
        "id": pa.array(cols["id"], type=pa.string()),
    })


def commit_preference_data(store: Store, train: list, val: list, seq_len: int = 32, vocab: int = VOCAB, stage: str = "preference_data") -> StageRef:
    """A committed preference_data stage: train pairs in two files, val in one."""
    version = hashlib.sha256(json.dumps([train, val, seq_len, vocab]).encode()).hexdigest()[:16]
    if store.is_committed(stage, version):  # the same data committed by an earlier test
        return store.ref(stage, version)
    out = store.open_for_write(stage, version)
    splits: dict[str, list] = {"train": [], "val": []}
    for split, pairs in (("train", train), ("val", val)):
        parts = [pairs[: len(pairs) // 2], pairs[len(pairs) // 2 :]] if split == "train" and len(pairs) > 1 else [pairs]
        for i, part in enumerate(parts):
            cols = pair_rows(part)
            if any(len(ids) > seq_len + 1 for side in ("chosen", "rejected") for ids in cols[side]):
                raise ValueError(f"a fixture pair is longer than seq_len + 1 = {seq_len + 1}")
            path = f"{split}/part-{i:05d}.arrow"
            out.write_bytes(path, _ipc(preference_table(cols)), rows=len(part))
            splits[split].append({"path": path, "samples": len(part)})
    out.write_json("index.json", _index("preference", seq_len, vocab, splits, pairs=len(train) + len(val)))
    return store.commit(out, {"stats": {}})


def separable_pairs(n: int, seed: int = 0, vocab: int = VOCAB, good: int = 10, bad: int = 11) -> list[tuple[list[dict], str, str]]:
    """Pairs whose chosen reply contains word `good` and rejected reply word `bad`, elsewhere alike
    (random words, random position of the marker): a reward model can separate them perfectly."""
    rng = np.random.default_rng(seed)
    plain = [t for t in range(FIRST_WORD, vocab) if t not in (good, bad)]
    pairs = []
    for _ in range(n):
        prompt = [{"role": "user", "content": words(rng.choice(plain, int(rng.integers(2, 6))))}]
        reply = list(rng.choice(plain, int(rng.integers(2, 6))))
        chosen, rejected = list(reply), list(rng.choice(plain, len(reply)))
        chosen.insert(int(rng.integers(0, len(chosen) + 1)), good)
        rejected.insert(int(rng.integers(0, len(rejected) + 1)), bad)
        pairs.append((prompt, words(chosen), words(rejected)))
    return pairs


def chat_tokenizer(vocab: int = VOCAB):
    """A tokenizers.Tokenizer: word level over 't7'..'tN' plus the chat template's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    texts = {role: f"<|{role}|>" for role in SPECIAL}
    vocab_map = {texts[role]: i for role, i in SPECIAL.items()} | {f"t{i}": i for i in range(FIRST_WORD, vocab)}
    tokenizer = Tokenizer(models.WordLevel(vocab_map, unk_token="<|pad|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(list(texts.values()))
    return tokenizer


def commit_chat_tokenizer(store: Store, vocab: int = VOCAB, stage: str = "train_tokenizer") -> StageRef:
    """A word-level tokenizer over 't7'..'tN' plus the special tokens of the chat template."""
    if store.is_committed(stage, f"chat{vocab}"):
        return store.ref(stage, f"chat{vocab}")
    out = store.open_for_write(stage, f"chat{vocab}")
    out.write_bytes("tokenizer.json", chat_tokenizer(vocab).to_str().encode())
    out.write_json("special_tokens.json", SPECIAL)
    return store.commit(out, {"stats": {}})


def commit_model(store: Store, stage: str = "pretrain", seed: int = 0, vocab: int = VOCAB, hf_tokenizer: bool = False, **shape) -> StageRef:
    """A committed training stage holding model/ (our format): a randomly initialised Transformer
    standing in for `pretrain` (or `sft`) when a test is about a later stage; with hf_tokenizer
    also the tokenizer files of an export (hf/tokenizer.json, tokenizer_config.json with the chat template)."""
    import tempfile
    from pathlib import Path

    import torch

    from lmfoundry.infra.config import ModelConfig
    from lmfoundry.model.transformer import Transformer, resolve, save_model

    fields = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, **shape}
    version = hashlib.sha256(json.dumps([fields, seed, vocab, hf_tokenizer]).encode()).hexdigest()[:16]
    if store.is_committed(stage, version):
        return store.ref(stage, version)
    torch.manual_seed(seed)
    model = Transformer(resolve(ModelConfig(**fields), vocab))
    out = store.open_for_write(stage, version)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model.state_dict(), model.cfg, tmp)
        for path in sorted(Path(tmp).iterdir()):
            out.put_file(path, f"model/{path.name}")
        if hf_tokenizer:
            from lmfoundry.model.export import write_tokenizer

            (Path(tmp) / "tokenizer.json").write_text(chat_tokenizer(vocab).to_str())
            write_tokenizer(Path(tmp) / "tokenizer.json", SPECIAL, Path(tmp) / "hf")
            for path in sorted((Path(tmp) / "hf").iterdir()):
                out.put_file(path, f"hf/{path.name}")
    return store.commit(out, {"stats": {}})
