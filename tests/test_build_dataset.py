"""The data stage: pure pieces (fast) and the Ray Data job on a real local Ray (slow, one session per module)."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crlft.command_line import stage_entrypoint
from crlft.config import Config, load_config
from crlft.data.pack import IGNORE_INDEX
from crlft.data.process import RecordSettings, process_record, record_hashes, split_of
from crlft.data.readers import (
    RawRecord,
    drop_nulls,
    input_kind,
    iter_file,
    iter_json_document,
    iter_json_lines,
    iter_parquet,
)
from crlft.data.records import ClassRules, Conversation, Reject, parse_line
from crlft.data.replay import NO_TEACHER
from crlft.data.shards import PACK_GROUP_CONVERSATIONS, pack_conversations
from crlft.data.stats import Tally
from crlft.data.template import Template, TemplateTokenizer
from crlft.errors import CrlftError
from crlft.model import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
FASTCHAT = FIXTURES / "fastchat" / "dummy_conversation.json"
PARQUET_ROWS: list[dict[str, Any]] = [
    {"items": [{"role": "user", "content": "Parquet question?", "weight": None},
               {"role": "assistant", "content": "Parquet answer.", "weight": 2.0}],
     "condition": "GPT4", "system": None},
    {"items": [{"role": "user", "content": "Second?", "weight": None},
               {"role": "assistant", "content": "Second answer.", "weight": None}],
     "condition": None, "system": "Sys."},
]  # fmt: skip


@pytest.fixture(scope="module")
def template_tokenizer(tokenizer_dir: str) -> TemplateTokenizer:
    return TemplateTokenizer(Template.from_config(Config()), load_tokenizer(tokenizer_dir))


# ---------------------------------------------------------------- pure pieces, no Ray


def test_json_lines_are_numbered_like_an_editor_and_blank_lines_skipped() -> None:
    stream = io.BytesIO(b'{"a": 1}\n\n  \r\n{"b": 2}\r\n{"c": 3}')
    records = list(iter_json_lines(stream))
    assert [(r["line"], r["text"]) for r in records] == [(1, '{"a": 1}'), (4, '{"b": 2}'), (5, '{"c": 3}')]


def test_json_document_is_an_array_an_object_or_json_lines() -> None:
    assert [r["line"] for r in iter_json_document(b'[{"a": 1},\n {"b": 2}]')] == [1, 2]
    assert [json.loads(r["text"]) for r in iter_json_document(b'{\n "a": 1\n}')] == [{"a": 1}]
    assert [r["line"] for r in iter_json_document(b'{"a": 1}\n{"b": 2}\n')] == [1, 2]


def test_a_broken_json_array_is_one_reject_at_the_line_of_the_error() -> None:
    (record,) = iter_json_document(b'[\n {"a": 1}\n {"b": 2}\n]')
    assert record["line"] == 3
    assert "not valid JSON" in record["error"]


def test_parquet_nulls_mean_absent_fields(tmp_path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(PARQUET_ROWS), tmp_path / "x.parquet")
    records = list(iter_parquet(tmp_path / "x.parquet"))
    assert [r["line"] for r in records] == [1, 2]
    assert json.loads(records[0]["text"]) == drop_nulls(PARQUET_ROWS[0])
    assert "weight" not in json.loads(records[1]["text"])["items"][0]


def test_a_corrupt_parquet_file_is_one_reject(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_bytes(b"PAR1 but not really")
    (record,) = iter_parquet(tmp_path / "x.parquet")
    assert record["line"] == 1 and record["error"].startswith("unreadable Parquet")


def test_input_kind_looks_through_compression_suffixes() -> None:
    assert [input_kind(p) for p in ("a.parquet", "a.json", "a.JSON.gz", "a.jsonl.zst", "a.txt")] == [
        "parquet", "json", "json", "jsonl", "jsonl",
    ]  # fmt: skip


def _record(text: str, line: int = 1, error: str = "") -> RawRecord:
    return RawRecord(line=line, text=text, error=error)


GOOD = '{"items": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], "condition": "GPT3"}'


def test_a_record_is_accepted_rejected_or_filtered(template_tokenizer: TemplateTokenizer) -> None:
    expert_only = RecordSettings.from_config(load_config(None, {"data.only_classes": ["GPT4"]}))
    settings = RecordSettings.from_config(Config())
    accepted = process_record(settings, template_tokenizer, "f", _record(GOOD))
    assert accepted["status"] == "accepted" and accepted["condition"] == "GPT3"
    assert accepted["n_tokens"] == len(accepted["input_ids"]) > 0 and accepted["n_supervised"] > 0
    filtered = process_record(expert_only, template_tokenizer, "f", _record(GOOD))
    assert (filtered["status"], filtered["input_ids"]) == ("filtered", [])
    rejected = process_record(settings, template_tokenizer, "f", _record("{oops", line=7))
    assert (rejected["status"], rejected["line"], rejected["raw"]) == ("rejected", 7, "{oops")
    assert rejected["reason"].startswith("not valid JSON")
    known_bad = process_record(settings, template_tokenizer, "f", _record("[1", error="broken array"))
    assert (known_bad["status"], known_bad["reason"]) == ("rejected", "broken array")


def _long_record(condition: str = "GPT4") -> str:
    long = "The old man reads a short story again and again. " * 8
    items = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Tell me more."}, {"role": "assistant", "content": long}]  # fmt: skip
    return json.dumps({"items": items, "condition": condition})


def test_over_long_conversations_are_truncated_or_rejected_per_config(template_tokenizer: TemplateTokenizer) -> None:
    truncate = RecordSettings.from_config(load_config(None, {"data.max_len": 32, "data.pack_len": 32}))
    reject = RecordSettings.from_config(
        load_config(None, {"data.max_len": 32, "data.pack_len": 32, "data.overflow": "reject"})
    )
    cut = process_record(truncate, template_tokenizer, "f", _record(_long_record()))
    assert cut["status"] == "accepted" and cut["truncated"] and cut["n_tokens"] <= 32
    refused = process_record(reject, template_tokenizer, "f", _record(_long_record()))
    assert refused["status"] == "rejected" and refused["reason"].startswith("too long")


def test_split_depends_on_text_and_seed_only() -> None:
    keys = [record_hashes(f'{{"n": {i}}}', seed=0)[0] for i in range(2000)]
    val = [split_of(k, 0.25) for k in keys].count("val")
    assert 400 < val < 600
    assert record_hashes("same", 0) == record_hashes("same", 0)
    assert record_hashes("same", 0)[0] != record_hashes("same", 1)[0]
    assert record_hashes("same", 0)[1] == record_hashes("same", 1)[1]  # the fingerprint digest ignores the seed


def test_packing_a_group_does_not_depend_on_arrival_order() -> None:
    conversations = [
        {"source": f"s{i % 3}", "line": i, "condition": "GPT4", "input_ids": list(range(1, 2 + i % 7)),
         "weights": [1.0] * (1 + i % 7), **NO_TEACHER}
        for i in range(40)
    ]  # fmt: skip
    rows = pack_conversations(conversations, capacity=16)
    assert rows == pack_conversations(list(reversed(conversations)), capacity=16)
    packed = sorted((s, line) for row in rows for s, line in zip(row["seq_sources"], row["seq_lines"], strict=True))
    assert packed == sorted((c["source"], c["line"]) for c in conversations)
    assert all(len(row["input_ids"]) <= 16 for row in rows)


def test_tallies_add_up_in_any_grouping() -> None:
    records = [
        {"status": s, "condition": c, "split": "train", "truncated": False, "n_tokens": 5, "n_supervised": 2,
         "digest": 11 * i}
        for i, (s, c) in enumerate([("accepted", "GPT4"), ("rejected", ""), ("filtered", "GPT3"), ("accepted", "GPT3")])
    ]  # fmt: skip
    whole, left, right = Tally(), Tally(), Tally()
    for i, record in enumerate(records):
        whole.add(record)
        (left if i % 2 else right).add(record)
    merged = Tally.from_json(left.to_json()).merge(right)
    assert merged == whole
    assert (whole.records_in, whole.accepted, whole.rejected, whole.filtered) == (4, 2, 1, 1)
    assert merged.inputs_fingerprint() == whole.inputs_fingerprint()


def test_a_missing_input_is_one_clear_error_before_ray_starts(tmp_path: Path, tokenizer_dir: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from crlft.data.readers import resolve_inputs
    from jobs.build_dataset import build_dataset

    with pytest.raises(CrlftError, match="does not exist"):
        build_dataset([str(tmp_path / "nope.jsonl")], tokenizer_dir, tmp_path / "out", Config())
    with pytest.raises(CrlftError, match="no file matches"):
        resolve_inputs([str(tmp_path / "*.jsonl")])
    code = stage_entrypoint("jobs.build_dataset", [str(tmp_path / "nope"), "--tokenizer", tokenizer_dir,
                                                   "--out", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: input {tmp_path / 'nope'} does not exist"


def test_a_missing_tokenizer_is_one_clear_error(tmp_path: Path) -> None:
    from jobs.build_dataset import build_dataset

    with pytest.raises(CrlftError, match="no model at"):
        build_dataset([str(FIXTURES / "bad_records.jsonl")], str(tmp_path / "no-tokenizer"), tmp_path / "o", Config())


def test_directories_are_listed_recursively_skipping_hidden_and_other_files() -> None:
    from crlft.data.readers import resolve_inputs

    files = resolve_inputs([str(FIXTURES / "data" / "mixed")])
    names = [Path(f).relative_to((FIXTURES / "data" / "mixed").resolve()).as_posix() for f in files]
    assert names == ["nested/openai.jsonl", "openchat.jsonl", "sharegpt.json"]


# ---------------------------------------------------------------- the Ray Data job


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A directory of every format (JSONL, .json array, Parquet, gzipped JSONL, a sub-folder), the bad-records file
    and the FastChat ShareGPT file."""
    root = tmp_path_factory.mktemp("inputs").resolve()
    shutil.copytree(FIXTURES / "data" / "mixed", root / "mixed")
    pq.write_table(pa.Table.from_pylist(PARQUET_ROWS), root / "mixed" / "rows.parquet")
    zipped = gzip.compress((FIXTURES / "bad_records.jsonl").read_bytes())
    (root / "mixed" / "nested" / "zipped.jsonl.gz").write_bytes(zipped)
    shutil.copy(FIXTURES / "bad_records.jsonl", root / "bad_records.jsonl")
    return [str(root / "mixed"), str(root / "bad_records.jsonl"), str(FASTCHAT.resolve())]


