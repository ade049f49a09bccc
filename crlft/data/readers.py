"""The data stage's readers: which files are inputs (local files, directories, globs; URIs as given) and the records
of one file with their line numbers (JSON lines, a .json array or object, Parquet rows; compressed or not), each
validated into a Conversation or a Reject. The Ray Data job (jobs/build_dataset.py) and a plain loop
(`iter_file`, `crlft data show`) read with the same functions, so they agree record for record.
"""

from __future__ import annotations

import glob
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypedDict, TypeVar

import pyarrow as pa

from crlft.data.records import ClassRules, Conversation, Reject, parse_line
from crlft.errors import CrlftError
from crlft.storage import is_uri

T = TypeVar("T")
InputKind = Literal["jsonl", "json", "parquet"]

# Compression suffixes that Ray Data (pyarrow) decompresses while reading; the format is the suffix before them.
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4", ".br")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
INPUT_SUFFIXES = tuple(
    base + compression for base in (*JSONL_SUFFIXES, ".json", ".parquet") for compression in ("", *COMPRESSION_SUFFIXES)
)
_READ_CHUNK_BYTES = 1 << 20
_GLOB_CHARS = ("*", "?", "[")


def resolve_inputs(inputs: Sequence[str]) -> list[str]:
    """Local files, directories (recursively, the accepted suffixes) and globs as a sorted file list; URIs as given."""
    if not inputs:
        raise CrlftError("no INPUT given: name files, directories or globs of JSONL / JSON / Parquet")
    resolved: list[str] = []
    for item in inputs:
        if is_uri(item):
            resolved.append(item)
            continue
        if any(ch in item for ch in _GLOB_CHARS):
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            if not matches:
                raise CrlftError(f"input {item}: no file matches this pattern")
        else:
            matches = [os.path.expanduser(item)]
        for match in matches:
            resolved.extend(_local_files(item, Path(match)))
    if len({_scheme(p) for p in resolved}) > 1:
        raise CrlftError("inputs mix local paths and URIs (or several URI schemes): build them in separate runs")
    return list(dict.fromkeys(resolved))


def _local_files(given: str, path: Path) -> list[str]:
    if path.is_file():
        return [str(path.resolve())]
    if not path.exists():
        raise CrlftError(f"input {given} does not exist")
    files = sorted(
        str(p.resolve())
        for p in path.rglob("*")
        if p.is_file()
        and p.name.lower().endswith(INPUT_SUFFIXES)
        and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )
    if not files:
        raise CrlftError(f"input directory {given} holds no .jsonl, .json or .parquet files")
    return files


def _scheme(path: str) -> str:
    return path.split("://", 1)[0] if is_uri(path) else "local"


def remote_listing_args(paths: Sequence[str]) -> dict[str, Any]:
    """Ray lists remote directories itself: keep only the accepted suffixes there (local ones are listed above)."""
    if any(is_uri(p) for p in paths):
        return {"file_extensions": [suffix.lstrip(".") for suffix in INPUT_SUFFIXES]}
    return {}


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
