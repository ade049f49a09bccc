"""Evaluation of an exported model, without Ray: what shows that C-RLFT worked (the paper's evidence, section 5).

- Verifiable suites (prompt + expected answer, e.g. the synthetic eval.jsonl): greedy, batched generation under each
  condition by a serving engine (a `Decoder`), exact-match accuracy (`crlft.synth.score`), and the condition swap:
  the same prompts under every condition, side by side.
- Representation: mean-pooled last hidden states of held-out expert and sub-optimal conversations, their silhouette
  score, and a 2-D projection (UMAP, as in the paper, when installed; PCA otherwise) saved as PNG.
- Open-ended benchmarks: MT-bench (two turns) and Vicuna-bench answers, graded 1-10 by a judge behind any
  OpenAI-compatible endpoint with FastChat's single-answer judge prompts.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crlft.config import suboptimal_of
from crlft.conversation import ClassRules, Conversation, Message
from crlft.dataset import iter_file
from crlft.errors import CrlftError
from crlft.export import ExportedModel, ModelMeta
from crlft.general import jsonl_records
from crlft.inference.generate import BatchGenerator, GenerationRequest
from crlft.inference.sampling import SamplingParams, answer_text
from crlft.synth import EvalItem, score

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
# Generation


Decoder = Callable[[Sequence[list[int]], int], list[str]]
"""Greedy answers of token-id prompts (that fit the context with `max_new_tokens` more): (prompts, max_new_tokens) ->
each answer cut at the first stop token, decoded and stripped. Evaluation decodes with the engine `crlft serve`
serves with (`batch_decoder` here, vLLM in crlft/inference/vllm_decoder.py): the accuracy that gates promotion is
what users get."""


def _fit(ids: list[int], keep: int, bos: list[int]) -> list[int]:
    """The prompt cut from the left to `keep` tokens (keeping BOS): the newest turns matter most."""
    if len(ids) <= keep:
        return ids
    return bos + ids[len(ids) - (keep - len(bos)):]


def batch_decoder(exported: ExportedModel, batch_size: int = 16) -> Decoder:
    """crlft's continuous-batching engine, as the `transformers` serving engine runs it (the same stop tokens and
    context), greedy, `batch_size` sequences at a time: the model's own device and number type."""
    stops = exported.stop_ids
    engine = BatchGenerator(exported.model, exported.tokenizer, stops, max_batch_size=batch_size,
                            context_len=exported.folder.context_limit)  # fmt: skip

    def decode(prompts: Sequence[list[int]], max_new_tokens: int) -> list[str]:
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        completions = engine.generate([GenerationRequest(prompt, params) for prompt in prompts])
        return [answer_text(exported.tokenizer, c.token_ids, stops) for c in completions]

    return decode


def generate(exported: ExportedModel, prompts: Sequence[list[int]], max_new_tokens: int = 16, batch_size: int = 16,
             decoder: Decoder | None = None) -> list[str]:
    """Greedy answers of token-id prompts by `decoder` (default: `batch_decoder` with `batch_size`), each cut at the
    first stop token and stripped. A prompt too long for the context loses its oldest tokens, and answers get at most
    half the context."""
    limit = exported.folder.context_limit
    fitted, max_new_tokens = fit_prompts(prompts, max_new_tokens, limit, exported.template_tokenizer.bos_ids)
    return (decoder or batch_decoder(exported, batch_size))(fitted, max_new_tokens)


