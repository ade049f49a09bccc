"""Packing groups into shards: each accepted conversation joins the packing group of its key, and each group is packed
and written as its own Parquet shard, named by the group (batch functions: jobs/build_dataset.py runs them on Ray
Data). The same inputs give the same files whatever the shuffle did, and a retried task rewrites the same bytes."""

from __future__ import annotations

import pyarrow as pa

from crlft.dataset import group_of, pack_conversations, shard_name, shard_table
from crlft.storage import filesystem_and_path

# The columns an accepted record brings to packing.
PACK_COLUMNS = ["source", "line", "condition", "input_ids", "weights", "key"]


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
