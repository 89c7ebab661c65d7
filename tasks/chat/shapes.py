"""The row shapes people already have, turned into validated messages or preference pairs.

Conversations (sft_data):

- ``messages``: ``{"messages": [{"role", "content"}, ...]}``; also ShareGPT's
  ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}``.
- ``instruction``: ``{"instruction", "input"?, "output", "system"?}`` (Alpaca); the user turn
  is the instruction, then a blank line and the input when there is one.
- ``prompt_response``: ``{"prompt", "response"|"completion", "system"?}``, strings, or
  message lists (TRL's conversational prompt/completion).

Preference pairs (preference_data):

- ``preference``: ``{"prompt"?, "chosen", "rejected"}``. chosen/rejected are the reply
  strings, or message lists whose last message is the assistant reply and whose earlier
  messages, if any, repeat the prompt (UltraFeedback-binarized). Without a prompt the shared
  earlier messages are the prompt.
- ``hh_rlhf``: ``{"chosen", "rejected"}`` full transcripts ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``
  (Anthropic HH-RLHF): the longest shared prefix that ends at an ``Assistant:`` marker is the
  prompt, the rest of each side its reply.

``auto`` picks the shape per row from its keys. Rules checked on every conversation: roles
are system, user, assistant (``bad_role``); content is a non-blank string (``bad_type``,
``empty_content``); a system message only comes first, then user and assistant alternate
starting with user (``roles_out_of_order``); there is an assistant turn
(``no_assistant_turn``). Other reasons: ``invalid_json`` (readers), ``unknown_shape``,
``missing_field``, ``prompt_mismatch``, ``bad_transcript``, ``identical_pair``. A failed
rule raises ``BadRow`` naming the field, e.g. ``messages[2].role``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lmfoundry.tasks.chat.readers import BadRow

Message = dict[str, str]
CONVERSATION_SHAPES = ("messages", "instruction", "prompt_response")
PREFERENCE_SHAPES = ("preference", "hh_rlhf")
# ShareGPT speaker names -> our roles
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "system": "system"}
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")
HH_ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class Pair:
    prompt: list[Message]  # ends with a user message
    chosen: str  # the assistant replies
    rejected: str


def detect_shape(obj: dict) -> str | None:
    if "messages" in obj or "conversations" in obj:
        return "messages"
    if "chosen" in obj and "rejected" in obj:
        return "preference" if "prompt" in obj or not isinstance(obj["chosen"], str) else "hh_rlhf"
    if "instruction" in obj:
        return "instruction"
    if "prompt" in obj and ("response" in obj or "completion" in obj):
        return "prompt_response"
    return None


def row_shape(obj: Any, fmt: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(obj, dict):
        raise BadRow("unknown_shape", None, f"the row is a JSON {type(obj).__name__}, expected an object")
    shape = detect_shape(obj) if fmt == "auto" else fmt
    if shape is None:
        raise BadRow("unknown_shape", None, f"no known shape has the keys {sorted(obj)[:8]}; expected one of {', '.join(allowed)}")
    if shape not in allowed:
        kind = "a preference pair (chosen/rejected)" if shape in PREFERENCE_SHAPES else "a conversation"
        raise BadRow("unknown_shape", None, f"{kind} ({shape}) where {' or '.join(allowed)} rows are expected; give it to the other chat stage")
    return shape


def text_field(obj: dict, key: str, field: str | None = None, required: bool = True) -> str | None:
    field = field or key
    if key not in obj or obj[key] is None:
        if required:
            raise BadRow("missing_field", field, "is missing")
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise BadRow("bad_type", field, f"is a {type(value).__name__}, expected a string")
    if not value.strip():
        raise BadRow("empty_content", field, "is empty")
    return value


# ---------------------------------------------------------------- messages


def normalise_messages(items: Any, field: str) -> list[Message]:
    """A list of {role, content} or {from, value} dicts -> [{"role", "content"}], roles and content checked."""
    if not isinstance(items, list):
        raise BadRow("bad_type", field, f"is a {type(items).__name__}, expected a list of messages")
    if not items:
        raise BadRow("empty_content", field, "has no messages")
    out = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise BadRow("bad_type", where, f"is a {type(item).__name__}, expected an object with role and content")
        role_key, content_key = ("role", "content") if "role" in item or "content" in item else ("from", "value")
        role = item.get(role_key)
        if role_key == "from" and isinstance(role, str):
            role = SPEAKERS.get(role.lower(), role)
        if role not in ("system", "user", "assistant"):
            raise BadRow("bad_role", f"{where}.{role_key}", f"is {role!r}, expected system, user or assistant")
        content = text_field(item, content_key, f"{where}.{content_key}")
        out.append({"role": role, "content": content})
    return out


def check_order(messages: list[Message], field: str) -> None:
    """An optional system message first, then user and assistant turns alternating, starting with user."""
    expected = "user"
    for i, message in enumerate(messages):
        role = message["role"]
        if i == 0 and role == "system":
            continue
        if role != expected:
            raise BadRow("roles_out_of_order", f"{field}[{i}].role", f"is {role!r} where a {expected} turn is expected (system first, then user/assistant alternating)")
        expected = "assistant" if role == "user" else "user"


def check_conversation(messages: list[Message], field: str) -> list[Message]:
    check_order(messages, field)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no_assistant_turn", field, "has no assistant message: nothing to learn from")
    return messages


def system_prefix(obj: dict) -> list[Message]:
    system = text_field(obj, "system", required=False)
    return [{"role": "system", "content": system}] if system is not None else []


def turn(obj: dict, key: str, role: str) -> list[Message]:
    """A string field as one message of `role`, or a message-list field as it is."""
    value = obj.get(key)
    if isinstance(value, list):
        return normalise_messages(value, key)
    return [{"role": role, "content": text_field(obj, key)}]


def parse_conversation(obj: Any, fmt: str = "auto") -> list[Message]:
    """A conversation row of any conversation shape -> validated messages."""
    shape = row_shape(obj, fmt, CONVERSATION_SHAPES)
    if shape == "messages":
        key = "messages" if "messages" in obj else "conversations"
        if fmt != "auto" and key not in obj:
            raise BadRow("missing_field", "messages", "is missing")
        return check_conversation(normalise_messages(obj[key], key), key)
    if shape == "instruction":
        instruction = text_field(obj, "instruction")
        extra = obj.get("input")
        if extra is not None and not isinstance(extra, str):
            raise BadRow("bad_type", "input", f"is a {type(extra).__name__}, expected a string")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        messages = [*system_prefix(obj), {"role": "user", "content": user}, {"role": "assistant", "content": text_field(obj, "output")}]
        return check_conversation(messages, "instruction")
    reply_key = "response" if "response" in obj else "completion"
    messages = [*system_prefix(obj), *turn(obj, "prompt", "user"), *turn(obj, reply_key, "assistant")]
    return check_conversation(messages, "prompt")


# ---------------------------------------------------------------- preference pairs


def reply_side(obj: dict, key: str) -> tuple[list[Message] | None, str]:
    """One side of a pair: (the messages before the reply or None, the reply text)."""
    value = obj.get(key)
    if isinstance(value, list):
        messages = normalise_messages(value, key)
        last = len(messages) - 1
        if messages[-1]["role"] != "assistant":
            raise BadRow("no_assistant_turn", f"{key}[{last}].role", f"is {messages[-1]['role']!r}: the last message must be the assistant reply")
        return (messages[:-1] or None), messages[-1]["content"]
    return None, text_field(obj, key)


def parse_preference(obj: dict) -> Pair:
    chosen_prefix, chosen = reply_side(obj, "chosen")
    rejected_prefix, rejected = reply_side(obj, "rejected")
    if obj.get("prompt") is not None:
        prompt = turn(obj, "prompt", "user")
        for key, prefix in (("chosen", chosen_prefix), ("rejected", rejected_prefix)):
            if prefix is not None and prefix != prompt:
                raise BadRow("prompt_mismatch", key, "its messages before the reply differ from the prompt")
    else:
        if chosen_prefix is None or rejected_prefix is None:
            raise BadRow("missing_field", "prompt", "is missing, and chosen/rejected carry no earlier messages to take it from")
        if chosen_prefix != rejected_prefix:
            raise BadRow("prompt_mismatch", "rejected", "its messages before the reply differ from chosen's")
        prompt = chosen_prefix
    return Pair(prompt, chosen, rejected)


def hh_messages(transcript: str, field: str) -> list[Message]:
    """'\\n\\nHuman: a\\n\\nAssistant: b...' -> messages (contents stripped of the format's spaces)."""
    parts = HH_TURN.split(transcript)
    if parts[0].strip():
        raise BadRow("bad_transcript", field, f"starts with {parts[0][:30]!r} before the first 'Human:' turn")
    messages = []
    for speaker, text in zip(parts[1::2], parts[2::2]):
        if not text.strip():
            raise BadRow("empty_content", field, f"has an empty {speaker} turn")
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": text.strip()})
    return messages


def parse_hh(obj: dict) -> Pair:
    chosen, rejected = text_field(obj, "chosen"), text_field(obj, "rejected")
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, shared)  # the last marker lying wholly inside the shared prefix
    if cut < 0:
        raise BadRow("bad_transcript", "chosen", "chosen and rejected share no prefix ending at an '\\n\\nAssistant:' marker")
    prompt = hh_messages(chosen[:cut], "chosen")
    replies = []
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        reply = text[cut + len(HH_ASSISTANT):]
        if HH_TURN.search(reply):
            raise BadRow("bad_transcript", key, "continues with more turns after the reply (the transcripts differ before their last turn)")
        if not reply.strip():
            raise BadRow("empty_content", key, "has an empty final assistant reply")
        replies.append(reply.strip())
    return Pair(prompt, replies[0], replies[1])


def parse_pair(obj: Any, fmt: str = "auto") -> Pair:
    """A preference row of either shape -> a validated Pair."""
    shape = row_shape(obj, fmt, PREFERENCE_SHAPES)
    pair = parse_hh(obj) if shape == "hh_rlhf" else parse_preference(obj)
    if not pair.prompt:
        raise BadRow("missing_field", "prompt", "is empty: there is no turn before the replies")
    check_order(pair.prompt, "prompt")
    if pair.prompt[-1]["role"] != "user":
        raise BadRow("roles_out_of_order", "prompt", "must end with a user message (the reply answers it)")
    if pair.chosen == pair.rejected:
        raise BadRow("identical_pair", "rejected", "is the same text as chosen: the pair teaches nothing")
    return pair
