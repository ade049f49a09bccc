"""The synthetic mixed-quality suite: the project's proof that C-RLFT works, small enough for a CPU in minutes.

What it must show (the paper's claim, at laptop scale): a tiny model trained with C-RLFT on a few expert conversations
(class GPT4) and four times as many sub-optimal ones (class GPT3) answers held-out questions correctly far more often
than plain SFT on the same mixture, and prompting it with the GPT3 condition brings the GPT3 behaviour back.

Design choices, and why:

- **Exact-match answers over a closed vocabulary.** Every answer is one word (one BPE token once a tokenizer is trained
  on the suite) from a list of a few dozen, so correctness is a string comparison (`crlft.eval.scoring.is_correct`)
  and a 1-3M parameter model has a chance. No digits: byte-level BPE splits numbers unpredictably; the sequence task
  uses number words.
- **Few facts, many phrasings.** Each task is a fixed rule over a small set of facts: 6 antonym pairs (asked both
  ways), 6 irregular verbs, what comes after a weekday or a number from one to ten, the category of 18 nouns, the
  colour of 8 things: 59 facts. Every question is (phrasing template x entity); the held-out eval questions are
  *unseen combinations* of phrasings and entities that all occur in training (at most half of an entity's phrasings are
  held out, the rest are trained on). A tiny model generalises across phrasings of a fact it has seen; it cannot
  invent facts it never saw.
- **Sized for minutes on a CPU, measured.** What limits a tiny model is how often it sees each fact answered by the
  expert. A first version (127 facts, 300 expert and 3000 sub-optimal conversations, 75% of GPT3 wrong) needed ~1000
  steps of 64 conversations (14 min on 2 cores) for 0.68 expert accuracy and was at 0.29 after 600 steps of 32. With
  59 facts, 600 expert and 2400 sub-optimal conversations and 90% of GPT3 wrong, a 0.93M-parameter Llama (batch 32,
  lr 3e-3, cosine) reaches 0.75-0.83 under GPT4 and 0.15-0.18 under GPT3 after 1000 steps (~90 s on one core),
  seeds 0 and 1. The sub-optimal class is still the large majority (4:1; the paper's mixture is ~13:1).
- **Why lookups and not selection rules.** C-RLFT supervises only the answer tokens (one or two a conversation). With
  that signal a 1.2M Llama learned small lookups within ~1000 steps, but not tasks that pick a word out of the prompt
  ("which of these is a fruit: dog, pear, car", "the first word of: ...", "which comes first alphabetically"): those
  stayed near chance after 1500 steps, so they were left out.
- **Systematic, class-specific errors.** GPT3 answers `wrong_rate` (default 90%) of its questions with the *same kind*
  of wrong answer for a task, always different from the right one, so the wrong answer is itself an easy rule:
    opposite    -> repeats the word itself                         (copying)
    past_tense  -> over-regularises: "go" -> "goed"                (a wrong rule applied everywhere)
    sequence    -> gives the one before instead of the one after   (direction error)
    category    -> names the partner category: animal <-> fruit,   (a fixed confusion)
                   vehicle <-> furniture, tool <-> instrument
    colour      -> always "blue"; nothing asked about is blue      (mode collapse to one answer)
  With 600 expert and 2400 sub-optimal conversations, the right answer is in 600 + 2400 * 0.1 = 840 replies and the
  systematic wrong one in 2160: the majority of the mixture is wrong for every question, so SFT learns the error.
  A model conditioned on GPT4 (which is never wrong) can pick the right answers out. The reward-weighted mixture
  (1.0 vs 0.1) favours the right answer too (600 + 24 against 216), which is why the `weighted` ablation should also
  beat SFT. Errors that copy from the prompt (opposite) are the strongest attractor and the slowest to unlearn.
- **Held-out conversations** (`heldout`) ask the eval questions, half answered as GPT4, half as GPT3, for validation
  loss and the representation check (expert and sub-optimal conversations should separate under C-RLFT).
- **Deterministic in the seed.** The eval set depends only on `seed` and `n_eval`, not on the training sizes, so runs
  with different data sizes are scored on the same questions. Mostly single-turn; a few conversations have two turns
  (same task, same class) and some a system prompt, to exercise the template.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crlft.errors import CrlftError
from crlft.eval.scoring import EvalItem
from crlft.storage import write_jsonl
from crlft.synth.tasks import TASKS, Question

EXPERT = "GPT4"
SUBOPTIMAL = "GPT3"
DEFAULT_N_EXPERT = 600
DEFAULT_RATIO = 4.0
DEFAULT_WRONG_RATE = 0.9
DEFAULT_N_EVAL = 60

TWO_TURN_RATE = 0.05
SYSTEM_PROMPT_RATE = 0.10
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "Answer with a single word.",
    "You are a concise assistant. Reply briefly.",
)


@dataclass(frozen=True)
class Turn:
    question: Question
    reply: str


@dataclass(frozen=True)
class SynthConversation:
    condition: str
    task: str
    turns: tuple[Turn, ...]
    system: str | None = None

    def to_record(self) -> dict[str, Any]:
        """The OpenChat-style record written to train.jsonl / heldout.jsonl."""
        items: list[dict[str, str]] = []
        for turn in self.turns:
            items.append({"role": "user", "content": turn.question.prompt})
            items.append({"role": "assistant", "content": turn.reply})
        record: dict[str, Any] = {"items": items, "condition": self.condition, "task": self.task}
        if self.system is not None:
            record["system"] = self.system
        return record


@dataclass(frozen=True)
class SynthSuite:
    train: list[SynthConversation]
    heldout: list[SynthConversation]
    eval: list[EvalItem]


# ---------------------------------------------------------------------------------------------------------------------
# Generation


def _split_heldout(
    pool: list[Question], quota: int, rng: random.Random, task: str
) -> tuple[list[Question], list[Question]]:
    """Hold out `quota` questions, at most half of each subject's phrasings, so every held-out question's subject is
    still trained on in other phrasings. Subjects are spread: the k-th phrasing of a subject is held out only once
    every subject that can has k-1. Returns (held_out, train_pool)."""
    phrasings = Counter(q.subject for q in pool)
    order = list(range(len(pool)))
    rng.shuffle(order)
    taken: Counter[str] = Counter()
    held_out_ids: dict[int, None] = {}  # insertion-ordered set
    for round_limit in range(1, max(phrasings.values()) // 2 + 1):
        for i in order:
            subject = pool[i].subject
            limit = min(round_limit, phrasings[subject] // 2)
            if len(held_out_ids) < quota and i not in held_out_ids and taken[subject] < limit:
                taken[subject] += 1
                held_out_ids[i] = None
    if len(held_out_ids) < quota:
        raise CrlftError(
            f"task {task!r} can hold out at most {len(held_out_ids)} eval questions (half of each subject's "
            f"phrasings), but n_eval asks for {quota} of this task; lower n_eval"
        )
    held_out = [pool[i] for i in held_out_ids]
    held_out_prompts = {q.prompt for q in held_out}
    return held_out, [q for q in pool if q.prompt not in held_out_prompts]


def _reply(question: Question, condition: str, wrong_rate: float, rng: random.Random) -> str:
    if condition == SUBOPTIMAL and rng.random() < wrong_rate:
        return question.suboptimal_answer
    return question.answer


def _conversations(
    n: int, condition: str, pools: dict[str, list[Question]], wrong_rate: float, rng: random.Random
) -> Iterator[SynthConversation]:
    tasks = sorted(pools)
    for i in range(n):
        task = tasks[i % len(tasks)]  # balanced over tasks; the caller shuffles
        n_turns = 2 if rng.random() < TWO_TURN_RATE else 1
        questions = [rng.choice(pools[task]) for _ in range(n_turns)]
        system = rng.choice(SYSTEM_PROMPTS) if rng.random() < SYSTEM_PROMPT_RATE else None
        turns = tuple(Turn(q, _reply(q, condition, wrong_rate, rng)) for q in questions)
        yield SynthConversation(condition=condition, task=task, turns=turns, system=system)


def _check_sizes(n_expert: int, ratio: float, n_eval: int, wrong_rate: float, n_heldout: int) -> None:
    problems = []
    if n_expert < 0:
        problems.append(f"n_expert must be >= 0, got {n_expert}")
    if not (ratio >= 0 and math.isfinite(ratio)):
        problems.append(f"ratio must be a finite number >= 0, got {ratio}")
    if n_eval < 0:
        problems.append(f"n_eval must be >= 0, got {n_eval}")
    if not 0.0 <= wrong_rate <= 1.0:
        problems.append(f"wrong_rate must be within [0, 1], got {wrong_rate}")
    if n_heldout < 0:
        problems.append(f"n_heldout must be >= 0, got {n_heldout}")
    if n_heldout > 0 and n_eval == 0:
        problems.append("held-out conversations ask the eval questions: n_heldout > 0 needs n_eval > 0")
    if problems:
        raise CrlftError("synthetic suite: " + "; ".join(problems))


def generate_suite(
    seed: int = 0,
    n_expert: int = DEFAULT_N_EXPERT,
    ratio: float = DEFAULT_RATIO,
    n_eval: int = DEFAULT_N_EVAL,
    wrong_rate: float = DEFAULT_WRONG_RATE,
    n_heldout: int = 200,
) -> SynthSuite:
    """The suite for `seed`: `n_expert` GPT4 and round(n_expert * ratio) GPT3 training conversations (shuffled),
    `n_eval` held-out eval questions spread evenly over the tasks, and `n_heldout` held-out conversations (half GPT4,
    half GPT3) asking the eval questions. GPT3 gives its task's systematic wrong answer to a `wrong_rate` fraction of
    its questions and the right answer otherwise; GPT4 is always right."""
    _check_sizes(n_expert, ratio, n_eval, wrong_rate, n_heldout)
    tasks = list(TASKS)
    quotas = {task: n_eval // len(tasks) + (1 if i < n_eval % len(tasks) else 0) for i, task in enumerate(tasks)}
    held_out: dict[str, list[Question]] = {}
    train_pools: dict[str, list[Question]] = {}
    for task, build_pool in TASKS.items():
        pool = build_pool()
        held_out[task], train_pools[task] = _split_heldout(
            pool, quotas[task], random.Random(f"{seed}:split:{task}"), task
        )

    eval_items = [
        EvalItem(f"{task}-{i:04d}", q.prompt, q.answer, q.suboptimal_answer, task)
        for task in tasks
        for i, q in enumerate(held_out[task])
    ]

    train_rng = random.Random(f"{seed}:train")
    n_suboptimal = round(n_expert * ratio)
    train = [
        *_conversations(n_expert, EXPERT, train_pools, wrong_rate, train_rng),
        *_conversations(n_suboptimal, SUBOPTIMAL, train_pools, wrong_rate, train_rng),
    ]
    train_rng.shuffle(train)

    heldout_rng = random.Random(f"{seed}:heldout")
    heldout_pools = {task: questions for task, questions in held_out.items() if questions}
    heldout: list[SynthConversation] = []
    if n_heldout:
        heldout = [
            *_conversations(n_heldout - n_heldout // 2, EXPERT, heldout_pools, wrong_rate, heldout_rng),
            *_conversations(n_heldout // 2, SUBOPTIMAL, heldout_pools, wrong_rate, heldout_rng),
        ]
    return SynthSuite(train=train, heldout=heldout, eval=eval_items)


def write_suite(out_dir: str | Path, **kwargs: Any) -> dict[str, Path]:
    """Write train.jsonl, heldout.jsonl and eval.jsonl under `out_dir` (created); kwargs are generate_suite's."""
    suite = generate_suite(**kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "train": write_jsonl(out / "train.jsonl", [c.to_record() for c in suite.train]),
        "heldout": write_jsonl(out / "heldout.jsonl", [c.to_record() for c in suite.heldout]),
        "eval": write_jsonl(out / "eval.jsonl", [item.to_record() for item in suite.eval]),
    }
