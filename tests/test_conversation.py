"""Readers and validation: every accepted format loads, every bad record is refused with its place and reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crlft.config import ClassSpec, Config, load_config
from crlft.data.readers import iter_file
from crlft.data.records import ClassRules, Conversation, Reject, parse_line
from crlft.errors import CrlftError

FIXTURES = Path(__file__).parent / "fixtures"
FASTCHAT = FIXTURES / "fastchat"
RULES = ClassRules.from_config(Config())


def parse(record: object) -> Conversation | Reject:
    return parse_line(json.dumps(record), RULES, "mem.jsonl", 7)


def test_the_three_formats_give_the_same_conversation() -> None:
    openchat = {"items": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "system": "S"}
    sharegpt = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Yo"}]}
    openai = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Yo"}]}
    parsed = [parse(r) for r in (openchat, sharegpt, openai)]
    assert all(isinstance(p, Conversation) for p in parsed)
    assert len({(p.messages, p.system, p.condition) for p in parsed}) == 1  # type: ignore[union-attr]


def test_class_comes_from_the_record_then_the_rules_then_the_default() -> None:
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]
    assert parse({"conversations": turns, "model": "Model: GPT-4"}).condition == "GPT4"  # type: ignore[union-attr]
    assert parse({"conversations": turns, "model": "gpt-4-0613"}).condition == "GPT4"  # type: ignore[union-attr]
    assert parse({"conversations": turns, "model": "gpt-3.5-turbo"}).condition == "GPT3"  # type: ignore[union-attr]
    assert parse({"conversations": turns, "model": "gpt-4", "condition": "GPT3"}).condition == "GPT3"  # type: ignore
    assert parse({"conversations": turns, "class": "GPT4"}).condition == "GPT4"  # type: ignore[union-attr]


def test_without_a_default_class_an_unmatched_record_is_refused() -> None:
    rules = ClassRules.from_config(Config(default_class=None))
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    out = parse_line(json.dumps(record), rules, "f", 1)
    assert isinstance(out, Reject) and "no class" in out.reason


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (2, "not valid JSON"),
        (3, "must be a JSON object"),
        (4, "items: no turns"),
        (5, "items[0].role: unknown role 'bot'"),
        (6, "items[0].content: empty content"),
        (7, "items[0]: assistant turn before any user turn"),
        (8, "conversations[1]: two user turns in a row"),
        (9, "condition: unknown class 'GPT5'; known classes: GPT4, GPT3"),
        (10, "messages[0].content: must be a string, got int"),
        (12, "no turns: expected a field"),
        (14, "no assistant turn"),
    ],
)
def test_each_bad_record_is_refused_with_line_and_field(line: int, reason: str) -> None:
    by_line = {r.line: r for r in iter_file(FIXTURES / "bad_records.jsonl", RULES)}
    rejected = by_line[line]
    assert isinstance(rejected, Reject)
    assert reason in rejected.reason
    assert rejected.source.endswith("bad_records.jsonl") and rejected.raw


def test_a_bad_file_loses_nothing() -> None:
    results = list(iter_file(FIXTURES / "bad_records.jsonl", RULES))
    lines = sum(1 for x in (FIXTURES / "bad_records.jsonl").read_text().splitlines() if x.strip())
    assert len(results) == lines
    accepted = [r for r in results if isinstance(r, Conversation)]
    assert [c.line for c in accepted] == [1, 11, 13]


def test_fastchat_dummy_conversations_load() -> None:
    results = list(iter_file(FASTCHAT / "dummy_conversation.json", RULES))
    assert len(results) == 500
    assert all(isinstance(r, Conversation) for r in results), [str(r) for r in results if isinstance(r, Reject)][:3]
    assert results[0].line == 1 and results[0].messages[0].content == "Who are you?"  # type: ignore[union-attr]


def test_parquet_rows_are_read(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    (conv,) = iter_file(tmp_path / "x.parquet", RULES)
    assert isinstance(conv, Conversation) and conv.line == 1


def test_a_json_file_holding_one_object_is_one_record(tmp_path: Path) -> None:
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (tmp_path / "one.json").write_text(json.dumps(record, indent=2))
    (conv,) = iter_file(tmp_path / "one.json", RULES)
    assert isinstance(conv, Conversation) and conv.line == 1


def test_parquet_nulls_are_absent_fields_as_the_data_stage_reads_them(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"items": [{"role": "user", "content": "q", "weight": None},
                       {"role": "assistant", "content": "a", "weight": 2.0}], "system": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "nulls.parquet")
    (conv,) = iter_file(tmp_path / "nulls.parquet", RULES)
    assert isinstance(conv, Conversation), conv
    assert [m.weight for m in conv.messages] == [1.0, 2.0] and conv.system == ""  # absent weight: the default


def test_a_json_array_that_does_not_parse_is_one_reject_at_its_line(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('[\n  {"messages": []},\n  {oops}\n]\n')
    (reject,) = iter_file(tmp_path / "broken.json", RULES)
    assert isinstance(reject, Reject) and reject.line == 3 and "not valid JSON" in reject.reason


def test_missing_input_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CrlftError, match="does not exist"):
        list(iter_file(tmp_path / "nope.jsonl", RULES))


def test_config_defaults_are_the_papers() -> None:
    cfg = Config()
    assert cfg.classes["GPT4"].reward == 1.0 and cfg.classes["GPT3"].reward == 0.1
    assert cfg.inference_condition == "GPT4" and cfg.default_class == "GPT3"


def test_config_from_yaml_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("classes:\n  Expert: {reward: 1.0}\n  Weak: {reward: 0.2}\n"
                    "inference_condition: Expert\ndefault_class: Weak\ntrain: {epochs: 2}\n")
    cfg = load_config(path, {"train.epochs": 3, "train.mode": "sft"})
    assert cfg.classes == {"Expert": ClassSpec(reward=1.0), "Weak": ClassSpec(reward=0.2)}
    assert cfg.train.epochs == 3 and cfg.reward("Weak") == 1.0  # sft ignores rewards


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("inference_condition: GPT9\n", "inference_condition 'GPT9' is not a class"),
        ("train: {epochs: 0}\n", "train.epochs"),
        ("train: {nope: 1}\n", "train.nope"),
        ("classes: {GPT4: {reward: -1}}\ndefault_class: null\n", "classes.GPT4.reward"),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, yaml_text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(CrlftError, match=message.replace("(", r"\(")):
        load_config(path)
