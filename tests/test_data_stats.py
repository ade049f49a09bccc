"""stats.json's one class, DataStats: written by the data stage, read by training, the same JSON key for key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crlft.config import Config, Mode
from crlft.data.stats import STATS_FILE, DataStats
from crlft.errors import CrlftError

MINIMAL = {
    "mode": "crlft", "conditions": ["GPT4", "GPT3"], "rewards": {"GPT4": 1.0, "GPT3": 0.1}, "pack_len": 256,
    "per_class": {"GPT4": {"records": 2, "tokens": 40, "supervised_tokens": 10}, "GPT3": {"records": 0, "tokens": 0}},
}  # fmt: skip


def test_a_file_with_only_what_training_needs_reads_and_writes_back_the_same(tmp_path: Path) -> None:
    (tmp_path / STATS_FILE).write_text(json.dumps(MINIMAL))
    stats = DataStats.read(tmp_path)
    assert stats.mode is Mode("crlft") and stats.pack_len == 256 and stats.fingerprints == {}
    assert (stats.tokens, stats.supervised_tokens) == (40, 10)
    assert stats.to_json() == {**MINIMAL, "only_classes": None, "fingerprints": {}}
    assert DataStats.from_json(stats.to_json()) == stats


def test_the_built_stats_keep_their_keys_in_order_through_a_write_and_a_read(tmp_path: Path) -> None:
    from crlft.data.stats import Tally
    from crlft.data.template import Template

    cfg = Config()
    tally = Tally()
    tally.add({"digest": 7, "status": "accepted", "condition": "GPT4", "n_tokens": 30, "n_supervised": 12,
               "truncated": False, "split": "train"})  # fmt: skip
    stats = DataStats.from_build(tally, {"train": 1}, cfg, Template.from_config(cfg), "tok", "fp", ["b", "a"])
    stats.write(tmp_path)
    text = (tmp_path / STATS_FILE).read_text()
    assert text == json.dumps(stats.to_json(), indent=2) + "\n"
    assert list(json.loads(text)) == [key for key in DataStats.ORDER if key != "store"]
    assert DataStats.read(tmp_path) == stats
    assert stats.inputs == ["a", "b"] and stats.replay == {"enabled": False, "conversations": 0}


@pytest.mark.parametrize("text", [None, "{}", "not json", json.dumps({**MINIMAL, "mode": "nonsense"})])
def test_a_missing_or_unusable_file_says_to_rebuild(tmp_path: Path, text: str | None) -> None:
    if text is not None:
        (tmp_path / STATS_FILE).write_text(text)
    with pytest.raises(CrlftError, match="build the data|rebuild the data"):
        DataStats.read(tmp_path)
