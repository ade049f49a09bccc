"""The completion store: what the endpoint answered (stored completions) and what users said of it (feedback), kept
as Parquet in a folder or any pyarrow filesystem URI (s3://, gs://), and read back as C-RLFT training records.

Layout of a store (one root, written by every replica, read by `crlft data build`):

    <root>/store.json                                       marks the folder as a store (format, version)
    <root>/secret                                           signs response ids (see `response_id`)
    <root>/completions/day=YYYY-MM-DD/model_version=V/part-*.parquet   one row per choice (COMPLETION_SCHEMA)
    <root>/feedback/day=YYYY-MM-DD/part-*.parquet                      one row per rating or correction

Files are only ever added, never rewritten: replicas write their own parts, and a snapshot of the store (`snapshot`)
is the list of its parts with their sizes, which the data fingerprint covers.

Response ids of stored completions are signed: `chatcmpl-<random><tag>` with tag = HMAC(secret, random + key id), so
any replica can tell, without reading the store, that an id was produced for the caller's key (feedback on anyone
else's id is refused as unknown). API keys are never stored, only `key_id`, a hash that separates tenants.

What the store's feedback trains as, and the store read as training records, is crlft/data/feedback.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from crlft.errors import CrlftError
from crlft.storage import filesystem_and_path, read_text, write_text

STORE_FORMAT = "crlft-completions"
STORE_VERSION = 1
MARKER = "store.json"
SECRET = "secret"
COMPLETIONS = "completions"
FEEDBACK = "feedback"
ID_PREFIX = "chatcmpl-"
_RANDOM_HEX = 24
_TAG_HEX = 16

COMPLETION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # the response id (one per request; every choice shares it)
        ("choice", pa.int32()),
        ("created", pa.float64()),  # unix seconds
        ("model", pa.string()),  # the name the client asked for
        ("model_version", pa.string()),  # registered version, or the folder's revision when it is not registered
        ("revision", pa.string()),  # the loaded folder's revision
        ("condition", pa.string()),
        ("system", pa.string()),
        ("messages", pa.string()),  # JSON [{"role", "content"}], the user and assistant turns asked
        ("answer", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("metadata", pa.string()),  # JSON object of the request's `metadata` ({} when none)
        ("key_id", pa.string()),  # `key_id` of the caller's API key ("" on an endpoint without keys)
    ]
)
FEEDBACK_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("choice", pa.int32()),
        ("created", pa.float64()),
        ("rating", pa.int8()),  # +1, -1, or 0 when only a correction or a comment was given
        ("correction", pa.string()),  # a better answer, or null
        ("comment", pa.string()),  # free text, or null
        ("key_id", pa.string()),
    ]
)


def key_id(api_key: str | None) -> str:
    """What the store keeps of an API key: a hash that tells tenants apart and gives the key away to no one."""
    if not api_key:
        return ""
    return "key-" + hashlib.sha256(b"crlft-store-key:" + api_key.encode()).hexdigest()[:16]


def _tag(secret: bytes, random_part: str, key: str) -> str:
    return hmac.new(secret, f"{random_part}:{key}".encode(), hashlib.sha256).hexdigest()[:_TAG_HEX]


def response_id(secret: bytes, key: str) -> str:
    """A response id signed for `key` (a `key_id`): only that key's feedback on it is accepted."""
    random_part = secrets.token_hex(_RANDOM_HEX // 2)
    return f"{ID_PREFIX}{random_part}{_tag(secret, random_part, key)}"


def id_belongs(secret: bytes, response: str, key: str) -> bool:
    """Whether `response` is a stored completion's id produced for `key` (constant time in the tag)."""
    body = response.removeprefix(ID_PREFIX)
    if not response.startswith(ID_PREFIX) or len(body) != _RANDOM_HEX + _TAG_HEX:
        return False
    random_part, tag = body[:_RANDOM_HEX], body[_RANDOM_HEX:]
    return hmac.compare_digest(tag, _tag(secret, random_part, key))


def open_store(root: str) -> bytes:
    """Make `root` a store if it is not one yet (marker and secret), and return its secret. Run once where the
    deployment is built, before its replicas start, so that they all read the same secret."""
    marker = read_text(f"{root}/{MARKER}")
    if marker is None:
        write_text(f"{root}/{MARKER}", json.dumps({"format": STORE_FORMAT, "version": STORE_VERSION}) + "\n")
    else:
        _check_marker(root, marker)
    secret = read_text(f"{root}/{SECRET}")
    if secret is None:
        secret = secrets.token_hex(32)
        write_text(f"{root}/{SECRET}", secret + "\n")
    return bytes.fromhex(secret.strip())


def read_secret(root: str) -> bytes:
    """The store's secret (a replica's view: the store must have been opened by `open_store`)."""
    secret = read_text(f"{root}/{SECRET}")
    if secret is None:
        raise CrlftError(f"{root} is not a completion store (no {SECRET}); open it with crlft.data.store.open_store")
    return bytes.fromhex(secret.strip())


def is_store(path: str) -> bool:
    """Whether `path` is the root of a completion store."""
    return read_text(f"{path.rstrip('/')}/{MARKER}") is not None


def _check_marker(root: str, text: str) -> None:
    try:
        marker = json.loads(text)
    except json.JSONDecodeError:
        marker = None
    if not isinstance(marker, dict) or marker.get("format") != STORE_FORMAT:
        raise CrlftError(f"{root}/{MARKER}: not a crlft completion store marker")
    if marker.get("version") != STORE_VERSION:
        raise CrlftError(f"{root}: completion store version {marker.get('version')}; this crlft reads {STORE_VERSION}")


def _day(created: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(created))


def _part_name() -> str:
    return f"part-{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}.parquet"


def _safe(value: str) -> str:
    """A partition value usable as a path segment on every filesystem."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in value) or "_"


def _write_table(root: str, folder: str, table: pa.Table) -> str:
    import pyarrow.parquet as pq
    from pyarrow import fs

    filesystem, inner = filesystem_and_path(f"{root}/{folder}")
    filesystem.create_dir(inner, recursive=True)
    name = _part_name()
    path = f"{inner}/{name}"
    if not isinstance(filesystem, fs.LocalFileSystem):  # object stores show an object only once it is whole
        pq.write_table(table, path, filesystem=filesystem)
        return path
    # A local part is written under a name readers skip, then renamed: a reader never sees half a part.
    scratch = f"{inner}/.{name}.tmp"
    try:
        pq.write_table(table, scratch, filesystem=filesystem)
        filesystem.move(scratch, path)
    except BaseException:
        with contextlib.suppress(OSError):
            filesystem.delete_file(scratch)
        raise
    return path


def write_completions(root: str, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Append completion rows (COMPLETION_SCHEMA), one part per day and model version. Returns the parts written."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((_day(row["created"]), _safe(row["model_version"])), []).append(row)
    return [
        _write_table(root, f"{COMPLETIONS}/day={day}/model_version={version}",
                     pa.Table.from_pylist(list(group), schema=COMPLETION_SCHEMA))
        for (day, version), group in sorted(groups.items())
    ]


def write_feedback(root: str, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Append feedback rows (FEEDBACK_SCHEMA), one part per day. Returns the parts written."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_day(row["created"]), []).append(row)
    return [_write_table(root, f"{FEEDBACK}/day={day}", pa.Table.from_pylist(list(group), schema=FEEDBACK_SCHEMA))
            for day, group in sorted(groups.items())]


def _parts(root: str, folder: str) -> list[tuple[str, int]]:
    from pyarrow import fs

    filesystem, inner = filesystem_and_path(f"{root}/{folder}")
    infos = filesystem.get_file_info(fs.FileSelector(inner, allow_not_found=True, recursive=True))
    return sorted((i.path, i.size or 0) for i in infos if i.type == fs.FileType.File and i.path.endswith(".parquet"))


def snapshot(root: str) -> str:
    """A fingerprint of what the store holds now: its parts and their sizes (parts are only ever added)."""
    digest = hashlib.sha256()
    for folder in (COMPLETIONS, FEEDBACK):
        for path, size in _parts(root, folder):
            digest.update(f"{folder}/{path.rsplit(folder + '/', 1)[-1]}:{size}\n".encode())
    return digest.hexdigest()[:16]


def _read_rows(root: str, folder: str, schema: pa.Schema) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    filesystem, _ = filesystem_and_path(root)
    rows: list[dict[str, Any]] = []
    for path, _size in _parts(root, folder):
        rows.extend(pq.read_table(path, filesystem=filesystem, schema=schema).to_pylist())
    return rows


@dataclass(frozen=True)
class StoredChoice:
    """One stored answer with the latest feedback on it."""

    completion: dict[str, Any]
    feedback: dict[str, Any] | None = None

    @property
    def rating(self) -> int:
        return int(self.feedback["rating"]) if self.feedback else 0

    @property
    def correction(self) -> str | None:
        text = self.feedback["correction"] if self.feedback else None
        return text if text and text.strip() else None


@dataclass
class StoreContents:
    """A store read whole: its choices in (created, id, choice) order, and feedback that names no stored choice."""

    choices: list[StoredChoice] = field(default_factory=list)
    orphan_feedback: int = 0


def check_store(root: str) -> None:
    """Raise unless `root` holds a marker of this format and version."""
    marker = read_text(f"{root}/{MARKER}")
    if marker is None:
        raise CrlftError(f"{root} is not a completion store (no {MARKER})")
    _check_marker(root, marker)


def read_store(root: str) -> StoreContents:
    """Every stored choice joined with its latest feedback (the store's marker checked first)."""
    check_store(root)
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for row in sorted(_read_rows(root, FEEDBACK, FEEDBACK_SCHEMA), key=lambda r: r["created"]):
        latest[(row["id"], row["choice"])] = row
    completions = sorted(_read_rows(root, COMPLETIONS, COMPLETION_SCHEMA),
                         key=lambda r: (r["created"], r["id"], r["choice"]))
    choices = [StoredChoice(row, latest.pop((row["id"], row["choice"]), None)) for row in completions]
    return StoreContents(choices, orphan_feedback=len(latest))
