"""The base of every config section: frozen, strict, and split into identity and execution fields."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

EXECUTION_KEY = "execution"
NEW_KEY = "identity_when_set"


def execution(default: Any, **kwargs: Any) -> Any:
    """A field that changes how a stage runs but not what it produces."""
    return Field(default, json_schema_extra={EXECUTION_KEY: True}, **kwargs)


def added_later(default: Any, **kwargs: Any) -> Any:
    """An identity field added after versions were committed: left out of the identity while it
    holds its default, so every version committed before the field existed keeps its hash."""
    return Field(default, json_schema_extra={NEW_KEY: True}, **kwargs)


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def identity(self) -> dict[str, Any]:
        """The fields that define what this section produces (execution knobs removed)."""
        out: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if extra.get(EXECUTION_KEY):
                continue
            value = getattr(self, name)
            if extra.get(NEW_KEY) and value == field.default:
                continue
            out[name] = value.identity() if isinstance(value, Section) else _plain(value)
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, Section):
        return value.identity()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class Sections(Section):
    """Several config sections handed to one stage, each under its own name (``cfg.model``,
    ``cfg.pretrain``); all of them are part of the stage's identity."""

    model_config = ConfigDict(frozen=True, extra="allow")

    def identity(self) -> dict[str, Any]:
        return {name: _plain(value) for name, value in (self.model_extra or {}).items()}
