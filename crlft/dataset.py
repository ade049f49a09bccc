"""The data stage's pure pieces, without Ray: read records with their line numbers, turn one record into a tokenized
conversation (or a reject), pack a group of conversations into bins, and add up the stats.

jobs/build_dataset.py runs these on Ray Data; benchmarks/data_pipeline.py runs the same functions in one plain loop.
Everything here is deterministic: a record's validation split and packing group come from a hash of its text and the
seed (so duplicates share a split, and moving or renaming files changes neither), and a group is packed in
(source, line) order whatever order its records arrive in.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, Protocol, TypedDict, TypeVar

import pyarrow as pa

from crlft.config import Config
from crlft.data.records import RAW_PREVIEW_CHARS, ClassRules, Conversation, Reject, parse_line
from crlft.errors import CrlftError

if TYPE_CHECKING:  # transformers and torch: seconds to import in every Ray worker that only reads or counts
    from crlft.data.template import TemplateTokenizer

T = TypeVar("T")
InputKind = Literal["jsonl", "json", "parquet"]
Status = Literal["accepted", "rejected", "filtered"]

# Compression suffixes that Ray Data (pyarrow) decompresses while reading; the format is the suffix before them.
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4", ".br")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
INPUT_SUFFIXES = tuple(
    base + compression for base in (*JSONL_SUFFIXES, ".json", ".parquet") for compression in ("", *COMPRESSION_SUFFIXES)
)
# Conversations packed together: enough for first-fit-decreasing to fill bins well, small enough for one task.
PACK_GROUP_CONVERSATIONS = 8192
_READ_CHUNK_BYTES = 1 << 20

# The Parquet shard schema: the PackedRow columns (crlft.data.pack) plus where each packed conversation came from.
SHARD_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("weights", pa.list_(pa.float32())),
        ("position_ids", pa.list_(pa.int32())),
        ("seq_lens", pa.list_(pa.int32())),
        ("seq_conditions", pa.list_(pa.string())),
        ("seq_sources", pa.list_(pa.string())),
        ("seq_lines", pa.list_(pa.int64())),
    ]
)
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
    ]
)


def input_kind(path: str) -> InputKind:
    """The record format of a file from its name: .parquet, .json (one array or object), else JSON lines."""
    name = path.lower()
    for compression in COMPRESSION_SUFFIXES:
        name = name.removesuffix(compression)
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".json"):
        return "json"
    return "jsonl"


class RawRecord(TypedDict):
    """One record as read: its 1-based line (JSON lines) or record index (.json arrays, Parquet), its JSON text,
    and `error`, set when the reader already knows the record is unusable (e.g. a .json file that does not parse)."""

    line: int
    text: str
    error: str


def iter_json_lines(stream: BinaryIO) -> Iterator[RawRecord]:
    """Non-blank lines of a byte stream, numbered from 1 as editors number them (only "\\n" ends a line)."""
    number = 0
    rest = b""
    while chunk := stream.read(_READ_CHUNK_BYTES):
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            number += 1
            if line.strip():
                yield RawRecord(line=number, text=line.decode("utf-8", errors="replace").rstrip("\r"), error="")
    if rest.strip():
        yield RawRecord(line=number + 1, text=rest.decode("utf-8", errors="replace").rstrip("\r"), error="")


def iter_json_document(data: bytes) -> Iterator[RawRecord]:
    """A .json file: an array of records (numbered by index), one record object, or else JSON lines.

    An array that does not parse is one reject at the line of the error: its records cannot be told apart."""
    text = data.decode("utf-8", errors="replace")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("["):
            bad_line = text.splitlines()[exc.lineno - 1] if text.splitlines() else ""
            reason = f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} (a .json file holds one array)"
            yield RawRecord(line=exc.lineno, text=bad_line, error=reason)
            return
        yield from iter_json_lines(io.BytesIO(data))
        return
    items = document if isinstance(document, list) else [document]
    for index, item in enumerate(items, start=1):
        yield RawRecord(line=index, text=json.dumps(item, ensure_ascii=False), error="")


def drop_nulls(value: Any) -> Any:
    """Parquet has no "absent": a struct field missing from one record is null there. Null means absent."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def iter_parquet(source: Any, batch_rows: int = 4096) -> Iterator[RawRecord]:
    """Rows of a Parquet file (path or random-access file), numbered from 1, streamed batch by batch."""
    import pyarrow.parquet as pq

    index = 0
    try:
        for batch in pq.ParquetFile(source).iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                index += 1
                yield RawRecord(line=index, text=json.dumps(drop_nulls(row), ensure_ascii=False, default=str), error="")
    except pa.ArrowInvalid as exc:  # a corrupt file is one reject (its remaining rows cannot be told apart)
        yield RawRecord(line=index + 1, text="", error=f"unreadable Parquet after row {index}: {exc}")


def parse_raw(raw: RawRecord, rules: ClassRules, source: str) -> Conversation | Reject:
    """A record as read, validated: the reader's own error, or `parse_line`'s verdict."""
    if raw["error"]:
        return Reject(source, raw["line"], raw["error"], raw["text"])
    return parse_line(raw["text"], rules, source, raw["line"])


def iter_raw_records(kind: InputKind, stream: BinaryIO) -> Iterator[RawRecord]:
    """The records of one input stream of the given kind (Parquet needs a random-access file)."""
    if kind == "parquet":
        return iter_parquet(stream)
    if kind == "json":
        return iter_json_document(stream.read())
    return iter_json_lines(stream)


