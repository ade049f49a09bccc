"""The mixed-quality set of new facts: invented, asked in held-out phrasings, answered in sentences, GPT3 confused."""

from __future__ import annotations

import json
from pathlib import Path

from crlft.eval.scoring import is_correct, load_eval_suite, score
from crlft.synth.facts import RELATIONS, generate_facts, write_facts
from crlft.synth.suite import EXPERT, SUBOPTIMAL


def test_every_fact_is_invented_and_distinct() -> None:
    suite = generate_facts(n_countries=12, seed=3)
    names = [word for c in suite.countries for word in (c.name, c.capital, c.currency)]
    assert len(names) == len(set(names)) == 36
    assert generate_facts(n_countries=12, seed=3).countries == suite.countries  # deterministic in the seed


def test_the_eval_asks_every_fact_in_a_phrasing_never_trained_on() -> None:
    suite = generate_facts(n_countries=8)
    trained = {c.turns[0].question.prompt for c in suite.train}
    assert len(suite.eval) == 8 * len(RELATIONS)
    assert not trained & {item.prompt for item in suite.eval}
    assert {item.task for item in suite.eval} == set(RELATIONS)


def test_gpt4_answers_right_in_sentences_and_gpt3_mostly_gives_the_next_countrys_value() -> None:
    suite = generate_facts(n_countries=8, ratio=2.0, wrong_rate=0.9)
    expert = [c for c in suite.train if c.condition == EXPERT]
    suboptimal = [c for c in suite.train if c.condition == SUBOPTIMAL]
    assert len(suboptimal) == 2 * len(expert)
    for conversation in expert:
        turn = conversation.turns[0]
        assert turn.reply.endswith(".") and is_correct(turn.reply, turn.question.answer, "word")
    wrong = sum(is_correct(c.turns[0].reply, c.turns[0].question.suboptimal_answer, "word") for c in suboptimal)
    assert 0.8 < wrong / len(suboptimal) < 1.0


def test_the_written_eval_scores_whole_words_of_sentence_answers(tmp_path: Path) -> None:
    files = write_facts(tmp_path, n_countries=4)
    items = load_eval_suite(files["eval"])
    assert all(json.loads(line)["match"] == "word" for line in files["eval"].read_text().splitlines())
    answers = [f"I believe it is {item.answer}." for item in items]
    assert score(answers, items)["accuracy"] == 1.0
    assert score([f"It is {item.answer}s." for item in items], items)["accuracy"] == 0.0  # whole words only
    assert score([item.suboptimal_answer or "" for item in items], items)["suboptimal_rate"] == 1.0


def test_an_unknown_match_rule_is_a_bad_line(tmp_path: Path) -> None:
    import pytest

    from crlft.errors import CrlftError

    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"prompt": "Capital of Brirkeia?", "answer": "Lonmem", "match": "fuzzy"}) + "\n")
    with pytest.raises(CrlftError, match=r"eval.jsonl:1: field 'match' must be one of exact, word"):
        load_eval_suite(path)
