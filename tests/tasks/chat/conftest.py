"""A committed train_tokenizer stage for the chat data stages, and readers of their output."""
from __future__ import annotations

import pyarrow as pa
import pytest

from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.infra.store import StageRef, Store
from lmfoundry.tasks.tokens.train_tokenizer import load_tokenizer
from tests.helpers import commit_docs

TOKENIZER = StageSpec("train_tokenizer", "lmfoundry.tasks.tokens.train_tokenizer:run_train_tokenizer", section="tokenizer")
SFT = StageSpec("sft_data", "lmfoundry.tasks.chat.sft_data:run_sft_data", section="sft_data", inputs=("train_tokenizer",))
PREFERENCE = StageSpec(
    "preference_data", "lmfoundry.tasks.chat.preference_data:run_preference_data", section="preference_data", inputs=("train_tokenizer",)
)


@pytest.fixture
def tokenizer_ref(store) -> StageRef:
    """The smallest vocabulary the stage allows (bytes + specials + one merge, 'zq'): every other
    ASCII character is exactly one token, so tests can plan lengths by counting characters."""
    ref = commit_docs(store, [[{"id": "d0", "text": "zq " * 50}]])
    cfg = PipelineConfig.model_validate({"tokenizer": {"vocab_size": 264, "normalization": "none"}})
    return run_stage(store, TOKENIZER, cfg, [ref]).ref


def plain_encoder(store: Store, ref: StageRef):
    """Content encoded as plain text, straight from the tokenizer (independent of model/chat.py)."""
    tok, special = load_tokenizer(store, ref)
    tok.encode_special_tokens = True
    return (lambda text: tok.encode(text, add_special_tokens=False).ids), special, tok


def expected_conversation(messages: list[dict], encode, special: dict[str, int]) -> tuple[list[int], list[int]]:
    """The contract's rendering, written out: <|bos|> then <|role|> content <|end|> per message;
    targets are assistant content and its <|end|>."""
    ids, mask = [special["bos"]], [0]
    for m in messages:
        body = encode(m["content"])
        ids += [special[m["role"]], *body, special["end"]]
        mask += [0] + [1 if m["role"] == "assistant" else 0] * (len(body) + 1)
    return ids, mask


def read_table(store: Store, ref: StageRef, path: str) -> pa.Table:
    return pa.ipc.open_file(pa.BufferReader(store.reader(ref).read_bytes(path))).read_all()


def read_split(store: Store, ref: StageRef, split: str) -> pa.Table | None:
    index = store.reader(ref).read_json("index.json")
    tables = [read_table(store, ref, entry["path"]) for entry in index["splits"][split]]
    return pa.concat_tables(tables) if tables else None


def segments(table: pa.Table, pad: int) -> list[tuple[list[int], list[int]]]:
    """(tokens, loss_mask) of each conversation in packed rows, in row order (pad tails left out)."""
    out = []
    for tokens, mask, positions in zip(*(table.column(c).to_pylist() for c in ("tokens", "loss_mask", "positions"))):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(tokens)]
        for a, b in zip(starts, starts[1:]):
            if tokens[a] != pad:
                out.append((tokens[a:b], mask[a:b]))
    return out