def iter_file(path: str | Path, rules: ClassRules) -> Iterator[Conversation | Reject]:
    """Read one local file in order with the data stage's readers, so a file gives here exactly the
    records and rejects `crlft data build` gives: JSON lines (numbered by line), a .json array or single object and
    Parquet rows (numbered by 1-based record index; null fields are absent), compressed or not."""
    p = Path(path)
    if not p.is_file():
        raise CrlftError(f"input {p} does not exist")
    source = str(p)
    kind = input_kind(source)
    with pa.OSFile(source) if kind == "parquet" else pa.input_stream(source, compression="detect") as stream:
        for raw in iter_raw_records(kind, stream):
            yield parse_raw(raw, rules, source)


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive groups of `size` (the last one may be shorter)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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


def pack_groups_for(conversations: int) -> int:
    """How many packing groups a split of this many conversations gets."""
    return max(1, math.ceil(conversations / PACK_GROUP_CONVERSATIONS))


def group_of(key: int, groups: int) -> int:
    # The key's low bits: independent of the high bits that decided the split.
    return key % groups


class PackInput(Protocol):
    """What packing needs of an accepted record (a RecordResult or a row of its table)."""

    def __getitem__(self, name: str, /) -> Any: ...


def pack_conversations(conversations: Sequence[PackInput], capacity: int) -> list[dict[str, list[Any]]]:
    """Rows of SHARD_SCHEMA: the conversations in (source, line) order, first-fit-decreasing into bins."""
    from crlft.data.pack import first_fit_decreasing, pack_bin  # imports torch: only the packing workers pay for it

    ordered = sorted(conversations, key=lambda c: (c["source"], c["line"]))
    bins = first_fit_decreasing([len(c["input_ids"]) for c in ordered], capacity)
    rows = []
    for members in bins:
        chosen = [ordered[i] for i in members]
        row: dict[str, list[Any]] = dict(pack_bin([(c["input_ids"], c["weights"], c["condition"]) for c in chosen]))
        row["seq_sources"] = [c["source"] for c in chosen]
        row["seq_lines"] = [c["line"] for c in chosen]
        rows.append(row)
    return rows


def shard_name(group: int) -> str:
    """A split's shard for one packing group: named by the group, so the same inputs give the same file names."""
    return f"part-{group:05d}.parquet"


def shard_table(rows: Sequence[Mapping[str, list[Any]]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=SHARD_SCHEMA)


def reject_line(record: Mapping[str, Any]) -> str:
    """One line of rejects.jsonl (Reject.to_json's fields) from a rejected RecordResult."""
    return json.dumps({k: record[k] for k in ("source", "line", "reason", "raw")}, ensure_ascii=False)


@dataclass
class ClassTally:
    records: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    truncated: int = 0


@dataclass
class Tally:
    """Counts that add up across batches (merge is associative), so workers can send small summaries."""

    records_in: int = 0
    accepted: int = 0
    rejected: int = 0
    filtered: int = 0
    per_class: dict[str, ClassTally] = field(default_factory=dict)
    split_records: dict[str, int] = field(default_factory=dict)
    split_tokens: dict[str, int] = field(default_factory=dict)
    digest_sum: int = 0
    digest_xor: int = 0

    def add(self, record: Mapping[str, Any]) -> None:
        self.records_in += 1
        self.digest_sum += record["digest"]
        self.digest_xor ^= record["digest"]
        status = record["status"]
        if status == "rejected":
            self.rejected += 1
            return
        if status == "filtered":
            self.filtered += 1
            return
        self.accepted += 1
        per_class = self.per_class.setdefault(record["condition"], ClassTally())
        per_class.records += 1
        per_class.tokens += record["n_tokens"]
        per_class.supervised_tokens += record["n_supervised"]
        per_class.truncated += int(record["truncated"])
        split = record["split"]
        self.split_records[split] = self.split_records.get(split, 0) + 1
        self.split_tokens[split] = self.split_tokens.get(split, 0) + record["n_tokens"]

    def merge(self, other: Tally) -> Tally:
        merged = Tally(
            records_in=self.records_in + other.records_in,
            accepted=self.accepted + other.accepted,
            rejected=self.rejected + other.rejected,
            filtered=self.filtered + other.filtered,
            digest_sum=self.digest_sum + other.digest_sum,
            digest_xor=self.digest_xor ^ other.digest_xor,
        )
        for name in {*self.per_class, *other.per_class}:
            a, b = self.per_class.get(name, ClassTally()), other.per_class.get(name, ClassTally())
            merged.per_class[name] = ClassTally(
                a.records + b.records, a.tokens + b.tokens, a.supervised_tokens + b.supervised_tokens,
                a.truncated + b.truncated,
            )  # fmt: skip
        for split in {*self.split_records, *other.split_records}:
            merged.split_records[split] = self.split_records.get(split, 0) + other.split_records.get(split, 0)
            merged.split_tokens[split] = self.split_tokens.get(split, 0) + other.split_tokens.get(split, 0)
        return merged

    def to_json(self) -> str:
        data = {**self.__dict__, "per_class": {k: v.__dict__ for k, v in self.per_class.items()}}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Tally:
        data = json.loads(text)
        data["per_class"] = {k: ClassTally(**v) for k, v in data["per_class"].items()}
        return cls(**data)

    def inputs_fingerprint(self) -> str:
        """Of the multiset of record texts: independent of file names, file order and how records are split."""
        blob = json.dumps([self.records_in, self.digest_sum, self.digest_xor]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
