"""The data stage's output folder, local or a URI: train/, val/, stats.json, rejects.jsonl, replay.jsonl and store.jsonl
are written through it."""

from __future__ import annotations

from collections.abc import Iterator

from crlft.storage import filesystem_and_path, location


class OutputFolder:
    """The output folder, local or a URI."""

    def __init__(self, out: str) -> None:
        self._fs, self._base = filesystem_and_path(out)
        self._location = location(out)
        self._fs.create_dir(self._base, recursive=True)

    def make_folder(self, name: str) -> str:
        self._fs.create_dir(f"{self._base}/{name}", recursive=True)
        return f"{self._location}/{name}"

    def remove(self, name: str) -> None:
        from pyarrow import fs

        kind = self._fs.get_file_info(f"{self._base}/{name}").type
        if kind == fs.FileType.Directory:
            self._fs.delete_dir(f"{self._base}/{name}")
        elif kind != fs.FileType.NotFound:
            self._fs.delete_file(f"{self._base}/{name}")

    def write_lines(self, name: str, lines: Iterator[str] | list[str]) -> None:
        with self._fs.open_output_stream(f"{self._base}/{name}") as stream:
            for line in lines:
                stream.write((line + "\n").encode())
