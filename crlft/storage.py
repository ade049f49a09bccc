"""Folders that are local paths or URIs (s3://, gs://, ...): one place that tells them apart, through pyarrow's
filesystems, so the stages read and write both the same way; and the one reader and writer of local JSON-lines files
(`jsonl_records`, `write_jsonl`). The data stage's inputs have their own readers (crlft/data/readers.py): there a bad
line is a counted reject, not an error."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from crlft.errors import CrlftError


def is_uri(path: str) -> bool:
    return "://" in path


def location(path: str | Path) -> str:
    """A URI without its trailing slash, or a local path made absolute (Ray workers run in other folders)."""
    text = str(path)
    return text.rstrip("/") if is_uri(text) else str(Path(text).expanduser().resolve())


def filesystem_and_path(path: str | Path) -> tuple[Any, str]:
    """A pyarrow filesystem and the path in it, for a local path or a URI."""
    from pyarrow import fs

    text = str(path)
    if is_uri(text):
        return fs.FileSystem.from_uri(text)
    return fs.LocalFileSystem(), location(text)


def read_text(path: str | Path) -> str | None:
    """The file's text, or None when there is no such file."""
    from pyarrow import fs

    filesystem, inner = filesystem_and_path(path)
    if filesystem.get_file_info(inner).type != fs.FileType.File:
        return None
    with filesystem.open_input_stream(inner) as stream:
        return stream.read().decode()


def write_text(path: str | Path, text: str) -> None:
    """Write the file, creating its folder."""
    filesystem, inner = filesystem_and_path(path)
    filesystem.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(inner) as stream:
        stream.write(text.encode())


def jsonl_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of a local JSON-lines file; a line that is not a JSON object is
    an error naming the file and the line."""
    if not path.is_file():
        raise CrlftError(f"{path} does not exist")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CrlftError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise CrlftError(f"{path}:{number}: expected a JSON object")
        records.append((number, record))
    return records


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """A local JSON-lines file, one object a line, in UTF-8 with non-ASCII text as it is; returns `path`."""
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def folder_revision(path: Path) -> str:
    """Identifies a model folder as loaded: its real path and its files' sizes and modification times (a registry
    version has its own cache folder; a folder re-exported in place changes its files)."""
    real = path.resolve()
    digest = hashlib.sha256(str(real).encode())
    for f in sorted(real.iterdir()):
        if f.is_file():
            stat = f.stat()
            digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def write_whole(path: Path, text: str) -> None:
    """Write a local file whole or not at all (a scratch file renamed into place): an interrupted write leaves no
    half a cache that a later run would take for a whole one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".partial")
    scratch.write_text(text, encoding="utf-8")
    scratch.replace(path)


def subfolders(path: str | Path) -> list[str]:
    """Names of the folders directly in `path` (none when it does not exist)."""
    from pyarrow import fs

    filesystem, inner = filesystem_and_path(path)
    infos = filesystem.get_file_info(fs.FileSelector(inner, allow_not_found=True))
    return sorted(info.base_name for info in infos if info.type == fs.FileType.Directory)


def has_parquet(path: str | Path) -> bool:
    """Whether `path` holds a .parquet file at any depth (Ray Data reads them recursively)."""
    from pyarrow import fs

    filesystem, inner = filesystem_and_path(path)
    infos = filesystem.get_file_info(fs.FileSelector(inner, allow_not_found=True, recursive=True))
    return any(info.type == fs.FileType.File and info.path.endswith(".parquet") for info in infos)