def _expected(files: list[str], rules: ClassRules) -> Iterator[Conversation | Reject]:
    """What the library's own reader (one process, no Ray) makes of each file."""
    for name in files:
        yield from iter_file(name, rules)


def _shard_rows(folder: Path) -> list[dict[str, Any]]:
    return [row for shard in sorted(folder.glob("*.parquet")) for row in pq.read_table(shard).to_pylist()]


def _conversations_in(rows: list[dict[str, Any]]) -> dict[tuple[str, int], list[int]]:
    """(source, line) -> token ids of every conversation in the shards, checking none appears twice."""
    found: dict[tuple[str, int], list[int]] = {}
    for row in rows:
        start = 0
        for source, line, length in zip(row["seq_sources"], row["seq_lines"], row["seq_lens"], strict=True):
            assert (source, line) not in found, f"{source}:{line} packed twice"
            found[(source, line)] = row["input_ids"][start : start + length]
            start += length
    return found


@pytest.fixture(scope="module")
def built(ray_session: None, inputs: list[str], tokenizer_dir: str,
          tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from jobs.build_dataset import build_dataset

    out = tmp_path_factory.mktemp("built")
    return out, build_dataset(inputs, tokenizer_dir, out, Config())


@pytest.mark.slow
def test_counts_add_up_and_every_reject_has_a_reason_and_a_line(built: tuple[Path, dict[str, Any]],
                                                                 inputs: list[str]) -> None:
    from crlft.data.readers import resolve_inputs

    out, stats = built
    expected = list(_expected(resolve_inputs(inputs), ClassRules.from_config(Config())))
    expected_rejects = sorted((r.source, r.line, r.reason) for r in expected if isinstance(r, Reject))
    assert stats["records_in"] == len(expected) == stats["accepted"] + stats["rejected"] + stats["filtered"]
    assert stats["filtered"] == 0 and stats["rejected"] == len(expected_rejects) > 0
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["source"], r["line"], r["reason"]) for r in rejects] == expected_rejects  # sorted, one per record
    assert all(r["reason"] and r["line"] >= 1 and r["raw"] for r in rejects)
    per_class = stats["per_class"]
    assert sum(c["records"] for c in per_class.values()) == stats["accepted"]
    assert per_class["GPT4"]["records"] > 0 and per_class["GPT3"]["records"] > 0
    assert json.loads((out / "stats.json").read_text()) == stats


