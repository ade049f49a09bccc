"""One record -> tokens, the data stage's per-record step: validate, assign the class, filter, tokenize and place a
record (its split and packing group come from a seeded hash of its text, so duplicates share a split and moving or
renaming files changes neither). Never raises for bad data: a bad record is a reject with its reason.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import pyarrow as pa

from crlft.config import Config
from crlft.data.readers import RawRecord, parse_raw
from crlft.data.records import RAW_PREVIEW_CHARS, ClassRules, Reject

if TYPE_CHECKING:  # transformers and torch: seconds to import in every Ray worker that only reads or counts
    from crlft.data.template import TemplateTokenizer

Status = Literal["accepted", "rejected", "filtered"]

# One row per input record after the per-record step.
RECORD_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("line", pa.int64()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("raw", pa.string()),
        ("condition", pa.string()),
        ("split", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("weights", pa.list_(pa.float32())),
        ("truncated", pa.bool_()),
        ("n_tokens", pa.int64()),
        ("n_supervised", pa.int64()),
        ("key", pa.int64()),
        ("digest", pa.int64()),
        # Replay answers only (crlft.data.replay.teacher_fields; empty ids elsewhere): what the fine-tune is held to.
        ("teacher_ids", pa.list_(pa.int32())),
        ("teacher_from", pa.int64()),
        ("student_from", pa.int64()),
    ]
)


@dataclass(frozen=True)
class RecordSettings:
    """Everything the per-record step needs from the config; small and picklable (shipped to every worker)."""

    rules: ClassRules
    rewards: Mapping[str, float]
    max_len: int
    overflow: str
    per_sequence: bool
    only_classes: frozenset[str] | None
    val_fraction: float
    seed: int

    @classmethod
    def from_config(cls, cfg: Config) -> RecordSettings:
        return cls(
            rules=ClassRules.from_config(cfg),
            rewards={c: cfg.reward(c) for c in cfg.classes},
            max_len=cfg.data.max_len,
            overflow=cfg.data.overflow,
            per_sequence=cfg.data.per_sequence,
            only_classes=frozenset(cfg.data.only_classes) if cfg.data.only_classes is not None else None,
            val_fraction=cfg.data.val_fraction,
            seed=cfg.data.seed,
        )


class RecordResult(TypedDict):
    """A record after validation, class assignment and tokenization (RECORD_SCHEMA)."""

    source: str
    line: int
    status: Status
    reason: str
    raw: str
    condition: str
    split: str
    input_ids: list[int]
    weights: list[float]
    truncated: bool
    n_tokens: int
    n_supervised: int
    key: int  # seeded hash of the text: places the record in a split and a packing group
    digest: int  # unseeded hash of the text: adds up to the fingerprint of the inputs
    teacher_ids: list[int]  # crlft.data.replay.TeacherFields: set for replay answers by the data stage
    teacher_from: int
    student_from: int


def _hash63(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") >> 1


def record_hashes(text: str, seed: int) -> tuple[int, int]:
    """(key, digest) of a record: the seeded key decides split and group, the digest fingerprints the inputs."""
    digest = _hash63(text.encode("utf-8", errors="replace"))
    return _hash63(f"{seed}:{digest}".encode()), digest


def split_of(key: int, val_fraction: float) -> str:
    return "val" if key < val_fraction * 2**63 else "train"


def process_record(settings: RecordSettings, tokenizer: TemplateTokenizer, source: str, raw: RawRecord) -> RecordResult:
    """Validate, assign the class, filter, tokenize and place one record; never raises for bad data."""
    key, digest = record_hashes(raw["text"], settings.seed)
    result = RecordResult(
        source=source, line=raw["line"], status="rejected", reason="", raw="", condition="", split="",
        input_ids=[], weights=[], truncated=False, n_tokens=0, n_supervised=0, key=key, digest=digest,
        teacher_ids=[], teacher_from=0, student_from=0,
    )  # fmt: skip
    parsed = parse_raw(raw, settings.rules, source)
    if isinstance(parsed, Reject):
        return {**result, "reason": parsed.reason, "raw": parsed.raw[:RAW_PREVIEW_CHARS]}
    if settings.only_classes is not None and parsed.condition not in settings.only_classes:
        return {**result, "status": "filtered", "condition": parsed.condition}
    try:
        tokenized = tokenizer.tokenize_conversation(
            parsed, settings.rewards, settings.max_len, settings.overflow, settings.per_sequence
        )
    except ValueError as exc:
        return {**result, "reason": str(exc), "raw": raw["text"][:RAW_PREVIEW_CHARS], "condition": parsed.condition}
    return {
        **result,
        "status": "accepted",
        "condition": parsed.condition,
        "split": split_of(key, settings.val_fraction),
        "input_ids": tokenized.input_ids,
        "weights": tokenized.weights,
        "truncated": tokenized.truncated,
        "n_tokens": len(tokenized.input_ids),
        "n_supervised": sum(1 for w in tokenized.weights if w > 0),
    }


def reject_line(record: Mapping[str, Any]) -> str:
    """One line of rejects.jsonl (Reject.to_json's fields) from a rejected RecordResult."""
    return json.dumps({k: record[k] for k in ("source", "line", "reason", "raw")}, ensure_ascii=False)
