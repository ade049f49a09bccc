"""Retention's figures and the base model's cache (crlft/eval/retention.py), without a model: the measured path runs in
tests/test_real_model.py on SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest

from crlft.errors import CrlftError
from crlft.eval.general_check import load_check
from crlft.eval.judge import JUDGE_PROMPTS_FILE, load_judge_prompts
from crlft.eval.mt_bench import BENCH_DATA
from crlft.eval.retention import (
    GeneralAnswers,
    base_cache_key,
    judged_comparison,
    open_prompts,
    read_cached,
    retention_metrics,
    rouge_l,
    write_cached,
)


def answers(accuracy: float, open_answers: list[str]) -> GeneralAnswers:
    return GeneralAnswers({"general_accuracy": accuracy, "general_accuracy/fact": accuracy, "general_n": 10.0},
                          ["x"] * 10, open_answers)


def test_rouge_l_is_the_f1_of_the_longest_common_word_subsequence() -> None:
    assert rouge_l("The capital of France is Paris.", "the capital of france is paris") == 1.0
    assert rouge_l("Paris is the capital", "The capital is Paris") == pytest.approx(2 * 2 / 8)  # "the capital"
    assert rouge_l("", "") == 1.0 and rouge_l("Paris", "") == 0.0 and rouge_l("a b", "c d") == 0.0


def test_retention_is_the_candidates_general_accuracy_over_the_base_models() -> None:
    figures = retention_metrics(answers(0.45, ["a b c", "x"]), answers(0.5, ["a b c", "y"]))
    assert figures["retention"] == pytest.approx(0.9)
    assert figures["agreement"] == pytest.approx(0.5)
    assert (figures["general_accuracy"], figures["base_general_accuracy"]) == (0.45, 0.5)
    assert "general_n" not in figures and figures["base_general_accuracy/fact"] == 0.5


def test_a_base_that_answers_nothing_right_has_no_retention() -> None:
    with pytest.raises(CrlftError, match="retention is undefined"):
        retention_metrics(answers(0.3, []), answers(0.0, []))


def test_the_base_is_cached_under_what_its_answers_depend_on(tmp_path: Path) -> None:
    items, prompts = load_check(limit=20), open_prompts(4)
    key = base_cache_key("rev1", items, prompts, "vllm:float32")
    assert key == base_cache_key("rev1", load_check(limit=20), open_prompts(4), "vllm:float32")
    assert len({key, base_cache_key("rev2", items, prompts, "vllm:float32"),
                base_cache_key("rev1", items[:10], prompts, "vllm:float32"),
                base_cache_key("rev1", items, prompts[:2], "vllm:float32"),
                base_cache_key("rev1", items, prompts, "transformers:float32")}) == 5  # fmt: skip
    path = tmp_path / "retention" / f"{key}.json"
    assert read_cached(path) is None
    write_cached(path, answers(0.5, ["one", "two"]))
    assert read_cached(path) == answers(0.5, ["one", "two"])
    path.write_text("{ half written")
    assert read_cached(path) is None  # measured again, never trusted


def test_the_open_prompts_are_the_shipped_first_turns_of_vicuna_and_mt_bench() -> None:
    prompts = open_prompts()
    assert len(prompts) == len(set(prompts)) == 158 and open_prompts(40) == prompts[:40]  # 2 asked by both
    assert open_prompts(0) == []  # eval.open_limit 0 skips agreement (it once asked all 158)


def test_a_judge_compares_each_open_answer_with_the_base_models_in_both_orders_and_a_flip_is_a_tie() -> None:
    """Judges favour a position: each pair is asked with the candidate first and then second; only verdicts that
    agree name a winner (FastChat's convention)."""
    asked: list[tuple[str, str]] = []

    def judge(system: str, user: str) -> str:  # prefers the answer that names Paris; else the first answer shown
        asked.append((system, user))
        first = user.split("[The Start of Assistant A's Answer]")[1].split("[The End of Assistant A's Answer]")[0]
        second = user.split("[The Start of Assistant B's Answer]")[1].split("[The End of Assistant B's Answer]")[0]
        if ("Paris" in first) != ("Paris" in second):
            return "A names it. [[A]]" if "Paris" in first else "B names it: [[B]]"
        return "Both alike, but [[A]]" if first.strip() else "no verdict"

    prompts = ["Capital of France?", "Capital of France, again?", "Say hi."]
    candidate = ["Paris.", "Lyon.", "hi"]
    base = ["Lyon.", "Paris.", "hello"]
    figures, records = judged_comparison(prompts, candidate, base, judge,
                                         load_judge_prompts(BENCH_DATA / JUDGE_PROMPTS_FILE))
    assert [r["outcome"] for r in records] == ["candidate", "base", "tie"]  # the third: [[A]] in both orders
    assert figures == pytest.approx({"judged_not_worse": 2 / 3, "judged_wins": 1 / 3, "judged_losses": 1 / 3})
    assert len(asked) == 6 and all("impartial judge" in system for system, _ in asked)
    assert "[User Question]\nCapital of France?" in asked[0][1]


def test_a_judge_without_the_pairwise_prompt_is_refused() -> None:
    with pytest.raises(CrlftError, match="no 'pair-v2'"):
        judged_comparison(["q"], ["a"], ["b"], lambda s, u: "[[A]]", {})


def test_retention_is_planned_for_a_pretrained_base_and_asked_for_without_one_is_an_error(tmp_path: Path) -> None:
    """`crlft eval`'s plan (crlft.eval.measure.plan_retention): auto measures only against a pretrained base found here,
    --no-retention never, --retention without a base is one error naming the flag."""
    import json

    from crlft.eval.measure import plan_retention
    from crlft.presets import PRESETS

    pretrained, preset = tmp_path / "pretrained", tmp_path / "preset"
    for folder, shape in ((pretrained, {"hidden_size": 7}), (preset, next(iter(PRESETS.values())))):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(shape))
    plan = plan_retention(None, str(pretrained), None, 12, 3)
    assert plan is not None and plan.base_model == pretrained and len(plan.items) == 12 and len(plan.prompts) == 3
    assert not plan.asked
    assert plan_retention(None, str(preset), None, 12, 3) is None  # the embedded default knows nothing to keep
    assert plan_retention(None, str(pretrained), False, 12, 3) is None
    assert plan_retention(None, str(preset), True, 12, 3).asked
    with pytest.raises(CrlftError, match="retention needs the base model .* --base-model"):
        plan_retention(None, str(tmp_path / "absent"), True, 12, 3)
    assert plan_retention(None, None, None, 12, 3) is None
