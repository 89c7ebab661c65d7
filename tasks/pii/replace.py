"""Replacing found PII: typed placeholders (`<EMAIL>`) or keyed pseudonyms (`<EMAIL_5f1c0e9a2b>`).

    from lmfoundry.tasks.pii.detectors import find_pii
    from lmfoundry.tasks.pii.replace import Replacer, scrub_text
    scrub_text(text, find_pii(text, cfg), Replacer(cfg))   # 'mail <EMAIL> or call <PHONE>'

Pseudonyms are ``<TYPE_hex>`` where hex is an HMAC-SHA256 of the canonical value under a key
read from the environment variable ``pii.key_env``; the same value gives the same pseudonym,
and the key itself is never stored anywhere. Pseudonyms are deliberately not realistic fake
values: a fake e-mail address would be detected again, and a model could not tell it apart
from a real one.
"""
from __future__ import annotations

import hashlib
import hmac
import os

from lmfoundry.infra.config import ConfigError, PiiConfig
from lmfoundry.tasks.pii.spans import NER_ENTITIES, PiiSpan


class MissingKeyError(ConfigError):
    """Pseudonym mode without its HMAC key in the environment."""


def read_key(cfg: PiiConfig) -> bytes:
    """The HMAC key for pseudonyms, from the environment variable the config names."""
    key = os.environ.get(cfg.key_env, "")
    if not key:
        raise MissingKeyError(
            f"pii.replacement is 'pseudonym' but the environment variable {cfg.key_env} is not set; "
            f"export {cfg.key_env} with a secret of at least 16 characters (keep it out of configs), "
            "or set pii.replacement=placeholder"
        )
    if len(key) < 16:
        raise MissingKeyError(f"the pseudonym key in {cfg.key_env} is shorter than 16 characters; use a longer random secret")
    return key.encode()


def key_fingerprint(cfg: PiiConfig) -> str:
    """Identifies which key made the pseudonyms (so a new key means a new stage version)
    without revealing it: an HMAC under the key of a fixed label, not a hash of the key."""
    return hmac.new(read_key(cfg), b"lmfoundry pii key id", hashlib.sha256).hexdigest()[:16]


def canonical_value(span: PiiSpan, text: str) -> str:
    if span.canonical is not None:
        return span.canonical
    value = text[span.start:span.end]
    return value.casefold().strip() if span.entity_type in NER_ENTITIES else value


class Replacer:
    """Typed placeholders (`<EMAIL>`) or keyed pseudonyms (`<EMAIL_5f1c0e9a2b>`)."""

    def __init__(self, cfg: PiiConfig):
        self.key = read_key(cfg) if cfg.replacement == "pseudonym" else None

    def __call__(self, span: PiiSpan, text: str) -> str:
        if self.key is None:
            return f"<{span.entity_type}>"
        message = f"{span.entity_type}\x00{canonical_value(span, text)}".encode("utf-8", "surrogatepass")
        return f"<{span.entity_type}_{hmac.new(self.key, message, hashlib.sha256).hexdigest()[:10]}>"


def replace_spans(text: str, spans: list[PiiSpan], replace: Replacer) -> tuple[str, list[tuple[int, int]]]:
    """The text with every (sorted, non-overlapping) span replaced, and where each replacement landed."""
    parts, placed, last, length = [], [], 0, 0
    for span in spans:
        parts.append(text[last:span.start])
        length += span.start - last
        replacement = replace(span, text)
        parts.append(replacement)
        placed.append((length, length + len(replacement)))
        length += len(replacement)
        last = span.end
    parts.append(text[last:])
    return "".join(parts), placed


def scrub_text(text: str, spans: list[PiiSpan], replace: Replacer) -> str:
    return replace_spans(text, spans, replace)[0]


def mask_value(value: str, entity_type: str) -> str:
    """An audit-safe view of a found value: first and last character and the length.

    Secrets show only their length: even two characters of a key are more than a reviewer needs.
    """
    if entity_type == "SECRET" or len(value) < 6:
        return f"[{len(value)} chars]"
    return f"{value[0]}…{value[-1]} [{len(value)} chars]"
