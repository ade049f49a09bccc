"""A completion store's feedback as C-RLFT training records (what `crlft data build` takes from a store, and what
`crlft feedback stats` shows).

Feedback becomes classes by `FeedbackRules` (config `data.feedback`): a correction is trained on as the answer of its
class (default the inference condition), an answer rated up as its class (default the same), an unrated one as a
low-reward class, one rated down is excluded unless given a class. The latest feedback on a choice wins.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from crlft.config import Config
from crlft.data.store import StoreContents, StoredChoice
from crlft.errors import CrlftError


@dataclass(frozen=True)
class FeedbackRules:
    """Which class each kind of feedback trains as (config `data.feedback`); None: not trained on."""

    rated_up: str | None
    corrected: str | None
    unrated: str | None
    rated_down: str | None
    rewards: Mapping[str, float] = field(default_factory=dict, compare=False)  # of each class; absent: 0

    @classmethod
    def from_config(cls, cfg: Config) -> FeedbackRules:
        f = cfg.data.feedback
        return cls(
            rated_up=f.rated_up or cfg.inference_condition,
            corrected=f.corrected or cfg.inference_condition,
            unrated=f.unrated or cfg.suboptimal_condition,
            rated_down=f.rated_down,
            rewards={name: cfg.reward(name) for name in cfg.classes},
        )

    def kind_of(self, choice: StoredChoice) -> str:
        """corrected, rated_up, rated_down or unrated (a correction wins over the rating given with it)."""
        if choice.correction is not None:
            return "corrected"
        return {1: "rated_up", -1: "rated_down"}.get(choice.rating, "unrated")

    def class_of(self, kind: str) -> str | None:
        return getattr(self, kind)


KINDS = ("rated_up", "corrected", "unrated", "rated_down")  # the kinds of feedback, as FeedbackRules names them


@dataclass
class StoreRecords:
    """A store turned into training records: JSON lines of OpenAI-format conversations with their class, the
    duplicates left out (each with the line of the record kept in its place), and counts for stats.json."""

    lines: list[str] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (record text, reason)
    counts: dict[str, int] = field(default_factory=dict)  # per feedback kind, plus excluded and orphan_feedback


def store_records(contents: StoreContents, rules: FeedbackRules) -> StoreRecords:
    """One record per stored choice whose feedback kind has a class: the conversation asked, then the answer (or the
    correction), `condition` set to that class; `store_id` and `feedback` say where it came from.

    Of choices with the same conversation (the same answer given twice, or a correction equal to another answer) one
    is kept: the one whose class has the highest reward, the earliest of equal reward; the others are duplicates."""
    out = StoreRecords(counts={"corrected": 0, "rated_up": 0, "rated_down": 0, "unrated": 0, "excluded": 0,
                               "orphan_feedback": contents.orphan_feedback})
    kept: dict[str, int] = {}  # conversation -> index in out.lines
    for choice in contents.choices:
        kind = rules.kind_of(choice)
        out.counts[kind] += 1
        condition = rules.class_of(kind)
        if condition is None:
            out.counts["excluded"] += 1
            continue
        key, record = _record(choice, kind, condition)
        if key not in kept:
            kept[key] = len(out.lines)
            out.lines.append(record)
            continue
        index = kept[key]
        if _reward(rules, record) > _reward(rules, out.lines[index]):
            out.lines[index], record = record, out.lines[index]
        out.duplicates.append((record, _duplicate_reason(rules, index, out.lines[index], record)))
    return out


def _record(choice: StoredChoice, kind: str, condition: str) -> tuple[str, str]:
    """(what makes two records duplicates: the conversation, the record as a JSON line)."""
    row = choice.completion
    answer = choice.correction if kind == "corrected" else row["answer"]
    messages = [*json.loads(row["messages"]), {"role": "assistant", "content": answer}]
    if row["system"]:
        messages.insert(0, {"role": "system", "content": row["system"]})
    key = json.dumps(messages, ensure_ascii=False, sort_keys=True)
    record = json.dumps({"messages": messages, "condition": condition, "store_id": row["id"],
                         "store_choice": row["choice"], "feedback": kind}, ensure_ascii=False)
    return key, record


def _reward(rules: FeedbackRules, record: str) -> float:
    return rules.rewards.get(json.loads(record)["condition"], 0.0)


def _duplicate_reason(rules: FeedbackRules, index: int, kept: str, dropped: str) -> str:
    kept_record = json.loads(kept)
    why = ("its class has the higher reward" if _reward(rules, kept) > _reward(rules, dropped)
           else "the earliest of equal reward")
    return (f"duplicate: the same conversation as line {index + 1} of the store's records (store id "
            f"{kept_record['store_id']} choice {kept_record['store_choice']}, {kept_record['feedback']}, class "
            f"{kept_record['condition']}), which is kept: {why}")


def training_summary(records: StoreRecords, rules: FeedbackRules) -> dict[str, Any]:
    """What a build takes of the store: records per class (duplicates left out), records, excluded, duplicates, and
    the class each kind of feedback trains as (`crlft feedback stats` and stats.json's `store` section)."""
    per_class: dict[str, int] = {}
    for line in records.lines:
        condition = json.loads(line)["condition"]
        per_class[condition] = per_class.get(condition, 0) + 1
    return {"records_per_class": per_class, "records": len(records.lines), "excluded": records.counts["excluded"],
            "duplicates": len(records.duplicates), "classes": {kind: rules.class_of(kind) for kind in KINDS}}


def check_trainable(root: str, records: StoreRecords) -> None:
    """Raise, saying what the store holds and which setting would use it, when it gives no record to train on."""
    counts = records.counts
    stored = sum(counts[kind] for kind in KINDS)
    if stored == 0:
        orphans = counts["orphan_feedback"]
        orphans_note = f" ({orphans} feedback rows name no stored answer)" if orphans else ""
        raise CrlftError(f"completion store {root} holds no stored completions{orphans_note}: the endpoint stores them "
                         "when serve.store.uri is set and a request asks `store: true` (or serve.store.by_default)")
    if not records.lines:
        held = ", ".join(f"{counts[kind]} {kind.replace('_', ' ')}" for kind in KINDS if counts[kind])
        settings = " or ".join(f"data.feedback.{kind}" for kind in KINDS if counts[kind])
        raise CrlftError(f"completion store {root}: none of its {stored} stored answers ({held}) has a class to train "
                         f"as; set {settings} to a class to train on them")


def feedback_table(contents: StoreContents, rules: FeedbackRules) -> list[dict[str, Any]]:
    """Per served model and version: stored choices by feedback kind (`crlft feedback stats`)."""
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for choice in contents.choices:
        row = choice.completion
        counts = table.setdefault((row["model"], row["model_version"]), {
            "model": row["model"], "model_version": row["model_version"], "stored": 0,
            "rated_up": 0, "rated_down": 0, "corrected": 0, "unrated": 0})
        counts["stored"] += 1
        counts[rules.kind_of(choice)] += 1
    return [table[key] for key in sorted(table)]
