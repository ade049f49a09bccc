"""A verifiable suite: its items (eval.jsonl: a prompt and the expected answer, optionally the sub-optimal answer, the
task and how to match), read with every bad line named, and answers scored: exact match after normalising, or the
expected answer as whole words of a sentence (`match: word`)."""

from __future__ import annotations

import json
import string
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crlft.errors import CrlftError
from crlft.eval.general_check import contains_words

END_OF_TURN = "<|end_of_turn|>"  # crlft.data.template.END_OF_TURN, repeated: scoring needs no tokenizer library


@dataclass(frozen=True)
class EvalItem:
    id: str
    prompt: str
    answer: str
    suboptimal_answer: str | None = None
    task: str = "default"
    match: str = "exact"  # "exact": the whole answer; "word": the answer as whole word(s) of a sentence (MATCHES)

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "answer": self.answer,
            "suboptimal_answer": self.suboptimal_answer,
            "task": self.task,
            **({"match": self.match} if self.match != "exact" else {}),
        }


_QUOTES = "\"'`“”‘’"
_TRAILING = string.punctuation + _QUOTES


def normalize_answer(text: str) -> str:
    """The comparable form of an answer: the text before any <|end_of_turn|>, whitespace collapsed, lower case, without
    surrounding quotes or trailing punctuation ("Cold." -> "cold", '"Monday"' -> "monday")."""
    text = text.split(END_OF_TURN, 1)[0]
    text = " ".join(text.split()).lower()
    return text.lstrip(_QUOTES + " ").rstrip(_TRAILING + " ")


MATCHES = ("exact", "word")


def is_correct(prediction: str, expected: str, match: str = "exact") -> bool:
    """`exact`: the normalised answers are equal; `word`: the expected answer occurs in the prediction as whole
    word(s) (crlft.eval.general_check.contains_words), for answers in sentences."""
    if match == "word":
        return contains_words(prediction.split(END_OF_TURN, 1)[0], expected)
    return normalize_answer(prediction) == normalize_answer(expected)


def _rates(predictions: Sequence[str], items: Sequence[EvalItem]) -> dict[str, float | int]:
    with_suboptimal = [(p, item) for p, item in zip(predictions, items, strict=True) if item.suboptimal_answer]
    suboptimal_hits = sum(is_correct(p, item.suboptimal_answer or "", item.match) for p, item in with_suboptimal)
    return {
        "n": len(items),
        "accuracy": sum(is_correct(p, item.answer, item.match) for p, item in zip(predictions, items, strict=True))
        / len(items),
        # Over the items that name a suboptimal answer; 0.0 when none does.
        "suboptimal_rate": suboptimal_hits / len(with_suboptimal) if with_suboptimal else 0.0,
    }


def score(predictions: Sequence[str], eval_items: Sequence[EvalItem]) -> dict[str, Any]:
    """Exact-match accuracy after `normalize_answer`, overall and per task, and how often the prediction is the
    item's suboptimal (GPT3-style) answer: {"n", "accuracy", "suboptimal_rate", "per_task": {task: {same keys}}}."""
    if len(predictions) != len(eval_items):
        raise CrlftError(f"score: {len(predictions)} predictions for {len(eval_items)} eval items; they must pair up")
    if not eval_items:
        raise CrlftError("score: no eval items to score")
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(eval_items):
        by_task[item.task].append(i)
    per_task = {
        task: _rates([predictions[i] for i in ids], [eval_items[i] for i in ids])
        for task, ids in sorted(by_task.items())
    }
    return {**_rates(predictions, eval_items), "per_task": per_task}


def _eval_item(record: Any, line_number: int) -> EvalItem:
    """An EvalItem from one parsed line; raises ValueError saying which field is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    for field in ("prompt", "answer"):
        if field not in record:
            raise ValueError(f"missing field {field!r}")
    for field in ("prompt", "answer", "id", "task"):
        if field in record and not isinstance(record[field], str):
            raise ValueError(f"field {field!r} must be a string, got {type(record[field]).__name__}")
    suboptimal = record.get("suboptimal_answer")
    if suboptimal is not None and not isinstance(suboptimal, str):
        raise ValueError(f"field 'suboptimal_answer' must be a string or null, got {type(suboptimal).__name__}")
    if not record["prompt"].strip():
        raise ValueError("field 'prompt' is empty")
    if not normalize_answer(record["answer"]):
        raise ValueError("field 'answer' is empty")
    if record.get("match", "exact") not in MATCHES:
        raise ValueError(f"field 'match' must be one of {', '.join(MATCHES)}, got {record['match']!r}")
    return EvalItem(
        id=record.get("id", f"line-{line_number}"),
        prompt=record["prompt"],
        answer=record["answer"],
        suboptimal_answer=suboptimal,
        task=record.get("task", "default"),
        match=record.get("match", "exact"),
    )


MAX_REPORTED_PROBLEMS = 20


def load_eval_suite(path: str | Path) -> list[EvalItem]:
    """Read an eval JSONL (one object a line with string fields "prompt" and "answer"; optional "id", "task",
    "suboptimal_answer"; blank lines skipped). Every bad line is found; CrlftError lists them as file:line: reason."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CrlftError(f"{path}: cannot read the eval suite: {e}") from e
    items: list[EvalItem] = []
    problems: list[str] = []
    first_line_of_id: dict[str, int] = {}
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = _eval_item(json.loads(line), line_number)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{line_number}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        except ValueError as e:
            problems.append(f"{path}:{line_number}: {e}")
            continue
        if item.id in first_line_of_id:
            problems.append(
                f"{path}:{line_number}: duplicate id {item.id!r} (first on line {first_line_of_id[item.id]})"
            )
            continue
        first_line_of_id[item.id] = line_number
        items.append(item)
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = f"\n... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise CrlftError(f"{len(problems)} bad line(s) in the eval suite:\n" + "\n".join(shown) + more)
    if not items:
        raise CrlftError(f"{path}: the eval suite has no items (expected JSONL lines with 'prompt' and 'answer')")
    return items
