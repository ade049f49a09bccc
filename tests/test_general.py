"""The general-capability check shipped with crlft (retention): its data files and how answers are scored."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from crlft.errors import CrlftError
from crlft.eval.general_check import (
    CHECK_FILE,
    CHECK_TYPES,
    GENERAL_DATA,
    REPLAY_PROMPTS_FILE,
    CheckItem,
    check_scores,
    contains_words,
    is_right,
    load_check,
    load_prompts,
    normalize,
)

KINDS = {"fact", "arithmetic", "word", "instruction"}


def fact(*accept: str) -> CheckItem:
    return CheckItem("t-1", "fact", "?", tuple(accept))


def form(check: dict[str, Any], *accept: str) -> CheckItem:
    return CheckItem("t-1", "instruction", "?", tuple(accept), check)


def write_lines(path: Path, *records: object) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The shipped files


def test_the_shipped_files_live_in_the_package_data_folder() -> None:
    assert CHECK_FILE == GENERAL_DATA / "check.jsonl" and CHECK_FILE.is_file()
    assert REPLAY_PROMPTS_FILE == GENERAL_DATA / "replay_prompts.jsonl" and REPLAY_PROMPTS_FILE.is_file()
    assert (GENERAL_DATA / "SOURCE.md").is_file()


def test_the_check_set_has_hundreds_of_items_of_the_four_kinds_with_unique_ids_and_prompts() -> None:
    items = load_check()
    kinds = Counter(item.kind for item in items)
    assert len(items) >= 300
    assert set(kinds) == KINDS and min(kinds.values()) >= 40, kinds
    assert len({item.id for item in items}) == len(items)
    assert len({item.prompt.strip().lower() for item in items}) == len(items)  # 7 + 5 and 7 - 5 differ


def test_every_check_item_is_scorable_and_instructions_check_a_form() -> None:
    for item in load_check():
        assert item.accept or item.check, item.id
        if item.kind == "instruction":
            assert item.check is not None and item.check["type"] in CHECK_TYPES, item.id
        else:
            assert item.accept and item.check is None, item.id


def test_no_accepted_answer_is_in_its_own_question() -> None:
    """Repeating the question must not score. Instructions are exempt: there the form is what is checked ("Write the
    word 'hello' in capital letters")."""
    leaks = [(item.id, accepted) for item in load_check() if item.kind != "instruction"
             for accepted in item.accept if contains_words(item.prompt, accepted)]  # fmt: skip
    assert leaks == []


def test_arithmetic_accepts_the_digits_and_the_word() -> None:
    for item in load_check():
        if item.kind == "arithmetic":
            assert any(a.isdigit() for a in item.accept) and any(a[:1].isalpha() for a in item.accept), item.id


def test_the_replay_prompts_are_hundreds_of_distinct_prompts_none_a_check_question() -> None:
    prompts = load_prompts()
    records = [json.loads(line) for line in REPLAY_PROMPTS_FILE.read_text(encoding="utf-8").splitlines()]
    assert len(prompts) >= 200
    assert len({p.strip().lower() for p in prompts}) == len(prompts)
    assert len({r["id"] for r in records}) == len(records)
    assert not {p.strip().lower() for p in prompts} & {item.prompt.strip().lower() for item in load_check()}


def test_the_package_data_setting_ships_the_folder() -> None:
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    assert '"assets/general/*"' in pyproject


# ---------------------------------------------------------------------------------------------------------------------
# Accepted answers: whole words in a sentence


@pytest.mark.parametrize(("answer", "right"), [
    ("Paris", True),
    ("The capital of France is Paris.", True),
    ("**Paris** is the capital.", True),
    ("PARIS!", True),
    ("It is Lyon.", False),
    ("Parisian food is famous.", False),  # a whole word, not a prefix
    ("", False),
])  # fmt: skip
def test_an_accepted_answer_counts_anywhere_in_a_sentence_as_a_whole_word(answer: str, right: bool) -> None:
    assert is_right(fact("paris"), answer) is right


def test_any_of_several_accepted_answers_counts_and_phrases_match_word_for_word() -> None:
    item = fact("blue whale", "whale")
    assert is_right(item, "It is the blue whale.") and is_right(item, "A whale.")
    assert is_right(fact("buenos aires"), "Buenos-Aires, of course") and not is_right(fact("new york"), "York")


@pytest.mark.parametrize(("answer", "right"), [
    ("12", True), ("7 + 5 = 12.", True), ("The answer is twelve.", True), ("Twelve!", True),
    ("120", False), ("112", False), ("12.5", False), ("1200", False), ("It is 21.", False),
])  # fmt: skip
def test_numbers_match_as_whole_numbers(answer: str, right: bool) -> None:
    assert is_right(fact("12", "twelve"), answer) is right


def test_thousands_separators_hyphens_and_accents_are_normalised() -> None:
    assert is_right(fact("1000"), "There are 1,000 grams in a kilogram.")
    assert is_right(fact("twenty one"), "Twenty-one.")
    assert is_right(fact("bogota"), "Bogotá") and is_right(fact("h2o"), "It is H₂O.")
    assert normalize("Don't STOP, 3.5!") == "dont stop 3.5"


# ---------------------------------------------------------------------------------------------------------------------
# Form checks: one right and one wrong answer for each


FORMS: list[tuple[dict[str, Any], str, str]] = [
    ({"type": "uppercase"}, "GREEN, LIKE LEAVES!", "Green"),
    ({"type": "uppercase"}, "OK 2", "42"),  # no letters at all is not uppercase
    ({"type": "lowercase"}, "rome is the capital.", "Rome is the capital."),
    ({"type": "one_word"}, "White.", "It is white."),
    ({"type": "one_word"}, "**Honey**", "Honey bees"),
    ({"type": "max_words", "n": 5}, "Vast, blue, deep - and calm.", "The ocean is vast, blue and deep."),
    ({"type": "word_count", "n": 3}, "Bright, warm, golden.", "Bright and warm, and golden."),
    ({"type": "numbered_list", "n": 3}, "Here you go:\n1. Apple\n2. Pear\n3. Plum", "1. Apple\n2. Pear"),
    ({"type": "numbered_list", "n": 2}, "1) Dog\n2) Cat", "- Dog\n- Cat"),
    ({"type": "numbered_list", "n": 2}, "1. Dog\n2. Cat", "1. Dog\n3. Cat"),
    ({"type": "starts_with", "text": ["yes", "no"]}, "Yes, the Sun is a star.", "Yesterday I saw the Sun."),
    ({"type": "starts_with", "text": "once upon a time"}, "*Once upon a time*, a fox...", "There once was a fox."),
    ({"type": "ends_with", "text": "today"}, "I went for a walk today!", "Today I went for a walk."),
    ({"type": "ends_with", "text": "day"}, "What a lovely day.", "I will do it someday."),
    ({"type": "contains", "text": "park"}, "My dog loves the park.", "My dog loves parking lots."),
]


@pytest.mark.parametrize(("check", "right", "wrong"), FORMS)
def test_each_form_check_passes_a_right_answer_and_fails_a_wrong_one(check: dict, right: str, wrong: str) -> None:
    assert is_right(form(check), right)
    assert not is_right(form(check), wrong)


def test_every_check_type_is_tested() -> None:
    assert {check["type"] for check, _, _ in FORMS} == set(CHECK_TYPES)


def test_an_item_with_accept_and_check_needs_both() -> None:
    item = form({"type": "uppercase"}, "green")
    assert is_right(item, "GREEN.")
    assert not is_right(item, "Green.")  # right content, wrong form
    assert not is_right(item, "BLUE.")  # right form, wrong content


# ---------------------------------------------------------------------------------------------------------------------
# Scores


def test_scores_are_the_share_right_overall_and_per_kind() -> None:
    items = [fact("paris"), fact("rome"), CheckItem("a-1", "arithmetic", "?", ("4", "four")),
             form({"type": "one_word"})]  # fmt: skip
    scores = check_scores(items, ["Paris.", "Milan.", "2 + 2 = 4", "Yes"])
    assert scores == {"general_accuracy": 0.75, "general_accuracy/arithmetic": 1.0, "general_accuracy/fact": 0.5,
                      "general_accuracy/instruction": 1.0, "general_n": 4.0}  # fmt: skip


def test_scores_need_one_answer_per_item() -> None:
    with pytest.raises(CrlftError, match="2 check items but 1 answers"):
        check_scores([fact("a"), fact("b")], ["a"])


# ---------------------------------------------------------------------------------------------------------------------
# Loading: samples and errors


def test_limit_samples_every_kind_in_proportion_spread_over_the_file() -> None:
    everything = load_check()
    sample = load_check(limit=40)
    kinds = Counter(item.kind for item in sample)
    assert len(sample) == 40 and set(kinds) == KINDS
    assert sample == load_check(limit=40)  # deterministic
    facts = [item for item in everything if item.kind == "fact"]
    sampled_facts = [item for item in sample if item.kind == "fact"]
    assert abs(kinds["fact"] - 40 * len(facts) / len(everything)) < 1
    assert sampled_facts[-1] in facts[len(facts) // 2:]  # not the first N of the kind
    assert [everything.index(item) for item in sample] == sorted(everything.index(item) for item in sample)


def test_a_limit_as_small_as_the_number_of_kinds_still_takes_one_of_each() -> None:
    assert {item.kind for item in load_check(limit=4)} == KINDS
    assert len(load_check(limit=1)) == 1
    assert load_check(limit=100_000) == load_check()


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ({"kind": "fact", "prompt": "?", "accept": ["x"]}, "field 'id'"),
    ({"id": "x", "kind": "fact", "prompt": "", "accept": ["x"]}, "field 'prompt'"),
    ({"id": "x", "kind": "fact", "prompt": "?", "accept": "paris"}, "field 'accept'"),
    ({"id": "x", "kind": "fact", "prompt": "?"}, "field 'accept' or 'check'"),
    ({"id": "x", "kind": "instruction", "prompt": "?", "check": {"type": "rhymes"}}, "field 'check'"),
    ({"id": "x", "kind": "instruction", "prompt": "?", "check": {"type": "max_words"}}, "field 'check.n'"),
    ({"id": "x", "kind": "instruction", "prompt": "?", "check": {"type": "contains", "text": 3}}, "field 'check.text'"),
    ({"id": "fact-1", "kind": "fact", "prompt": "?", "accept": ["x"]}, "already on line 1"),
])  # fmt: skip
def test_a_bad_check_line_names_the_file_line_and_field(tmp_path: Path, line: object, message: str) -> None:
    path = write_lines(tmp_path / "check.jsonl", {"id": "fact-1", "kind": "fact", "prompt": "?", "accept": ["x"]},
                       "", line)  # fmt: skip
    with pytest.raises(CrlftError, match=message) as caught:
        load_check(path)
    assert f"{path}:3" in str(caught.value)


def test_prompts_load_from_jsonl_or_plain_text_with_an_even_spread_as_the_limit(tmp_path: Path) -> None:
    jsonl = write_lines(tmp_path / "p.jsonl", *({"id": f"p{n}", "prompt": f"Prompt {n}", "x": 1} for n in range(10)))
    text = tmp_path / "p.txt"
    text.write_text("Prompt 0\n\n  Prompt 1  \n", encoding="utf-8")
    assert load_prompts(jsonl) == [f"Prompt {n}" for n in range(10)]
    assert load_prompts(jsonl, limit=5) == ["Prompt 0", "Prompt 2", "Prompt 4", "Prompt 6", "Prompt 8"]
    assert load_prompts(text) == ["Prompt 0", "Prompt 1"]


def test_a_bad_prompt_line_names_the_file_and_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", {"prompt": "fine"}, {"text": "no prompt field"})
    with pytest.raises(CrlftError, match=re.escape(f"{path}:2: field 'prompt'")):
        load_prompts(path)
    with pytest.raises(CrlftError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")
