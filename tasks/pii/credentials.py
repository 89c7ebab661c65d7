"""Secret detectors: API keys and tokens by their published formats, and values assigned to
password-like keys (`password = "hunter2"`, `DB_PASSWORD=...`, `Authorization: Bearer ...`).

    list(find_secrets("AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE"))  # [PiiSpan(18, 38, 'SECRET', 'aws_access_key')]
"""
from __future__ import annotations

import re
from typing import Iterable

from lmfoundry.tasks.pii.spans import PiiSpan
from lmfoundry.tasks.pii.validators import jwt_ok

# (kind, a substring every match contains, pattern): the substring test skips most texts at
# memory speed; most patterns also start with a literal, which the regex engine searches fast
_SECRET_PATTERNS: list[tuple[str, str, re.Pattern]] = [
    ("private_key", "PRIVATE KEY", re.compile(
        r"-----BEGIN[A-Z0-9 ]{0,30} PRIVATE KEY(?: BLOCK)?-----"
        r"(?:[\s\S]{0,20000}?-----END[A-Z0-9 ]{0,30} PRIVATE KEY(?: BLOCK)?-----|(?:\r?\n[A-Za-z0-9+/=:\- ]*)*)")),
    ("aws_access_key", "A", re.compile(r"A(?<![A-Za-z0-9][\s\S])(?:KIA|SIA|BIA|CCA|GPA|IDA|ROA|IPA|NPA|NVA|PKA)[A-Z0-9]{16}(?![A-Za-z0-9])")),
    ("github_token", "gh", re.compile(r"gh(?<![\w][\s\S]{2})[pousr]_[A-Za-z0-9]{36,251}(?![\w])")),
    ("github_token", "github_pat_", re.compile(r"github_pat_(?<![\w][\s\S]{11})[A-Za-z0-9_]{22,255}(?![\w])")),
    ("gitlab_token", "gl", re.compile(r"gl(?<![\w][\s\S]{2})(?:pat|dt|rt|ptt|soat|ft|cbt)-[A-Za-z0-9_\-]{20,}(?![\w-])")),
    ("slack_token", "xox", re.compile(r"xox(?<![\w][\s\S]{3})[abposre]-[A-Za-z0-9-]{10,}(?![\w-])")),
    ("slack_webhook", "hooks.slack.com", re.compile(r"https://hooks\.slack\.com/services/T[A-Za-z0-9_]+/B[A-Za-z0-9_]+/[A-Za-z0-9_]+")),
    ("stripe_key", "_live_", re.compile(r"[sr]k_live_(?<![\w][\s\S]{8})[A-Za-z0-9]{20,}(?![\w])")),
    ("google_api_key", "AIza", re.compile(r"AIza(?<![\w-][\s\S]{4})[A-Za-z0-9_\-]{35}(?![\w-])")),
    ("jwt", "eyJ", re.compile(r"eyJ(?<![\w-][\s\S]{3})[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}(?![\w-])")),
]

# `password = "hunter2"`, `"api_key": "..."`, `DB_PASSWORD=s3cr3t`: the value is the secret. The
# key is searched in a lower-cased copy (a case-insensitive alternation is ten times slower).
_ASSIGNMENT_KEYS = [
    re.compile(key + r"[a-z0-9_]*['\"]?[ \t]*(?::=|=>|=|:)[ \t]*")
    for key in (r"pass(?:word|wd|phrase)", "secret", r"api[_-]?(?:key|token)", r"access[_-]?(?:key|token)",
                r"private[_-]?key", r"auth[_-]?token")
]
_ASSIGNED_VALUE = re.compile(r"(?P<quote>['\"]?)(?P<value>[^\s'\"]{4,200})(?P=quote)")
_BEARER_KEYS = [re.compile(r"authorization[\"']?[ \t]*[:=][ \t]*[\"']?(?:bearer|basic|token)[ \t]+"), re.compile(r"bearer[ \t]+")]
_BEARER_VALUE = re.compile(r"(?=[A-Za-z\-._~+/]*[0-9])[A-Za-z0-9\-._~+/]{16,}=*(?![\w-])")
_URL_CREDENTIALS = re.compile(r"://(?P<value>[^\s/?#@:'\"<>]+:[^\s/?#@'\"<>]+)@")
_CODE_VALUE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*(?:\(.*|\[.*)?[,;)]?$")
_PLACEHOLDER_VALUE = re.compile(
    r"^(?:<.*|\$\{.*|\$\(.*|\{\{.*|%\(.*|\*+|x+|\.\.\.+|null|none|true|false|changeme|password|passwd|pass|"
    r"secret|\$[A-Za-z_]+)$",
    re.IGNORECASE,
)
_TRAILING_PUNCTUATION = re.compile(r"[)\],;.:¶]+$")


def _secret_value_ok(value: str, quoted: bool) -> bool:
    """Literal secrets only: variables, calls and placeholders such as `<password>` are code."""
    if _PLACEHOLDER_VALUE.match(value):
        return False
    if quoted or not _CODE_VALUE.match(value):
        return True
    # an unquoted identifier is a variable (`password=pw`) unless it mixes in digits (`hunter2`);
    # attributes, calls and subscripts (`self.pw`, `get_pw()`, `env["PW"]`) are always code
    return any(c.isdigit() for c in value) and not any(c in value for c in ".([")


def _lower_same_length(text: str) -> str | None:
    """A lower-cased copy whose offsets match the text (None if a character's case expands)."""
    lowered = text.lower()
    return lowered if len(lowered) == len(text) else None


def find_secrets(text: str) -> Iterable[PiiSpan]:
    for kind, hint, pattern in _SECRET_PATTERNS:
        if hint not in text:
            continue
        for m in pattern.finditer(text):
            if kind != "jwt" or jwt_ok(m.group()):
                yield PiiSpan(m.start(), m.end(), "SECRET", kind)
    for m in _URL_CREDENTIALS.finditer(text):
        if not _PLACEHOLDER_VALUE.match(m.group("value").split(":", 1)[1]):
            yield PiiSpan(m.start("value"), m.end("value"), "SECRET", "url_credentials")
    lowered = _lower_same_length(text)
    keys = text if lowered is None else lowered  # rare case-expanding text: keys must be lower-case there
    for key in (k for pattern in _ASSIGNMENT_KEYS for k in pattern.finditer(keys)):
        m = _ASSIGNED_VALUE.match(text, key.end())
        if m is None:
            continue
        value, quoted = m.group("value"), bool(m.group("quote"))
        if not quoted:  # `password=None)` in a signature, `pwd: abc123.` ending a sentence
            value = _TRAILING_PUNCTUATION.sub("", value)
        if len(value) >= 4 and _secret_value_ok(value, quoted):
            yield PiiSpan(m.start("value"), m.start("value") + len(value), "SECRET", "password")
    for key in (k for pattern in _BEARER_KEYS for k in pattern.finditer(keys)):
        m = _BEARER_VALUE.match(text, key.end())
        if m is not None:
            yield PiiSpan(m.start(), m.end(), "SECRET", "bearer_token")