def fit_prompts(prompts: Sequence[list[int]], max_new_tokens: int, limit: int | None,
                bos: list[int]) -> tuple[list[list[int]], int]:
    """The prompts and answer length decoders get (`generate`; jobs/replay.py for vLLM under Ray Data): answers get at
    most half the context `limit`, and a prompt too long for the rest loses its oldest tokens (keeping BOS)."""
    fitted = [list(p) for p in prompts]
    if limit is None:
        return fitted, max_new_tokens
    max_new_tokens = max(1, min(max_new_tokens, limit // 2))
    return [_fit(p, limit - max_new_tokens, bos) for p in fitted], max_new_tokens


def chat_prompt(exported: ExportedModel, messages: Sequence[Message], condition: str, system: str = "") -> list[int]:
    return exported.template_tokenizer.tokenize_prompt(messages, condition=condition, system=system)


# ---------------------------------------------------------------------------------------------------------------------
# Verifiable suites and the condition swap


@dataclass(frozen=True)
class ConditionResult:
    condition: str
    predictions: list[str]
    scores: dict[str, Any]  # crlft.synth.score: n, accuracy, suboptimal_rate, per_task


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


# ---------------------------------------------------------------------------------------------------------------------
# Representation check


def load_heldout(path: str | Path, meta: ModelMeta) -> list[Conversation]:
    """Held-out conversations, each naming one of the model's conditions; any bad line is a CrlftError."""
    rules = ClassRules(classes=tuple(meta.conditions), default_class=None)
    conversations: list[Conversation] = []
    problems: list[str] = []
    for parsed in iter_file(path, rules):
        if isinstance(parsed, Conversation):
            conversations.append(parsed)
        else:
            problems.append(str(parsed))
    if problems:
        shown = "; ".join(problems[:3]) + (f"; ... and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise CrlftError(f"{len(problems)} bad held-out conversation(s): {shown}")
    if not conversations:
        raise CrlftError(f"{path}: no held-out conversations")
    return conversations


def balanced_sample(conversations: Sequence[Conversation], max_per_class: int) -> list[Conversation]:
    """At most `max_per_class` conversations of each condition, in file order (deterministic)."""
    taken: dict[str, int] = {}
    out = []
    for conv in conversations:
        if taken.get(conv.condition, 0) < max_per_class:
            taken[conv.condition] = taken.get(conv.condition, 0) + 1
            out.append(conv)
    return out


@torch.no_grad()
def embed_conversations(exported: ExportedModel, conversations: Sequence[Conversation],
                        batch_size: int = 16) -> np.ndarray:
    """Mean-pooled last-layer hidden states of each conversation rendered with the model's template (its own
    condition in the prompt, where the template has one): shape (n, hidden)."""
    model = exported.model
    model.eval()
    limit = exported.folder.context_limit
    ids = [exported.template_tokenizer.tokenize_conversation(c, {}, max_len=limit).input_ids for c in conversations]
    pad_id = exported.tokenizer.pad_token_id or 0
    device = next(model.parameters()).device
    pooled = []
    for start in range(0, len(ids), batch_size):
        batch = ids[start:start + batch_size]
        width = max(len(x) for x in batch)
        input_ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in batch], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch], device=device)
        hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled.append(((hidden * weights).sum(1) / weights.sum(1)).float().cpu().numpy())
    return np.concatenate(pooled)


def project_2d(embeddings: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D projection: UMAP (the paper's choice) when `umap-learn` is installed, PCA otherwise."""
    try:
        import umap  # type: ignore[import-not-found]
    except ImportError:
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(embeddings), "PCA"
    reducer = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, len(embeddings) - 1))
    return reducer.fit_transform(embeddings), "UMAP"


def silhouette(embeddings: np.ndarray, labels: Sequence[str]) -> float | None:
    """How well the conditions separate (-1..1; above 0 means clusters); None when it is undefined."""
    from sklearn.metrics import silhouette_score

    n_labels = len(set(labels))
    if n_labels < 2 or len(labels) <= n_labels:
        return None
    return float(silhouette_score(embeddings, list(labels)))


