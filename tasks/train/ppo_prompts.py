"""The prompts PPO generates from: the preference data's prompts, or a prompts file.

    train, val, counts = preference_prompts(store, preference_ref)        # token id lists
    train, val, counts = file_prompts(cfg.ppo, tokenizer)                 # cfg.ppo.prompts_file

Every prompt is the chat template's rendering of the conversation so far followed by the
generation prompt ``<|assistant|>`` (model/chat.py ``prompt_ids``), deduplicated, in input order.

- preference_data: each pair's chosen side up to its first scored token (``chosen_mask``), i.e.
  the rendered prompt and ``<|assistant|>``; train and val prompts come from the stage's own
  splits.
- a prompts file (JSONL or Parquet, local or any fsspec URL, a glob or a directory): one prompt
  per row, ``{"prompt": "text"}`` (optionally with ``"system"``), or ``{"messages": [...]}`` (a
  conversation; trailing assistant messages are dropped, so it ends with a user turn). A row
  that is not one of these stops the stage naming ``file:line`` and the field. About 5% of the
  prompts go to val by a stable hash of their messages (as the chat data stages split).
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa

from lmfoundry.infra.config_posttrain import ChatSourceConfig, PpoConfig
from lmfoundry.infra.files import InputError, match_files
from lmfoundry.infra.store import StageRef, Store
from lmfoundry.model.chat import prompt_ids
from lmfoundry.model.chat_loader import read_index
from lmfoundry.tasks.chat.common import ChatTokenizer, split_key, val_flags
from lmfoundry.tasks.chat.readers import DATA_SUFFIXES, BadRow, ChatDataError, ChatFile, fingerprint, read_rows
from lmfoundry.tasks.chat.shapes import check_order, normalise_messages, system_prefix, turn

VAL_FRACTION = 0.05  # of a prompts file


def preference_prompts(store: Store, ref: StageRef) -> tuple[list[list[int]], list[list[int]]]:
    """(train, val) prompts of a preference_data stage, each ending with its <|assistant|> token."""
    reader, index = read_index(store, ref, "preference")
    splits: dict[str, dict[tuple[int, ...], None]] = {}
    for split in ("train", "val"):
        seen: dict[tuple[int, ...], None] = {}
        for entry in index["splits"].get(split, []):
            table = pa.ipc.open_file(pa.memory_map(reader.local_path(entry["path"]), "r")).read_all()
            for ids, mask in zip(table.column("chosen").to_pylist(), table.column("chosen_mask").to_pylist()):
                # the reply starts at the first scored token, right after the generation prompt <|assistant|>
                start = mask.index(1) if 1 in mask else 0
                if start < 2:
                    raise InputError(f"{ref.stage}/{ref.version}/{entry['path']}: a pair's chosen_mask marks no reply after a prompt; re-run the preference_data stage")
                seen[tuple(ids[:start])] = None
        splits[split] = seen
    generation_prompts = {p[-1] for seen in splits.values() for p in seen}
    if len(generation_prompts) > 1:
        raise InputError(f"{ref.stage}/{ref.version}: the token before the reply differs between pairs {sorted(generation_prompts)[:5]}; it must be <|assistant|>")
    return [list(p) for p in splits["train"]], [list(p) for p in splits["val"]]


def parse_prompt(obj: Any) -> list[dict[str, str]]:
    """One prompts-file row -> the messages to continue (ending with a user turn); BadRow if malformed."""
    if not isinstance(obj, dict):
        raise BadRow("bad_type", None, f"the row is a {type(obj).__name__}, expected an object with 'prompt' or 'messages'")
    if "messages" in obj:
        messages = normalise_messages(obj["messages"], "messages")
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()  # the policy writes its own reply
        field = "messages"
    elif "prompt" in obj:
        messages = [*system_prefix(obj), *turn(obj, "prompt", "user")]
        field = "prompt"
    else:
        raise BadRow("missing_field", "prompt", "is missing: a prompt row has 'prompt' (text) or 'messages' (a conversation ending with a user turn)")
    check_order(messages, field)
    if not messages or messages[-1]["role"] != "user":
        raise BadRow("no_user_turn", field, "does not end with a user message: nothing to reply to")
    return messages


def prompt_files(cfg: PpoConfig) -> list[ChatFile]:
    """The files ppo.prompts_file names; an error naming the field when there are none."""
    source = ChatSourceConfig(paths=[cfg.prompts_file], storage_options=cfg.prompts_storage_options, name="ppo.prompts_file")
    try:
        found = match_files(cfg.prompts_file, cfg.prompts_storage_options, DATA_SUFFIXES)
    except (OSError, ValueError) as exc:
        raise ChatDataError(f"ppo.prompts_file '{cfg.prompts_file}' cannot be listed: {exc}") from exc
    if not found:
        raise ChatDataError(f"ppo.prompts_file '{cfg.prompts_file}' matched no files; check the path, or set ppo.prompts_file: null to use the preference data's prompts")
    return [ChatFile(source, "ppo.prompts_file", f.url, f.size, f.stamp) for f in found]


def prompts_fingerprint(cfg: PpoConfig) -> str:
    """Changes when a prompts file is added, removed or modified; empty without a prompts file."""
    return fingerprint(prompt_files(cfg)) if cfg.prompts_file else ""


def file_prompts(cfg: PpoConfig, tok: ChatTokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """(train, val) prompts of ppo.prompts_file, rendered with the tokenizer's chat tokens."""
    conversations: list[list[dict[str, str]]] = []
    for f in prompt_files(cfg):
        for location, obj in read_rows(f):
            try:
                if isinstance(obj, BadRow):
                    raise obj
                conversations.append(parse_prompt(obj))
            except BadRow as exc:
                raise ChatDataError(f"{location}: {exc.describe()}; fix the row (ppo.prompts_file)") from None
    if not conversations:
        raise ChatDataError(f"ppo.prompts_file '{cfg.prompts_file}' holds no prompts")
    ids = tok.encode_all(m["content"] for messages in conversations for m in messages)
    flags = val_flags([split_key(messages, cfg.seed) for messages in conversations], VAL_FRACTION)
    train: dict[tuple[int, ...], None] = {}
    val: dict[tuple[int, ...], None] = {}
    for messages, to_val in zip(conversations, flags):
        (val if to_val else train)[tuple(prompt_ids(messages, ids.__getitem__, tok.special))] = None
    return [list(p) for p in train], [list(p) for p in val]
