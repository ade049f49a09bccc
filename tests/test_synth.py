"""The synthetic mixed-quality suite: a data set on which SFT must fail and C-RLFT can succeed."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from crlft.errors import CrlftError
from crlft.eval.scoring import END_OF_TURN, EvalItem, is_correct, load_eval_suite, normalize_answer, score
from crlft.synth.suite import EXPERT, SUBOPTIMAL, SynthSuite, generate_suite, write_suite
from crlft.synth.tasks import TASKS, Question, answer_vocabulary, over_regularised_past


@pytest.fixture(scope="module")
def suite() -> SynthSuite:
    return generate_suite(seed=0)


@pytest.fixture(scope="module")
def eval_questions(suite: SynthSuite) -> list[Question]:
    """The full Question (with its subject) behind every eval item, read off held-out conversations, which ask only
    eval questions: with enough of them every eval question is asked."""
    asked = {
        turn.question.prompt: turn.question
        for conv in generate_suite(seed=0, n_heldout=3000).heldout
        for turn in conv.turns
    }
    return [asked[item.prompt] for item in suite.eval]


def _train_prompts(suite: SynthSuite) -> set[str]:
    return {turn.question.prompt for conv in suite.train for turn in conv.turns}


# --- generation --------------------------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_suite_and_another_seed_a_different_one(suite: SynthSuite) -> None:
    assert generate_suite(seed=0) == suite
    assert generate_suite(seed=1).train != suite.train
    assert generate_suite(seed=1).eval != suite.eval


def test_the_eval_questions_do_not_depend_on_the_training_sizes(suite: SynthSuite) -> None:
    other = generate_suite(seed=0, n_expert=50, ratio=3.0, wrong_rate=0.6, n_heldout=10)
    assert other.eval == suite.eval


def test_default_sizes_are_600_expert_2400_suboptimal_60_eval_200_heldout(suite: SynthSuite) -> None:
    assert Counter(c.condition for c in suite.train) == {EXPERT: 600, SUBOPTIMAL: 2400}
    assert len(suite.eval) == 60
    assert Counter(c.condition for c in suite.heldout) == {EXPERT: 100, SUBOPTIMAL: 100}


def test_class_sizes_follow_n_expert_and_ratio() -> None:
    small = generate_suite(n_expert=40, ratio=2.5, n_eval=12, n_heldout=4)
    assert Counter(c.condition for c in small.train) == {EXPERT: 40, SUBOPTIMAL: 100}


def test_eval_questions_are_spread_evenly_over_every_task(suite: SynthSuite) -> None:
    counts = Counter(item.task for item in suite.eval)
    assert set(counts) == set(TASKS)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_no_eval_prompt_appears_verbatim_in_training(suite: SynthSuite) -> None:
    assert not {item.prompt for item in suite.eval} & _train_prompts(suite)


def test_every_eval_subject_is_trained_in_other_phrasings(suite: SynthSuite, eval_questions: list[Question]) -> None:
    # The generalisation the suite asks for: unseen phrasings of known facts, never unseen facts.
    trained_subjects = {turn.question.subject for conv in suite.train for turn in conv.turns}
    assert all(q.subject in trained_subjects for q in eval_questions)


def test_eval_prompts_are_unique(suite: SynthSuite) -> None:
    assert len({item.prompt for item in suite.eval}) == len(suite.eval)


def test_heldout_conversations_ask_only_eval_questions(suite: SynthSuite) -> None:
    eval_prompts = {item.prompt for item in suite.eval}
    assert all(turn.question.prompt in eval_prompts for conv in suite.heldout for turn in conv.turns)


def test_the_suboptimal_answer_is_always_wrong_and_differs_by_task(suite: SynthSuite) -> None:
    assert all(not is_correct(item.suboptimal_answer or "", item.answer) for item in suite.eval)
    by_task = {item.task: item for item in suite.eval}
    assert by_task["opposite"].suboptimal_answer in by_task["opposite"].prompt  # repeats the word
    assert by_task["colour"].suboptimal_answer == "blue"  # one answer for everything
    assert by_task["category"].suboptimal_answer in {"animal", "fruit", "vehicle", "furniture", "tool", "instrument"}


def test_gpt4_is_always_right_and_gpt3_wrong_at_about_the_wrong_rate() -> None:
    mixed = generate_suite(wrong_rate=0.7)
    replies: dict[str, Counter[str]] = defaultdict(Counter)
    for conv in mixed.train:
        for turn in conv.turns:
            kind = "right" if turn.reply == turn.question.answer else "systematic"
            assert turn.reply in (turn.question.answer, turn.question.suboptimal_answer)
            replies[conv.condition][kind] += 1
    assert replies[EXPERT]["systematic"] == 0
    gpt3_wrong = replies[SUBOPTIMAL]["systematic"] / replies[SUBOPTIMAL].total()
    assert gpt3_wrong == pytest.approx(0.7, abs=0.03)


def test_sft_proof_the_mixture_majority_is_wrong_while_the_expert_majority_is_right(
    suite: SynthSuite, eval_questions: list[Question]
) -> None:
    """SFT learns the majority answer of the mixture: wrong for every eval question's subject (each subject has
    ~50 train replies, 80% of them from GPT3, 90% of those wrong). The GPT4 subset, which a
    conditioned model can single out, is right for every one of them."""
    votes: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for conv in suite.train:
        for turn in conv.turns:
            q = turn.question
            kind = "right" if turn.reply == q.answer else "wrong"
            votes[(q.subject, "all")][kind] += 1
            if conv.condition == EXPERT:
                votes[(q.subject, EXPERT)][kind] += 1
    subjects = {(q.subject, q.task) for q in eval_questions}
    for task in TASKS:
        task_subjects = [s for s, t in subjects if t == task]
        mixture_wrong = [votes[(s, "all")]["wrong"] > votes[(s, "all")]["right"] for s in task_subjects]
        assert all(mixture_wrong), task
    expert_votes = [votes[(s, EXPERT)] for s, _ in subjects if votes[(s, EXPERT)]]
    assert all(v["wrong"] == 0 for v in expert_votes)


def test_some_conversations_have_two_turns_and_some_a_system_prompt(suite: SynthSuite) -> None:
    two_turn = sum(len(c.turns) == 2 for c in suite.train) / len(suite.train)
    with_system = sum(c.system is not None for c in suite.train) / len(suite.train)
    assert 0.02 < two_turn < 0.1
    assert 0.05 < with_system < 0.2
    assert all(len(c.turns) in (1, 2) for c in suite.train)


def test_answers_are_short_words_from_a_small_closed_vocabulary(suite: SynthSuite) -> None:
    vocabulary = {task: answer_vocabulary(task) for task in TASKS}
    assert all(2 <= len(words) <= 80 for words in vocabulary.values())
    for conv in suite.train:
        for turn in conv.turns:
            assert turn.reply in vocabulary[conv.task]
            assert END_OF_TURN not in turn.reply and " " not in turn.reply


def test_over_regularised_past_applies_the_regular_rule_to_irregular_verbs() -> None:
    assert [over_regularised_past(v) for v in ("go", "take", "run", "fly", "begin", "sleep")] == [
        "goed",
        "taked",
        "runned",
        "flied",
        "begined",
        "sleeped",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_expert": -1}, "n_expert must be >= 0"),
        ({"ratio": float("nan")}, "ratio must be a finite number"),
        ({"wrong_rate": 1.5}, "wrong_rate must be within [0, 1]"),
        ({"n_eval": 0}, "n_heldout > 0 needs n_eval > 0"),
        ({"n_eval": 5000}, "lower n_eval"),
    ],
)
def test_impossible_sizes_are_refused_with_the_reason(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(CrlftError, match=message.replace("[", r"\[").replace("]", r"\]")):
        generate_suite(**kwargs)


def test_write_suite_writes_the_three_documented_jsonl_files(tmp_path: Path) -> None:
    paths = write_suite(tmp_path / "suite", seed=3, n_expert=30, ratio=10, n_eval=24, n_heldout=8)
    assert {name: path.name for name, path in paths.items()} == {
        "train": "train.jsonl",
        "heldout": "heldout.jsonl",
        "eval": "eval.jsonl",
    }
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert len(train) == 330
    for record in train:
        assert set(record) <= {"items", "condition", "system", "task"}
        assert record["condition"] in (EXPERT, SUBOPTIMAL)
        assert [m["role"] for m in record["items"]][:2] == ["user", "assistant"]
    assert any("system" in record for record in train)
    heldout = [json.loads(line) for line in paths["heldout"].read_text().splitlines()]
    assert {r["condition"] for r in heldout} == {EXPERT, SUBOPTIMAL}
    first_eval = json.loads(paths["eval"].read_text().splitlines()[0])
    assert set(first_eval) == {"id", "prompt", "answer", "suboptimal_answer", "task"}
    assert load_eval_suite(paths["eval"]) == generate_suite(seed=3, n_expert=30, ratio=10, n_eval=24, n_heldout=8).eval


# --- scoring -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("cold", "cold"),
        ("  Cold. ", "cold"),
        ('"Monday"', "monday"),
        ("'went'!", "went"),
        ("cold<|end_of_turn|>GPT4 User: hi", "cold"),
        ("ice  cream", "ice cream"),
        ("", ""),
    ],
)
def test_normalize_answer_keeps_only_the_comparable_answer(raw: str, normal: str) -> None:
    assert normalize_answer(raw) == normal


def test_is_correct_compares_normalised_answers() -> None:
    assert is_correct(" Tuesday.<|end_of_turn|>", "Tuesday")
    assert not is_correct("Monday", "Tuesday")
    assert not is_correct("the opposite is cold", "cold")


def test_score_reports_accuracy_and_suboptimal_rate_overall_and_per_task() -> None:
    items = [
        EvalItem("a", "Opposite of hot?", "cold", "hot", "opposite"),
        EvalItem("b", "Opposite of up?", "down", "up", "opposite"),
        EvalItem("c", "What colour is snow?", "white", "blue", "colour"),
        EvalItem("d", "Past tense of go?", "went", None, "past_tense"),
    ]
    result = score(["Cold.", "up", "blue", "went"], items)
    assert result["n"] == 4
    assert result["accuracy"] == 0.5
    assert result["suboptimal_rate"] == pytest.approx(2 / 3)  # over the items that name a suboptimal answer
    assert result["per_task"]["opposite"] == {"n": 2, "accuracy": 0.5, "suboptimal_rate": 0.5}
    assert result["per_task"]["colour"] == {"n": 1, "accuracy": 0.0, "suboptimal_rate": 1.0}
    assert result["per_task"]["past_tense"] == {"n": 1, "accuracy": 1.0, "suboptimal_rate": 0.0}


def test_score_refuses_predictions_that_do_not_pair_with_the_items() -> None:
    with pytest.raises(CrlftError, match="1 predictions for 2 eval items"):
        score(["cold"], [EvalItem("a", "p", "cold"), EvalItem("b", "q", "down")])


def test_the_gpt3_behaviour_scores_zero_accuracy_and_full_suboptimal_rate(suite: SynthSuite) -> None:
    result = score([item.suboptimal_answer or "" for item in suite.eval], suite.eval)
    assert result["accuracy"] == 0.0
    assert result["suboptimal_rate"] == 1.0


# --- loading eval suites -----------------------------------------------------------------------------------------


def test_load_eval_suite_needs_only_prompt_and_answer(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "2+2?", "answer": "four"}\n\n{"prompt": "Capital of France?", "answer": "Paris"}\n')
    assert load_eval_suite(path) == [
        EvalItem("line-1", "2+2?", "four", None, "default"),
        EvalItem("line-3", "Capital of France?", "Paris", None, "default"),
    ]


def test_load_eval_suite_names_file_and_line_of_every_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    lines = [
        '{"prompt": "ok?", "answer": "yes", "id": "x"}',
        "{not json",
        '["a list"]',
        '{"prompt": "no answer"}',
        '{"prompt": "q", "answer": 4}',
        '{"prompt": "q", "answer": "a", "suboptimal_answer": 1}',
        '{"prompt": "  ", "answer": "a"}',
        '{"prompt": "dup", "answer": "a", "id": "x"}',
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CrlftError) as raised:
        load_eval_suite(path)
    message = str(raised.value)
    assert message.startswith("7 bad line(s)")
    for expected in [
        f"{path}:2: not valid JSON",
        f"{path}:3: expected a JSON object, got list",
        f"{path}:4: missing field 'answer'",
        f"{path}:5: field 'answer' must be a string, got int",
        f"{path}:6: field 'suboptimal_answer' must be a string or null, got int",
        f"{path}:7: field 'prompt' is empty",
        f"{path}:8: duplicate id 'x' (first on line 1)",
    ]:
        assert expected in message
    assert f"{path}:1:" not in message


def test_load_eval_suite_refuses_an_empty_or_missing_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CrlftError, match="has no items"):
        load_eval_suite(empty)
    with pytest.raises(CrlftError, match="cannot read the eval suite"):
        load_eval_suite(tmp_path / "missing.jsonl")
