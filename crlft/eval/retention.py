"""Retention: how much of what its base model knew a fine-tune kept.

    retention = candidate's general accuracy / base model's general accuracy        (crlft/assets/general/check.jsonl)
    agreement = mean ROUGE-L F1 of the candidate's answers against the base model's  (open prompts: Vicuna, MT-bench)
    judged_not_worse = share of the open prompts where a judge finds the candidate's answer at least as good as the
                       base model's (only with a judge: `crlft eval --judge-url`)

Rules, and why:
- **Each model is asked as it is served.** A crlft model through its conditioned template under its inference
  condition (what `crlft serve` does); the base model through its own chat template, as its authors ship it
  (crlft.model.own_prompt; `crlft init-model` keeps an imported model's template as the named template `source`).
  Asked through crlft's template, which it has never seen, the base answers nothing to about a quarter of the check:
  a reference that low would let a fine-tune "retain" more than the base knew.
- **Retention gates, agreement informs.** The check is scored right or wrong, so the ratio means "kept this share of
  the right answers". Greedy continuations of two different models part after their first different token, so
  agreement is below 1 for any change of weights: it shows drift (and what replay buys), not a pass mark.
- **ROUGE-L** (the longest common word subsequence, as F1) compares answers in order without a model: it rewards
  the same content in the same order and ignores small rewordings. It cannot tell a better answer from a worse one:
  a judge can. Given one, each open prompt's two answers are compared with FastChat's pairwise prompt (`pair-v2`,
  MT-bench's judge), asked in both orders because judges favour a position (Zheng et al. 2023, "Judging LLM-as-a-Judge
  with MT-Bench and Chatbot Arena"); a verdict that changes with the order is a tie, as FastChat counts it.
- **The base is measured once** per base model, check, prompts and decoder (`base_cache_key`), kept in the state
  folder: every candidate of that base is compared with the same figures.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from crlft.data.records import Message
from crlft.errors import CrlftError
from crlft.eval.answers import Decoder, chat_prompt, generate
from crlft.eval.general_check import CheckItem, check_scores, normalize
from crlft.eval.judge import JudgeFn
from crlft.eval.mt_bench import BENCH_DATA, load_bench
from crlft.export import META_FILE, ExportedModel
from crlft.model import own_prompt
from crlft.storage import write_whole

CHECK_MAX_NEW_TOKENS = 48
OPEN_MAX_NEW_TOKENS = 128
OPEN_BENCHES = ("vicuna", "mt_bench")


@dataclass(frozen=True)
class GeneralAnswers:
    """A model's answers to the general check and the open prompts, and the check's scores."""

    scores: dict[str, float]  # crlft.eval.general_check.check_scores
    check_answers: list[str]
    open_answers: list[str]

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def open_prompts(limit: int | None = None) -> list[str]:
    """The first turns of the shipped Vicuna-bench and MT-bench questions (158 different ones), the first `limit` (0:
    none, so no agreement; None: all)."""
    prompts = list(dict.fromkeys(q.turns[0] for bench in OPEN_BENCHES for q in load_bench(bench, BENCH_DATA)))
    return prompts if limit is None else prompts[:limit]


def prompt_as_served(exported: ExportedModel, question: str) -> list[int]:
    """The token ids a user's single question becomes: a crlft model's template under its inference condition, any
    other model's own chat template (crlft's where it has none)."""
    if not (exported.path / META_FILE).is_file():
        own = own_prompt(exported.tokenizer, question)
        if own is not None:
            return own
    return chat_prompt(exported, [Message("user", question)], exported.meta.inference_condition)


def answer_general(exported: ExportedModel, items: Sequence[CheckItem], prompts: Sequence[str],
                   decoder: Decoder | None = None, batch_size: int = 32) -> GeneralAnswers:
    """Greedy answers to the check and the open prompts, each asked as the model is served."""
    check = generate(exported, [prompt_as_served(exported, item.prompt) for item in items], CHECK_MAX_NEW_TOKENS,
                     batch_size, decoder)  # fmt: skip
    open_answers = generate(exported, [prompt_as_served(exported, p) for p in prompts], OPEN_MAX_NEW_TOKENS,
                            batch_size, decoder) if prompts else []  # fmt: skip
    return GeneralAnswers(check_scores(items, check), check, open_answers)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over normalised words (crlft.eval.general_check.normalize: lower case, no punctuation): 2PR / (P + R)
    of the longest common subsequence; 1.0 for two empty texts."""
    a, b = normalize(candidate).split(), normalize(reference).split()
    if not a or not b:
        return float(a == b)
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    lcs = row[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))