@pytest.mark.slow
def test_every_good_record_is_in_the_shards_exactly_once(built: tuple[Path, dict[str, Any]], inputs: list[str],
                                                         template_tokenizer: TemplateTokenizer) -> None:
    from crlft.data.readers import resolve_inputs

    out, stats = built
    cfg = Config()
    good = [c for c in _expected(resolve_inputs(inputs), ClassRules.from_config(cfg)) if isinstance(c, Conversation)]
    packed = _conversations_in(_shard_rows(out / "train"))
    assert sorted(packed) == sorted((c.source, c.line) for c in good)
    rewards = {c: cfg.reward(c) for c in cfg.classes}
    decode = template_tokenizer.tokenizer.decode
    for conversation in good:
        ids = packed[(conversation.source, conversation.line)]
        assert ids == template_tokenizer.tokenize_conversation(conversation, rewards, cfg.data.max_len).input_ids
        assert decode(ids, skip_special_tokens=False) == template_tokenizer.render(conversation)
    assert not (out / "val").exists()
    assert stats["splits"]["train"]["records"] == stats["accepted"] == len(good)


@pytest.mark.slow
def test_shards_hold_what_the_trainer_reads(built: tuple[Path, dict[str, Any]]) -> None:
    out, stats = built
    rows = _shard_rows(out / "train")
    assert len(rows) == stats["bins"]
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["weights"]) == len(row["position_ids"])
        assert sum(row["seq_lens"]) == len(row["input_ids"]) <= stats["pack_len"]
        start = 0
        for length in row["seq_lens"]:
            assert row["position_ids"][start : start + length] == list(range(length))
            assert row["labels"][start : start + length - 1] == row["input_ids"][start + 1 : start + length]
            assert row["labels"][start + length - 1] == IGNORE_INDEX
            start += length
    tokens = sum(len(row["input_ids"]) for row in rows)
    assert stats["packing_efficiency"] == pytest.approx(tokens / (len(rows) * stats["pack_len"]), abs=1e-6)
    assert tokens == sum(c["tokens"] for c in stats["per_class"].values())
    assert stats["conditions"] == ["GPT4", "GPT3"] and stats["rewards"] == {"GPT4": 1.0, "GPT3": 0.1}
    assert set(stats["fingerprints"]) == {"inputs", "tokenizer_template", "config"}


