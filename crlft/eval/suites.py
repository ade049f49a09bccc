"""Verifiable suites (prompt + expected answer, e.g. the synthetic eval.jsonl) under the model's conditions: greedy,
batched answers by a `Decoder` under each condition, exact-match accuracy (`crlft.eval.scoring.score`), and the
condition swap: the same prompts under every condition, side by side."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from crlft.config import suboptimal_of
from crlft.data.records import Message
from crlft.errors import CrlftError
from crlft.eval.answers import Decoder, chat_prompt, generate
from crlft.eval.scoring import EvalItem, score
from crlft.export import ExportedModel, ModelMeta

# ---------------------------------------------------------------------------------------------------------------------
# Conditions


def conditions_by_reward(meta: ModelMeta) -> list[str]:
    """The model's conditions, best first (the inference condition first among equals)."""
    return sorted(meta.conditions, key=lambda c: (-meta.conditions[c], c != meta.inference_condition, c))


def select_conditions(meta: ModelMeta, requested: Sequence[str] | None) -> list[str]:
    """The conditions to evaluate: the requested ones (validated) or all the model's, best first."""
    if not requested:
        return conditions_by_reward(meta)
    unknown = [c for c in requested if c not in meta.conditions]
    if unknown:
        known = ", ".join(conditions_by_reward(meta))
        raise CrlftError(f"unknown condition(s) {', '.join(unknown)}: this model's conditions are {known}")
    return list(dict.fromkeys(requested))


# ---------------------------------------------------------------------------------------------------------------------
# Verifiable suites and the condition swap


@dataclass(frozen=True)
class ConditionResult:
    condition: str
    predictions: list[str]
    scores: dict[str, Any]  # crlft.eval.scoring.score: n, accuracy, suboptimal_rate, per_task


@dataclass(frozen=True)
class SuiteEvaluation:
    items: list[EvalItem]
    results: dict[str, ConditionResult]  # condition -> result, in evaluation order
    expert: str
    suboptimal: str | None
    condition_in_prompt: bool  # False for `weighted` / `sft` models: every condition gives the same prompt
    mode: str


def evaluate_suite(exported: ExportedModel, items: Sequence[EvalItem], conditions: Sequence[str] | None = None,
                   batch_size: int = 16, max_new_tokens: int = 16, decoder: Decoder | None = None) -> SuiteEvaluation:
    """Answer every item under every condition (greedy, by `decoder`: see `generate`) and score exact match per
    condition."""
    meta = exported.meta
    selected = select_conditions(meta, conditions)
    with_condition = meta.template.with_condition
    results: dict[str, ConditionResult] = {}
    shared: list[str] | None = None  # without a condition in the prompt one generation serves every condition
    for condition in selected:
        if with_condition or shared is None:
            prompts = [chat_prompt(exported, [Message("user", item.prompt)], condition) for item in items]
            predictions = generate(exported, prompts, max_new_tokens, batch_size, decoder)
            shared = predictions
        else:
            predictions = shared
        results[condition] = ConditionResult(condition, predictions, score(predictions, items))
    suboptimal = suboptimal_of(meta.conditions, meta.inference_condition)
    return SuiteEvaluation(list(items), results, meta.inference_condition, suboptimal, with_condition, meta.mode)


def suite_metrics(evaluation: SuiteEvaluation) -> dict[str, float]:
    """Flat metrics: accuracy_<C>, suboptimal_rate_<C>, per task `<task>/accuracy_<C>`; accuracy_expert (the
    inference condition), accuracy_suboptimal (the lowest-reward one) and condition_gap when both were evaluated."""
    metrics: dict[str, float] = {}
    for condition, result in evaluation.results.items():
        metrics[f"accuracy_{condition}"] = float(result.scores["accuracy"])
        metrics[f"suboptimal_rate_{condition}"] = float(result.scores["suboptimal_rate"])
        for task, rates in result.scores["per_task"].items():
            metrics[f"{task}/accuracy_{condition}"] = float(rates["accuracy"])
    if evaluation.expert in evaluation.results:
        metrics["accuracy_expert"] = metrics[f"accuracy_{evaluation.expert}"]
    if evaluation.suboptimal in evaluation.results:
        metrics["accuracy_suboptimal"] = metrics[f"accuracy_{evaluation.suboptimal}"]
    if "accuracy_expert" in metrics and "accuracy_suboptimal" in metrics:
        metrics["condition_gap"] = metrics["accuracy_expert"] - metrics["accuracy_suboptimal"]
    return metrics


def swap_table(evaluation: SuiteEvaluation) -> str:
    """The condition swap as a text table: one row per condition, overall and per-task accuracy."""
    tasks = sorted(next(iter(evaluation.results.values())).scores["per_task"]) if evaluation.results else []
    header = ["condition", "accuracy", "suboptimal answers", *tasks]
    rows = []
    for condition, result in evaluation.results.items():
        role = " (expert)" if condition == evaluation.expert else " (sub-optimal)" if (
            condition == evaluation.suboptimal) else ""  # fmt: skip
        per_task = result.scores["per_task"]
        rows.append([condition + role, f"{result.scores['accuracy']:.3f}", f"{result.scores['suboptimal_rate']:.3f}",
                     *(f"{per_task[t]['accuracy']:.3f}" for t in tasks)])  # fmt: skip
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n = len(evaluation.items)
    lines.insert(0, f"condition swap: {n} prompts, greedy, exact match")
    if not evaluation.condition_in_prompt:
        lines.append(f"note: mode {evaluation.mode!r} puts no condition in the prompt, so every condition gives the "
                     "same prompt and the same answers; the swap has no effect on this model")  # fmt: skip
    return "\n".join(lines)


def swap_rows(evaluation: SuiteEvaluation) -> list[dict[str, Any]]:
    """Per prompt: the expected answers and each condition's prediction (the table logged to MLflow)."""
    rows = []
    for i, item in enumerate(evaluation.items):
        row: dict[str, Any] = {"id": item.id, "task": item.task, "prompt": item.prompt, "answer": item.answer,
                               "suboptimal_answer": item.suboptimal_answer or ""}  # fmt: skip
        for condition, result in evaluation.results.items():
            row[f"prediction_{condition}"] = result.predictions[i]
        rows.append(row)
    return rows
