"""A completion store (crlft.data.store) as an input of `crlft data build`.

The store is read on the driver, before Ray starts (an empty store, or one that gives nothing to train on, is an
error then), and its records are written to `<out>/store.jsonl`: first the records, then the duplicates. They join
the files' records as rows (source, line, text, error) of that file, so the tokenizing actors validate, class and
tokenize them as any record (`process_record`): a conversation the template cannot render, or too long, is rejected
with its reason. A duplicate carries its reason as the row's error, so it is rejected and counted the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from crlft.config import Config
from crlft.data.feedback import KINDS, FeedbackRules, StoreRecords, check_trainable, store_records, training_summary
from crlft.data.store import is_store, read_store, snapshot
from crlft.errors import CrlftError
from crlft.storage import location

STORE_FILE = "store.jsonl"


@dataclass(frozen=True)
class StoreInput:
    uri: str
    snapshot: str  # taken before the store was read: a part added meanwhile changes the next build's fingerprint
    records: StoreRecords
    rules: FeedbackRules

    @property
    def lines(self) -> list[str]:
        """store.jsonl: the records, then the duplicates (the line numbers the rejects give)."""
        return [*self.records.lines, *(text for text, _ in self.records.duplicates)]

    def raw_table(self) -> pa.Table:
        """The rows the record reader would give for store.jsonl; duplicates carry their reason as the error."""
        errors = [""] * len(self.records.lines) + [reason for _, reason in self.records.duplicates]
        lines = self.lines
        return pa.table({
            "source": pa.array([STORE_FILE] * len(lines), pa.string()),
            "line": pa.array(range(1, len(lines) + 1), pa.int64()),
            "text": pa.array(lines, pa.string()),
            "error": pa.array(errors, pa.string()),
        })  # fmt: skip

    def stats(self) -> dict[str, Any]:
        """stats.json's `store` section: what the store held and what of it was given to the build."""
        counts = self.records.counts
        return {
            "uri": self.uri, "snapshot": self.snapshot, "file": STORE_FILE,
            "feedback": {kind: counts[kind] for kind in KINDS}, "orphan_feedback": counts["orphan_feedback"],
            **training_summary(self.records, self.rules),
        }  # fmt: skip


def input_is_store(item: str) -> bool:
    """Whether an INPUT is a completion store; an unreachable URI is a CrlftError naming it."""
    try:
        return is_store(item)
    except (OSError, ValueError) as exc:  # a URI: missing bucket, no access, unknown scheme
        raise CrlftError(f"cannot read the input {item}: {exc}") from None


def split_stores(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the inputs that are completion stores, the others), each in the order given."""
    stores = [item for item in inputs if input_is_store(item)]
    return stores, [item for item in inputs if item not in stores]


def read_store_input(inputs: Sequence[str], cfg: Config) -> tuple[StoreInput | None, list[str]]:
    """The store among the inputs, read and turned into records by the config's rules, and the other inputs."""
    stores, others = split_stores(inputs)
    if not stores:
        return None, others
    if len(stores) > 1:
        raise CrlftError(f"several completion stores given ({', '.join(stores)}): build from one store at a time")
    uri = location(stores[0])
    taken = snapshot(uri)
    rules = FeedbackRules.from_config(cfg)
    records = store_records(read_store(uri), rules)
    check_trainable(uri, records)
    return StoreInput(uri, taken, records, rules), others


def summary(store: dict[str, Any]) -> str:
    """One line of `crlft data build`'s report on the store (from its stats section)."""
    feedback = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in store["feedback"].items())
    return (f"store {store['uri']}: {feedback}; {store['records']} records, {store['excluded']} excluded, "
            f"{store['duplicates']} duplicates rejected")