def plot_projection(points: np.ndarray, labels: Sequence[str], out_png: Path, title: str) -> Path:
    """Scatter plot of the projection, one colour per condition (Agg canvas: no display, no global pyplot state)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 5))
    axes = figure.subplots()
    for condition in sorted(set(labels)):
        mask = np.array([label == condition for label in labels])
        axes.scatter(points[mask, 0], points[mask, 1], s=12, alpha=0.7, label=condition)
    axes.set_title(title)
    axes.legend(title="condition")
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=110)
    return out_png


@dataclass(frozen=True)
class RepresentationResult:
    silhouette: float | None
    method: str
    counts: dict[str, int]
    plot: Path


def representation_check(exported: ExportedModel, conversations: Sequence[Conversation], out_png: str | Path,
                         max_per_class: int = 200, batch_size: int = 16) -> RepresentationResult:
    """Embed up to `max_per_class` conversations per condition, score how the conditions separate, plot them."""
    sample = balanced_sample(conversations, max_per_class)
    labels = [c.condition for c in sample]
    embeddings = embed_conversations(exported, sample, batch_size)
    value = silhouette(embeddings, labels)
    points, method = projection_for_plot(embeddings)
    shown = "undefined" if value is None else f"{value:.3f}"
    title = f"{method} of last hidden states (mode {exported.meta.mode}); silhouette {shown}"
    counts = {c: labels.count(c) for c in sorted(set(labels))}
    return RepresentationResult(value, method, counts, plot_projection(points, labels, Path(out_png), title))


def projection_for_plot(embeddings: np.ndarray) -> tuple[np.ndarray, str]:
    if len(embeddings) < 3:  # too few points for a projection: plot the first two dimensions
        return embeddings[:, :2], "raw"
    return project_2d(embeddings)


# ---------------------------------------------------------------------------------------------------------------------
# Open-ended benchmarks: MT-bench and Vicuna-bench, graded by a judge

BENCHES = ("mt_bench", "vicuna")
# FastChat's llm_judge data (questions, GPT-4 references, judge prompts) shipped in the package (see its SOURCE.md)
BENCH_DATA = Path(__file__).resolve().parent / "assets" / "fastchat"
BENCH_FOLDERS = {"mt_bench": "mt_bench", "vicuna": "vicuna_bench"}
NEED_REFERENCE = {"math", "reasoning", "coding"}  # FastChat's categories graded against a reference answer
JUDGE_PROMPTS_FILE = "judge_prompts.jsonl"
_RATING = (re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]"))


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


def load_judge_prompts(path: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise CrlftError(f"judge prompts {path} do not exist: pass --bench-dir with FastChat's {JUDGE_PROMPTS_FILE}")
    return {str(record["name"]): record for record in _read_jsonl(path)}


JudgeFn = Callable[[str, str], str]  # (system prompt, user prompt) -> the judge's reply


def openai_judge(url: str, model: str, api_key: str | None = None, timeout_s: float = 120.0,
                 retries: int = 2) -> JudgeFn:
    """A judge behind any OpenAI-compatible endpoint (`url` is the API base, e.g. http://host:8000/v1), through plain
    HTTP: no client library needed. Temperature 0, as FastChat grades."""
    endpoint = url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key or 'EMPTY'}"}

    def ask(system: str, user: str) -> str:
        body = json.dumps({"model": model, "temperature": 0, "max_tokens": 2048,
                           "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
        last_error: Exception | None = None
        for attempt in range(retries + 1):
            request = urllib.request.Request(endpoint, data=body.encode(), headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=timeout_s) as response:
                    return str(json.loads(response.read())["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as exc:
                if exc.code < 500 and exc.code != 429:
                    detail = exc.read().decode(errors="replace")[:200]
                    raise CrlftError(f"judge {endpoint} answered {exc.code}: {detail} (check --judge-model and the "
                                     "API key in CRLFT_JUDGE_API_KEY or OPENAI_API_KEY)") from None  # fmt: skip
                last_error = exc
            except (urllib.error.URLError, OSError, KeyError, IndexError, json.JSONDecodeError) as exc:
                last_error = exc
            time.sleep(min(2**attempt, 10))
        raise CrlftError(f"judge {endpoint} failed after {retries + 1} tries ({last_error}): check --judge-url")

    return ask


def parse_rating(text: str) -> float:
    """The judge's [[rating]] (FastChat's format, with its fallback to [rating]); -1 when there is none."""
    for pattern in _RATING:
        match = pattern.search(text)
        if match:
            return float(match.group(1))
    return -1.0


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
