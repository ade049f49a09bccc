"""Open-ended benchmarks: MT-bench (two turns) and Vicuna-bench, from FastChat's llm_judge data: the model's answers,
turn by turn, graded 1-10 by a judge (crlft.eval.judge) with FastChat's single-answer judge prompts."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crlft.data.records import Message
from crlft.errors import CrlftError
from crlft.eval.answers import Decoder, chat_prompt, generate
from crlft.eval.judge import JUDGE_PROMPTS_FILE, JudgeFn, parse_rating
from crlft.export import ExportedModel
from crlft.storage import jsonl_records

BENCHES = ("mt_bench", "vicuna")
# FastChat's llm_judge data (questions, GPT-4 references, judge prompts) shipped in the package (see its SOURCE.md)
BENCH_DATA = Path(__file__).resolve().parents[1] / "assets" / "fastchat"
BENCH_FOLDERS = {"mt_bench": "mt_bench", "vicuna": "vicuna_bench"}
NEED_REFERENCE = {"math", "reasoning", "coding"}  # FastChat's categories graded against a reference answer


@dataclass(frozen=True)
class BenchQuestion:
    question_id: int
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] = ()


@dataclass(frozen=True)
class BenchAnswer:
    question_id: int
    model_id: str
    turns: tuple[str, ...]
    condition: str

    def to_json(self) -> dict[str, Any]:
        """FastChat's model_answer format (llm_judge/data/<bench>/model_answer/<model>.jsonl)."""
        return {"question_id": self.question_id, "answer_id": f"{self.model_id}-{self.question_id}",
                "model_id": self.model_id, "condition": self.condition,
                "choices": [{"index": 0, "turns": list(self.turns)}], "tstamp": time.time()}  # fmt: skip


@dataclass(frozen=True)
class Judgment:
    question_id: int
    turn: int
    judge_prompt: str
    score: float  # 1-10; -1 when the judge's reply has no rating (FastChat's convention)
    judgment: str

    def to_json(self, model_id: str, judge_model: str) -> dict[str, Any]:
        return {"question_id": self.question_id, "model": model_id, "judge": [judge_model, self.judge_prompt],
                "turn": self.turn, "score": self.score, "judgment": self.judgment, "tstamp": time.time()}  # fmt: skip


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [record for _, record in jsonl_records(path)]


def load_bench(bench: str, data_dir: str | Path, limit: int | None = None) -> list[BenchQuestion]:
    """The questions of `bench` ("mt_bench" or "vicuna") from a FastChat data folder, with GPT-4 reference answers
    where the folder has them; the first `limit` questions when given."""
    if bench not in BENCHES:
        raise CrlftError(f"unknown benchmark {bench!r}: choose {' or '.join(BENCHES)}")
    folder = Path(data_dir) / BENCH_FOLDERS[bench]
    questions_file = folder / "question.jsonl"
    if not questions_file.is_file():
        raise CrlftError(f"{questions_file} does not exist: pass --bench-dir, a folder laid out like FastChat's "
                         "llm_judge/data (mt_bench/question.jsonl, vicuna_bench/question.jsonl, judge_prompts.jsonl)")
    references: dict[int, tuple[str, ...]] = {}
    reference_file = folder / "reference_answer_gpt-4.jsonl"
    if reference_file.is_file():
        for record in _read_jsonl(reference_file):
            references[int(record["question_id"])] = tuple(record["choices"][0]["turns"])
    questions = []
    for number, record in enumerate(_read_jsonl(questions_file), start=1):
        turns = record.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise CrlftError(f"{questions_file}:{number}: 'turns' must be a non-empty list of strings")
        question_id = int(record["question_id"])
        questions.append(BenchQuestion(question_id, str(record.get("category", "generic")), tuple(turns),
                                       references.get(question_id, ())))  # fmt: skip
    return questions[:limit] if limit else questions


def generate_bench_answers(exported: ExportedModel, questions: Sequence[BenchQuestion], model_id: str,
                           condition: str | None = None, max_new_tokens: int = 256,
                           batch_size: int = 8, decoder: Decoder | None = None) -> list[BenchAnswer]:
    """Answer every question turn by turn (turn k sees the model's own earlier answers), batched per turn, by
    `decoder` (see `generate`)."""
    condition = condition or exported.meta.inference_condition
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max((len(q.turns) for q in questions), default=0)):
        active = [i for i, q in enumerate(questions) if turn < len(q.turns)]
        prompts = []
        for i in active:
            history: list[Message] = []
            for k in range(turn):
                history += [Message("user", questions[i].turns[k]), Message("assistant", answers[i][k] or " ")]
            history.append(Message("user", questions[i].turns[turn]))
            prompts.append(chat_prompt(exported, history, condition))
        for i, text in zip(active, generate(exported, prompts, max_new_tokens, batch_size, decoder), strict=True):
            answers[i].append(text)
    return [BenchAnswer(q.question_id, model_id, tuple(a), condition) for q, a in zip(questions, answers, strict=True)]


def _judge_prompt_for(question: BenchQuestion, turn: int, prompts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    with_reference = question.category in NEED_REFERENCE and len(question.reference) > turn
    name = ("single-math-v1" if with_reference else "single-v1") + ("-multi-turn" if turn > 0 else "")
    if name not in prompts:
        raise CrlftError(f"the judge prompts have no {name!r}: use FastChat's {JUDGE_PROMPTS_FILE}")
    return prompts[name]


def grade(questions: Sequence[BenchQuestion], answers: Sequence[BenchAnswer], judge: JudgeFn,
          prompts: dict[str, dict[str, Any]]) -> list[Judgment]:
    """FastChat single-answer grading: every turn of every answer rated 1-10; turn 2 is judged with the whole
    conversation in view (the multi-turn prompts), math/reasoning/coding against the reference answer."""
    judgments = []
    for question, answer in zip(questions, answers, strict=True):
        for turn in range(len(answer.turns)):
            prompt = _judge_prompt_for(question, turn, prompts)
            fields = {"question": question.turns[0], "answer": answer.turns[0],
                      "ref_answer_1": question.reference[0] if question.reference else ""}  # fmt: skip
            for k in range(len(question.turns)):
                fields[f"question_{k + 1}"] = question.turns[k]
                fields[f"answer_{k + 1}"] = answer.turns[k] if k < len(answer.turns) else ""
                fields[f"ref_answer_{k + 1}"] = question.reference[k] if k < len(question.reference) else ""
            reply = judge(prompt["system_prompt"], prompt["prompt_template"].format(**fields))
            judgments.append(Judgment(question.question_id, turn + 1, prompt["name"], parse_rating(reply), reply))
    return judgments


def bench_metrics(bench: str, judgments: Sequence[Judgment]) -> dict[str, float]:
    """<bench>_score (mean rating over every rated turn), per turn for MT-bench, and how many replies had no rating."""
    rated = [j for j in judgments if j.score >= 0]
    metrics = {f"{bench}_unrated": float(len(judgments) - len(rated))}
    if rated:
        metrics[f"{bench}_score"] = float(np.mean([j.score for j in rated]))
    for turn in sorted({j.turn for j in rated}):
        if bench == "mt_bench":
            metrics[f"{bench}_turn{turn}"] = float(np.mean([j.score for j in rated if j.turn == turn]))
    return metrics
