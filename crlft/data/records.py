"""Conversation records: the three accepted input formats, validation, and class assignment.

Accepted records (one JSON object each):
- OpenChat: {"items": [{"role", "content", "weight"?}], "condition"?, "system"?}
- ShareGPT: {"conversations": [{"from", "value"}], "model"?}   (roles human/gpt/system and their aliases)
- OpenAI:   {"messages": [{"role", "content"}]}
The class comes from an explicit `condition` (or `class`) field, else from the configured match rules, else the
default class. Every refusal is a `Reject` naming the source, the line (or record index) and the field.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from crlft.config import Config

Role = Literal["user", "assistant"]

# Role names of each format, mapped to the template's roles ("system" is handled apart: only first, once).
_ROLE_ALIASES: dict[str, str] = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
_FORMATS: tuple[tuple[str, str, str], ...] = (
    ("items", "role", "content"),
    ("conversations", "from", "value"),
    ("messages", "role", "content"),
)
RAW_PREVIEW_CHARS = 2000


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    # Multiplies the class reward for this message (OpenChat's per-message weight); 0 masks it out.
    weight: float = 1.0


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    condition: str
    system: str = ""
    source: str = ""
    line: int = 0


@dataclass(frozen=True)
class Reject:
    source: str
    line: int
    reason: str
    raw: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "line": self.line, "reason": self.reason, "raw": self.raw[:RAW_PREVIEW_CHARS]}

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


@dataclass
class _Invalid(Exception):
    reason: str


@dataclass(frozen=True)
class ClassRules:
    """The class-assignment part of the config, small enough to ship to every Ray Data worker."""

    classes: tuple[str, ...]
    match: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)
    default_class: str | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> ClassRules:
        return cls(
            classes=tuple(cfg.classes),
            match={n: {f: tuple(p) for f, p in spec.match.items()} for n, spec in cfg.classes.items()},
            default_class=cfg.default_class,
        )

    def assign(self, record: Mapping[str, Any]) -> str:
        for key in ("condition", "class"):
            if key in record and record[key] is not None:
                value = record[key]
                if not isinstance(value, str):
                    raise _Invalid(f"{key}: must be a string, got {type(value).__name__}")
                if value not in self.classes:
                    raise _Invalid(f"{key}: unknown class {value!r}; known classes: {', '.join(self.classes)}")
                return value
        for name, rules in self.match.items():
            for field_name, patterns in rules.items():
                value = record.get(field_name)
                if isinstance(value, str) and any(fnmatch.fnmatch(value.lower(), p.lower()) for p in patterns):
                    return name
        if self.default_class is None:
            raise _Invalid("no class: no rule matched and no default_class is configured (set `condition`)")
        return self.default_class


def _turns(record: Mapping[str, Any]) -> tuple[str, list[Any], str, str]:
    for key, role_key, content_key in _FORMATS:
        if key in record:
            turns = record[key]
            if not isinstance(turns, list):
                raise _Invalid(f"{key}: must be a list of turns, got {type(turns).__name__}")
            if not turns:
                raise _Invalid(f"{key}: no turns")
            return key, turns, role_key, content_key
    raise _Invalid("no turns: expected a field `items` (OpenChat), `conversations` (ShareGPT) or `messages` (OpenAI)")


def _message(key: str, i: int, turn: Any, role_key: str, content_key: str) -> tuple[str, str, float]:
    where = f"{key}[{i}]"
    if not isinstance(turn, dict):
        raise _Invalid(f"{where}: a turn must be an object, got {type(turn).__name__}")
    role = turn.get(role_key)
    if not isinstance(role, str):
        raise _Invalid(f"{where}.{role_key}: missing or not a string")
    mapped = _ROLE_ALIASES.get(role.lower())
    if mapped is None:
        raise _Invalid(f"{where}.{role_key}: unknown role {role!r}; expected one of user/assistant/system")
    if content_key not in turn:
        raise _Invalid(f"{where}.{content_key}: missing")
    content = turn[content_key]
    if not isinstance(content, str):
        raise _Invalid(f"{where}.{content_key}: must be a string, got {type(content).__name__}")
    if not content.strip():
        raise _Invalid(f"{where}.{content_key}: empty content")
    weight = turn.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
        raise _Invalid(f"{where}.weight: must be a number >= 0, got {weight!r}")
    return mapped, content, float(weight)


def parse_record(record: Any, rules: ClassRules, source: str = "", line: int = 0) -> Conversation:
    """Validate one decoded record; raises `_Invalid` (caught by `parse_line`) with the offending field."""
    if not isinstance(record, dict):
        raise _Invalid(f"a record must be a JSON object, got {type(record).__name__}")
    key, turns, role_key, content_key = _turns(record)
    system = record.get("system") or ""
    if not isinstance(system, str):
        raise _Invalid(f"system: must be a string, got {type(system).__name__}")
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        role, content, weight = _message(key, i, turn, role_key, content_key)
        if role == "system":
            if i != 0 or system:
                raise _Invalid(f"{key}[{i}]: a system message is allowed only once, as the first turn")
            system = content
            continue
        if not messages and role == "assistant":
            raise _Invalid(f"{key}[{i}]: assistant turn before any user turn")
        if messages and messages[-1].role == role:
            raise _Invalid(f"{key}[{i}]: two {role} turns in a row (the template alternates User and Assistant)")
        messages.append(Message(role=role, content=content, weight=weight))  # type: ignore[arg-type]
    if not any(m.role == "assistant" for m in messages):
        raise _Invalid(f"{key}: no assistant turn, nothing to learn from")
    return Conversation(tuple(messages), rules.assign(record), system, source, line)


def parse_line(text: str, rules: ClassRules, source: str, line: int) -> Conversation | Reject:
    """Parse and validate one JSON text; never raises for bad data."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return Reject(source, line, f"not valid JSON: {exc.msg} at column {exc.colno}", text)
    return parse_object(record, rules, source, line, text)


def parse_object(
    record: Any, rules: ClassRules, source: str, line: int, raw: str | None = None
) -> Conversation | Reject:
    try:
        return parse_record(record, rules, source, line)
    except _Invalid as exc:
        return Reject(source, line, exc.reason, raw if raw is not None else json.dumps(record, default=str))
