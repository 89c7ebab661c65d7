"""The one chat template: how a conversation becomes token ids, and which of them are trained on.

    <|bos|> then, per message, <|{role}|>{content}<|end|>        roles: system, user, assistant

A generation prompt is ``<|assistant|>``. Loss targets are the content tokens of assistant
messages and their closing ``<|end|>`` (so the model learns to stop); nothing else.

Content is always encoded as plain text: a user who types ``<|user|>`` gets the tokens of
those characters, never the special token, so no message can forge a turn. The rule, which
is also Hugging Face's ``sanitize_control_tokens``: content is split at every special-token
text, and each piece (the special-token texts too) is encoded on its own as plain text, so
text on either side never merges with it. ``content_encoder`` builds such an ``encode`` from
a plain-text encoder (``tokenizers``: ``tokenizer.encode_special_tokens = True`` then
``tokenizer.encode(text, add_special_tokens=False).ids``).

The same rendering as a Jinja string (``CHAT_TEMPLATE``, or ``chat_template(texts)`` for other
token texts) ships with the tokenizer, so Hugging Face gives the same ids::

    tok.apply_chat_template(messages, tokenize=True, return_dict=False)          # == render(...)[0]
    tok.apply_chat_template(messages, tokenize=True, sanitize_control_tokens=True)["input_ids"]

``sanitize_control_tokens=True`` (transformers >= 5) is needed only when content may contain
special-token text: without it Hugging Face turns such text into the special tokens, which we
never do. (One difference remains: that option first deletes the private-use characters
U+F0000 and U+F0001 from content; we keep them.) Assistant content and its ``<|end|>`` sit inside ``{% generation %}``, so
``return_assistant_tokens_mask=True`` (and TRL's ``assistant_only_loss``) yields our mask.

Pure Python, no torch::

    from lmfoundry.model.chat import render
    ids, mask = render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                       encode, special_ids)   # special_ids: train_tokenizer's special_tokens.json
"""
from __future__ import annotations

import json
import re
from typing import Callable, Iterable, Mapping, Sequence

ROLES = ("system", "user", "assistant")
# the special tokens a chat rendering uses, by role name (as in special_tokens.json)
CHAT_SPECIALS = ("bos", "end", *ROLES)
DEFAULT_TOKEN_TEXTS = {"bos": "<|bos|>", "end": "<|end|>", "system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}

Encode = Callable[[str], list[int]]
Message = Mapping[str, str]


class ChatTemplateError(ValueError):
    """A message the template cannot render (unknown role, content that is not a string)."""


def chat_template(texts: Mapping[str, str] = DEFAULT_TOKEN_TEXTS) -> str:
    """The Jinja chat template for tokens with these texts (role -> text, as in the tokenizer config)."""
    missing = [role for role in CHAT_SPECIALS if role not in texts]
    if missing:
        raise ChatTemplateError(f"the chat template needs token texts for the roles {missing}")
    # json.dumps makes a valid Jinja string literal of any token text
    t = {role: json.dumps(texts[role], ensure_ascii=False) for role in CHAT_SPECIALS}
    return (
        "{#- lmfoundry chat template: <|bos|> then <|role|>content<|end|> per message -#}\n"
        f"{{{{- {t['bos']} -}}}}\n"
        "{%- for message in messages -%}\n"
        "{%- if message['role'] == 'assistant' -%}\n"
        f"{{{{- {t['assistant']} -}}}}{{%- generation -%}}{{{{- message['content'] + {t['end']} -}}}}{{%- endgeneration -%}}\n"
        "{%- elif message['role'] == 'user' -%}\n"
        f"{{{{- {t['user']} + message['content'] + {t['end']} -}}}}\n"
        "{%- elif message['role'] == 'system' -%}\n"
        f"{{{{- {t['system']} + message['content'] + {t['end']} -}}}}\n"
        "{%- else -%}\n"
        "{{- raise_exception('unknown role ' ~ message['role'] ~ ': expected system, user or assistant') -}}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        f"{{%- if add_generation_prompt -%}}{{{{- {t['assistant']} -}}}}{{%- endif -%}}\n"
    )


CHAT_TEMPLATE = chat_template()


def content_pieces(content: str, special_texts: Iterable[str]) -> list[str]:
    """Content split at special-token texts (longest first); each piece is encoded on its own."""
    texts = sorted({t for t in special_texts if t}, key=len, reverse=True)
    if not texts:
        return [content] if content else []
    return [piece for piece in re.split("(" + "|".join(map(re.escape, texts)) + ")", content) if piece]


def content_encoder(encode_plain: Encode, special_texts: Iterable[str]) -> Encode:
    """An ``encode`` for content by the rule above; ``encode_plain`` must never produce special ids."""
    texts = tuple(special_texts)

    def encode(content: str) -> list[int]:
        return [i for piece in content_pieces(content, texts) for i in encode_plain(piece)]

    return encode


def message_ids(message: Message, encode: Encode, special_ids: Mapping[str, int]) -> tuple[list[int], list[int]]:
    """One message: ``<|role|> content <|end|>`` and its loss mask (1 on assistant content + <|end|>)."""
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ChatTemplateError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ChatTemplateError(f"the content of a {role} message is {type(content).__name__}, expected a string")
    body = list(encode(content)) + [special_ids["end"]]
    target = 1 if role == "assistant" else 0
    return [special_ids[role], *body], [0] + [target] * len(body)


def render(messages: Sequence[Message], encode: Encode, special_ids: Mapping[str, int]) -> tuple[list[int], list[int]]:
    """A whole conversation: (ids, assistant_mask), both starting with <|bos|> (mask 0)."""
    ids, mask = [special_ids["bos"]], [0]
    for message in messages:
        m_ids, m_mask = message_ids(message, encode, special_ids)
        ids += m_ids
        mask += m_mask
    return ids, mask


def prompt_ids(messages: Sequence[Message], encode: Encode, special_ids: Mapping[str, int]) -> list[int]:
    """The rendering of a prompt followed by the generation prompt <|assistant|>: what a model continues."""
    return render(messages, encode, special_ids)[0] + [special_ids["assistant"]]
