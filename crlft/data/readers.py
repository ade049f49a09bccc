"""The data stage's inputs: local files, directories (recursively, the accepted suffixes) and globs resolved to a sorted
file list; URIs as given (Ray lists remote folders itself)."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crlft.dataset import INPUT_SUFFIXES
from crlft.errors import CrlftError
from crlft.storage import is_uri

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
