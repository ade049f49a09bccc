"""A general-capability check shipped with the package: what a fine-tune must not forget ("retention").

Retention compares a fine-tuned model with its base model on the same few hundred easy, verifiable prompts
(`check.jsonl`: facts, arithmetic, word knowledge, instructions with a checkable form). This module loads them, loads
open replay prompts (`replay_prompts.jsonl`, answered by the base model and replayed during fine-tuning), and scores
answers. It decodes nothing and imports no torch: the caller generates, this module judges.

Scoring rules, and why:

- **accept: whole words after normalising.** An answer is right when any accepted answer occurs in it as whole
  word(s), case-insensitive, after both are normalised (accents and markdown dropped, punctuation and hyphens become
  spaces, "1,000" becomes "1000", a decimal point stays). Chat models answer in sentences ("The capital of France is
  Paris."), so exact match would score right answers wrong; whole words keep "12" from matching "120" or "12.5".
  The price: an answer that lists several candidates counts as right. Accepted answers never occur in their prompt
  (a test checks), so echoing the question is not enough.
- **check: the form of the answer**, one rule per item (`CHECK_TYPES`): uppercase, lowercase, max_words, word_count,
  numbered_list, starts_with, ends_with, contains, one_word. Words are whitespace-separated tokens with a letter or a
  digit, so punctuation and markdown bullets do not count. When an item has both, both must hold.
- **Sampling.** `limit` takes an evenly spread, deterministic sample of each kind in proportion to its size (every
  k-th item), so a quick check still covers every kind and two runs score the same items.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from crlft.errors import CrlftError
from crlft.storage import jsonl_records

GENERAL_DATA = Path(__file__).parents[1] / "assets" / "general"
CHECK_FILE = GENERAL_DATA / "check.jsonl"
REPLAY_PROMPTS_FILE = GENERAL_DATA / "replay_prompts.jsonl"

# check type -> {parameter: required type}; "text" may also be a list of strings (any of them).
CHECK_TYPES: dict[str, dict[str, type]] = {
    "uppercase": {},
    "lowercase": {},
    "one_word": {},
    "max_words": {"n": int},
    "word_count": {"n": int},
    "numbered_list": {"n": int},
    "starts_with": {"text": str},
    "ends_with": {"text": str},
    "contains": {"text": str},
}


@dataclass(frozen=True)
class CheckItem:
    id: str
    kind: str  # fact, arithmetic, word, instruction (any name: scores are reported per kind)
    prompt: str
    accept: tuple[str, ...] = ()  # right when any of these occurs in the answer as whole word(s)
    check: Mapping[str, Any] | None = field(default=None, hash=False)  # {"type": a CHECK_TYPES key, its parameters}


# ---------------------------------------------------------------------------------------------------------------------
# Normalising and the rules


def normalize(text: str) -> str:
    """Lower case, accents and markdown dropped, every run of characters other than letters and digits one space; a
    point between digits and a comma in a number stay as they were ("2.5", "1,000" -> "1000"). 'Don't' -> "dont"."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = re.sub(r"['\u2019`]", "", text)
    text = re.sub(r"(?<=\d)\.(?=\d)", "\0", text)
    text = re.sub(r"[^a-z0-9\0]+", " ", text).replace("\0", ".")
    return " ".join(text.split())


def contains_words(answer: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `answer` as whole word(s), both normalised."""
    wanted = normalize(phrase)
    return bool(wanted) and f" {wanted} " in f" {normalize(answer)} "


def words(text: str) -> list[str]:
    """The words of a text: whitespace-separated tokens with at least one letter or digit."""
    return [token for token in text.split() if any(ch.isalnum() for ch in token)]


def _texts(check: Mapping[str, Any]) -> list[str]:
    text = check["text"]
    return [text] if isinstance(text, str) else list(text)


def _numbered_items(answer: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^\s*\**(\d+)[.)]\**\s+\S", answer, flags=re.MULTILINE)]


def _starts_with(answer: str, check: Mapping[str, Any]) -> bool:
    start = normalize(answer)
    return any(start == normalize(t) or start.startswith(normalize(t) + " ") for t in _texts(check))


def _ends_with(answer: str, check: Mapping[str, Any]) -> bool:
    end = normalize(answer)
    return any(end == normalize(t) or end.endswith(" " + normalize(t)) for t in _texts(check))


_RULES: dict[str, Callable[[str, Mapping[str, Any]], bool]] = {
    "uppercase": lambda a, c: any(ch.isalpha() for ch in a) and not any(ch.islower() for ch in a),
    "lowercase": lambda a, c: any(ch.isalpha() for ch in a) and not any(ch.isupper() for ch in a),
    "one_word": lambda a, c: len(words(a)) == 1,
    "max_words": lambda a, c: 1 <= len(words(a)) <= c["n"],
    "word_count": lambda a, c: len(words(a)) == c["n"],
    "numbered_list": lambda a, c: _numbered_items(a) == list(range(1, c["n"] + 1)),
    "starts_with": _starts_with,
    "ends_with": _ends_with,
    "contains": lambda a, c: any(contains_words(a, t) for t in _texts(c)),
}


def is_right(item: CheckItem, answer: str) -> bool:
    """Whether `answer` is right for `item`: an accepted answer in it as whole word(s) (when the item has `accept`)
    and the form rule holds (when it has `check`)."""
    if item.accept and not any(contains_words(answer, accepted) for accepted in item.accept):
        return False
    if item.check is not None:
        rule = _RULES.get(str(item.check.get("type")))
        if rule is None:
            raise CrlftError(f"check item {item.id}: unknown check type {item.check.get('type')!r}")
        return rule(answer.strip(), item.check)
    return bool(item.accept)


def check_scores(items: Sequence[CheckItem], answers: Sequence[str]) -> dict[str, float]:
    """{"general_accuracy": share right overall, "general_accuracy/<kind>": share right per kind, "general_n": count};
    zeros when there are no items."""
    if len(items) != len(answers):
        raise CrlftError(f"{len(items)} check items but {len(answers)} answers: one answer per item")
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for item, answer in zip(items, answers, strict=True):
        by_kind[item.kind].append(is_right(item, answer))
    right = [r for results in by_kind.values() for r in results]
    scores = {"general_accuracy": sum(right) / len(right) if right else 0.0}
    scores.update({f"general_accuracy/{kind}": sum(r) / len(r) for kind, r in sorted(by_kind.items())})
    scores["general_n"] = float(len(right))
    return scores


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def _text_field(record: Mapping[str, Any], field: str, where: str) -> str:
    value = record.get(field)
    if not isinstance(value, str) or not value.strip():
        raise CrlftError(f"{where}: field '{field}' must be a non-empty string")
    return value


def _check_field(value: Any, where: str) -> Mapping[str, Any]:
    params = CHECK_TYPES.get(value.get("type")) if isinstance(value, dict) else None
    if params is None:
        raise CrlftError(f"{where}: field 'check' must be an object with 'type' one of {', '.join(CHECK_TYPES)}")
    for name, kind in params.items():
        given = value.get(name)
        if kind is int and not (isinstance(given, int) and not isinstance(given, bool) and given > 0):
            raise CrlftError(f"{where}: field 'check.{name}' must be a positive integer for {value['type']}")
        if kind is str and not (isinstance(given, str) and given.strip() or isinstance(given, list) and given
                                and all(isinstance(t, str) and t.strip() for t in given)):  # fmt: skip
            raise CrlftError(f"{where}: field 'check.{name}' must be a string or a list of strings")
    return MappingProxyType(dict(value))


def _check_item(record: Mapping[str, Any], where: str) -> CheckItem:
    accept = record.get("accept", [])
    if not isinstance(accept, list) or not all(isinstance(a, str) and normalize(a) for a in accept):
        raise CrlftError(f"{where}: field 'accept' must be a list of non-empty strings")
    check = _check_field(record["check"], where) if record.get("check") is not None else None
    if not accept and check is None:
        raise CrlftError(f"{where}: field 'accept' or 'check' is needed: nothing to score the answer by")
    return CheckItem(_text_field(record, "id", where), _text_field(record, "kind", where),
                     _text_field(record, "prompt", where), tuple(accept), check)  # fmt: skip


def spread(n: int, k: int) -> list[int]:
    """`k` indices evenly spread over range(n) (every n/k-th), deterministic; all of them when k >= n."""
    if k >= n:
        return list(range(n))
    return [math.floor(i * n / k) for i in range(k)]


def sample_by_kind(items: Sequence[CheckItem], limit: int) -> list[CheckItem]:
    """`limit` items: each kind's share in proportion to its size (largest remainders, at least one of each kind
    while `limit` allows), evenly spread within the kind; in file order."""
    by_kind: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_kind[item.kind].append(index)
    exact = {kind: limit * len(indices) / len(items) for kind, indices in by_kind.items()}
    quota = {kind: max(int(share), 1 if limit >= len(by_kind) else 0) for kind, share in exact.items()}
    while sum(quota.values()) > limit:  # the kinds raised to 1 are paid for by the others
        quota[max((k for k in quota if quota[k] > 1), key=lambda k: quota[k] - exact[k])] -= 1
    while sum(quota.values()) < limit:
        quota[max(quota, key=lambda k: exact[k] - quota[k])] += 1
    chosen = [indices[i] for kind, indices in by_kind.items() for i in spread(len(indices), quota[kind])]
    return [items[i] for i in sorted(chosen)]


def load_check(path: str | Path = CHECK_FILE, limit: int | None = None) -> list[CheckItem]:
    """The check items of a JSONL file (default: the shipped set); with `limit`, a deterministic sample of that many
    spread over the kinds (`sample_by_kind`). A bad line raises CrlftError naming file:line and the field."""
    path = Path(path)
    items: list[CheckItem] = []
    seen: dict[str, int] = {}
    for number, record in jsonl_records(path):
        item = _check_item(record, f"{path}:{number}")
        if item.id in seen:
            raise CrlftError(f"{path}:{number}: field 'id': {item.id!r} is already on line {seen[item.id]}")
        seen[item.id] = number
        items.append(item)
    if not items:
        raise CrlftError(f"{path} has no check items")
    if limit is not None and limit < 1:
        raise CrlftError(f"limit must be at least 1 (got {limit})")
    return sample_by_kind(items, limit) if limit is not None and limit < len(items) else items


def load_prompts(path: str | Path = REPLAY_PROMPTS_FILE, limit: int | None = None) -> list[str]:
    """Prompts from JSONL objects with a "prompt" field (other fields ignored) or, for a .txt file, one prompt per
    non-blank line; with `limit`, that many evenly spread over the file. Errors name file:line."""
    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise CrlftError(f"{path} does not exist")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = [_text_field(record, "prompt", f"{path}:{number}") for number, record in jsonl_records(path)]
    if not prompts:
        raise CrlftError(f"{path} has no prompts")
    if limit is not None and limit < 1:
        raise CrlftError(f"limit must be at least 1 (got {limit})")
    return [prompts[i] for i in spread(len(prompts), limit)] if limit is not None else prompts