def retention_metrics(candidate: GeneralAnswers, base: GeneralAnswers) -> dict[str, float]:
    """retention, agreement, both models' general accuracy and the per-kind accuracies of the candidate."""
    base_accuracy = base.scores["general_accuracy"]
    if base_accuracy <= 0:
        raise CrlftError("the base model answers none of the general check right: retention is undefined for it")
    figures = {f"base_{k}": v for k, v in base.scores.items() if k.startswith("general_accuracy")}
    figures |= {k: v for k, v in candidate.scores.items() if k.startswith("general_accuracy")}
    figures["retention"] = candidate.scores["general_accuracy"] / base_accuracy
    pairs = list(zip(candidate.open_answers, base.open_answers, strict=True))
    if pairs:
        figures["agreement"] = sum(rouge_l(c, b) for c, b in pairs) / len(pairs)
    return figures


PAIR_PROMPT = "pair-v2"  # FastChat's pairwise judge prompt for a single question
_VERDICT = re.compile(r"\[\[(A|B|C)\]\]")


def judged_comparison(prompts: Sequence[str], candidate: Sequence[str], base: Sequence[str], judge: JudgeFn,
                      judge_prompts: dict[str, dict[str, object]]) -> tuple[dict[str, float], list[dict[str, str]]]:
    """judged_not_worse (and the wins and losses behind it) over the open prompts, and each prompt's verdicts: the
    candidate is assistant A in the first question and B in the second; agreeing verdicts name the winner, any other
    pair is a tie (a reply without a verdict counts as a tie)."""
    if PAIR_PROMPT not in judge_prompts:
        raise CrlftError(f"the judge prompts have no {PAIR_PROMPT!r}: use FastChat's judge_prompts.jsonl")
    prompt = judge_prompts[PAIR_PROMPT]
    outcomes, records = [], []
    for question, mine, theirs in zip(prompts, candidate, base, strict=True):
        verdicts = [_verdict(judge(str(prompt["system_prompt"]), str(prompt["prompt_template"]).format(
            question=question, answer_a=a, answer_b=b))) for a, b in ((mine, theirs), (theirs, mine))]
        outcome = {("A", "B"): "candidate", ("B", "A"): "base"}.get((verdicts[0], verdicts[1]), "tie")
        outcomes.append(outcome)
        records.append({"prompt": question, "candidate_first": verdicts[0], "base_first": verdicts[1],
                        "outcome": outcome})
    n = len(outcomes) or 1
    figures = {"judged_not_worse": sum(o != "base" for o in outcomes) / n,
               "judged_wins": sum(o == "candidate" for o in outcomes) / n,
               "judged_losses": sum(o == "base" for o in outcomes) / n}
    return figures, records


def _verdict(reply: str) -> str:
    """The judge's last [[A]] / [[B]] / [[C]]; C (a tie) when it gave none."""
    found = _VERDICT.findall(reply)
    return found[-1] if found else "C"


def base_cache_key(base_revision: str, items: Sequence[CheckItem], prompts: Sequence[str], decoder: str) -> str:
    """What the base's answers depend on: its files (`base_revision`), the check, the open prompts, the decoder."""
    check = [[item.id, item.kind, item.prompt, list(item.accept), dict(item.check or {})] for item in items]
    parts = [base_revision, check, list(prompts), decoder, CHECK_MAX_NEW_TOKENS, OPEN_MAX_NEW_TOKENS]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_cached(path: Path) -> GeneralAnswers | None:
    """The base's answers saved by `write_cached`; None when there are none (or they are unreadable: measured again)."""
    try:
        data = json.loads(path.read_text())
        return GeneralAnswers({k: float(v) for k, v in data["scores"].items()}, list(data["check_answers"]),
                              list(data["open_answers"]))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cached(path: Path, answers: GeneralAnswers) -> None:
    write_whole(path, json.dumps(answers.to_json(), indent=1))