@pytest.mark.slow
def test_an_unset_pack_len_packs_a_small_set_into_short_bins_that_hold_its_longest_conversation(
    built: tuple[Path, dict[str, Any]],
) -> None:
    """A few dozen conversations in 2048-token bins would be one or two optimiser steps an epoch (crlft/data/pack.py
    auto_pack_len)."""
    out, stats = built
    longest = max(length for row in _shard_rows(out / "train") for length in row["seq_lens"])
    tokens = stats["splits"]["train"]["tokens"]
    assert Config().data.pack_len is None and stats["max_len"] == 2048
    assert stats["pack_len"] == max(longest, tokens // 64 // 16 * 16) < 2048


@pytest.mark.slow
def test_rebuilding_gives_byte_identical_shards(built: tuple[Path, dict[str, Any]], inputs: list[str],
                                                tokenizer_dir: str, tmp_path: Path) -> None:
    from jobs.build_dataset import build_dataset

    first, stats = built
    again = build_dataset(list(reversed(inputs)), tokenizer_dir, tmp_path, Config())
    assert again == stats
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for name in files:
        assert (first / name).read_bytes() == (tmp_path / name).read_bytes(), f"{name} differs"


@pytest.mark.slow
def test_expert_only_with_validation_split_and_over_long_conversations(
    ray_session: None, inputs: list[str], tokenizer_dir: str, tmp_path: Path
) -> None:
    from jobs.build_dataset import build_dataset

    long_file = tmp_path / "long.jsonl"
    long_file.write_text("\n".join([_long_record(), _long_record().replace('"Hi"', '"' + "Hi there. " * 40 + '"')]))
    cfg = load_config(None, {"data.max_len": 48, "data.pack_len": 64, "data.val_fraction": 0.5,
                             "data.only_classes": ["GPT4"]})  # fmt: skip
    stats = build_dataset([*inputs, str(long_file)], tokenizer_dir, tmp_path / "out", cfg)
    assert stats["records_in"] == stats["accepted"] + stats["rejected"] + stats["filtered"]
    assert stats["filtered"] > 0 and stats["per_class"]["GPT3"]["records"] == 0
    assert stats["per_class"]["GPT4"]["truncated"] >= 1
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert {r["line"] for r in rejects if r["source"] == str(long_file) and r["reason"].startswith("too long")} == {2}
    train = _conversations_in(_shard_rows(tmp_path / "out" / "train"))
    val = _conversations_in(_shard_rows(tmp_path / "out" / "val"))
    assert train and val and not set(train) & set(val)
    assert len(train) + len(val) == stats["accepted"]
    assert (len(train), len(val)) == (stats["splits"]["train"]["records"], stats["splits"]["val"]["records"])
    assert all(len(ids) <= 48 for ids in [*train.values(), *val.values()])
    assert stats["accepted"] < PACK_GROUP_CONVERSATIONS


@pytest.mark.slow
def test_nothing_usable_is_an_error_that_still_explains_every_reject(ray_session: None, tokenizer_dir: str,
                                                                      tmp_path: Path) -> None:
    from jobs.build_dataset import build_dataset

    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(line for line in (FIXTURES / "bad_records.jsonl").read_text().splitlines()
                             if isinstance(parse_line(line, ClassRules.from_config(Config()), "", 0), Reject)))
    with pytest.raises(CrlftError, match="nothing usable"):
        build_dataset([str(bad)], tokenizer_dir, tmp_path / "out", Config())
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["accepted"] == 0 and stats["rejected"] == stats["records_in"] > 0
    assert len((tmp_path / "out" / "rejects.jsonl").read_text().splitlines()) == stats["rejected"]
    assert not (tmp_path / "out" / "train").exists()

