"""Packing a split into shards: each accepted conversation joins the packing group of its key; each group is packed in
(source, line) order, first-fit-decreasing into bins, and written as its own Parquet shard named by the group (the
batch functions jobs/build_dataset.py runs on Ray Data). The same inputs give the same files whatever order the
records arrive in, and a retried task rewrites the same bytes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import pyarrow as pa

from crlft.storage import filesystem_and_path

# Conversations packed together: enough for first-fit-decreasing to fill bins well, small enough for one task.
PACK_GROUP_CONVERSATIONS = 8192

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
        ("seq_teacher_ids", pa.list_(pa.list_(pa.int32()))),
        ("seq_teacher_from", pa.list_(pa.int32())),
        ("seq_student_from", pa.list_(pa.int32())),
    ]
)
# The columns an accepted record brings to packing.
PACK_COLUMNS = ["source", "line", "condition", "input_ids", "weights", "key", "teacher_ids", "teacher_from",
                "student_from"]


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
        for name in ("teacher_ids", "teacher_from", "student_from"):
            row[f"seq_{name}"] = [c[name] for c in chosen]
        rows.append(row)
    return rows


def shard_name(group: int) -> str:
    """A split's shard for one packing group: named by the group, so the same inputs give the same file names."""
    return f"part-{group:05d}.parquet"


def shard_table(rows: Sequence[Mapping[str, list[Any]]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=SHARD_SCHEMA)


def with_group(batch: pa.Table, groups: int) -> pa.Table:
    """The batch with a `group` column: the packing group of each record's key."""
    keys = batch.column("key").to_pylist()
    return batch.append_column("group", pa.array([group_of(k, groups) for k in keys], pa.int64()))


def pack_and_write(group: pa.Table, capacity: int, folder: str) -> pa.Table:
    """Pack one group and write it as its own shard, named by the group; returns its number of bins."""
    import pyarrow.parquet as pq

    index = group.column("group")[0].as_py()
    rows = pack_conversations(group.to_pylist(), capacity)
    filesystem, base = filesystem_and_path(folder)
    pq.write_table(shard_table(rows), f"{base}/{shard_name(index)}", filesystem=filesystem)
    return pa.table({"bins": [len(rows)]})
