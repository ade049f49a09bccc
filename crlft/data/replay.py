"""Replay without Ray: whether a build replays, which prompts the base model answers, and the conversations its
answers become (jobs/replay.py generates them, on Ray Data).

Replay is self-distillation: the base model's own greedy answers to general prompts, mixed into the training data, so
that a fine-tune on narrow data keeps what the model could do (replay against forgetting: Ibrahim et al. 2024,
arXiv 2403.08763). The base model is asked as its authors serve it (its own chat template, crlft.model.own_prompt;
crlft's where it has none): there it answers what it knows, while through crlft's template, which it has never seen,
it answers nothing to a third of the prompts. The fine-tune learns those answers under the replay class, so the
served model keeps the base model's behaviour, and retention (crlft/eval/retention.py) measures against the same
answers. The fine-tune is also held to the base model's whole distribution over each replay answer's tokens, not only
to its greedy choice (`teacher_fields` places the answer in the base model's own prompt; crlft.train.distill adds the
KL term): cross-entropy on the greedy answers alone kept less (RESULTS.md).

An answer cut at the length limit would teach the model to end its turn mid-sentence: it is cut back to its last
whole sentence, or dropped when it has none.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from crlft.config import Config
from crlft.errors import CrlftError

if TYPE_CHECKING:  # transformers: not for every data worker that only reads
    from crlft.data.template import TemplateTokenizer

REPLAY_SOURCE = "replay"  # the `source` field of every replay conversation
_SENTENCE_END = re.compile(r"(?<=[^\d\s])[.!?:](?=\s)|\n")


def replay_model(cfg: Config, base_model: str) -> str | None:
    """The model that answers the replay prompts, `base_model`, or None where there is no replay: data.replay.enabled,
    or where unset, on for a pretrained base model and off for the embedded default (it knows nothing worth keeping)
    or a folder with a tokenizer alone. Asked for with a tokenizer alone, replay is an error: nothing can answer."""
    from crlft.model import is_pretrained  # torch and transformers: not for the data stage's every worker

    enabled = cfg.data.replay.enabled
    if enabled is None:
        return base_model if is_pretrained(base_model) else None
    folder = Path(base_model).expanduser()
    if enabled and folder.is_dir() and not (folder / "config.json").is_file():
        raise CrlftError(f"data.replay.enabled is true, but {base_model} holds no model (no config.json) to answer the "
                         "replay prompts: give the base model's folder (--tokenizer), or set data.replay.enabled=false")
    return base_model if enabled else None


@dataclass(frozen=True)
class ReplayPlan:
    """What a build replays: the model that answers, and the prompts it may be asked."""

    model: str
    prompts_file: Path
    prompts: list[str]


def plan_replay(cfg: Config, base_model: str) -> ReplayPlan | None:
    """The replay of a build on `base_model` (None where there is none), its prompts read and checked before any work
    (a bad prompts file fails here, naming file and line)."""
    from crlft.eval.general_check import load_prompts

    model = replay_model(cfg, base_model)
    if model is None:
        return None
    path = prompts_file(cfg)
    return ReplayPlan(model, path, load_prompts(path))


def replay_condition(cfg: Config) -> str:
    """The class replay conversations are written under: data.replay.condition, else the inference condition."""
    return cfg.data.replay.condition or cfg.inference_condition


def prompts_file(cfg: Config) -> Path:
    """data.replay.prompts, else the shipped general prompts."""
    if cfg.data.replay.prompts:
        return Path(cfg.data.replay.prompts).expanduser().resolve()
    from crlft.eval.general_check import REPLAY_PROMPTS_FILE

    return REPLAY_PROMPTS_FILE


def choose_prompts(prompts: list[str], accepted: int, ratio: float, seed: int) -> tuple[list[str], int]:
    """The prompts to answer, and how many were wanted: round(ratio x accepted), at most every prompt; the first of
    a shuffle seeded by data.seed, so a build with more data answers the same prompts and more."""
    wanted = round(ratio * accepted)
    order = list(prompts)
    random.Random(seed).shuffle(order)
    return order[:wanted], wanted


def replay_line(prompt: str, answer: str, condition: str) -> str:
    """One replay conversation as a JSON line of the OpenChat format the data stage reads."""
    items = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return json.dumps({"items": items, "condition": condition, "source": REPLAY_SOURCE}, ensure_ascii=False)


def complete_answer(answer: str, cut: bool) -> str | None:
    """The answer to keep: as it is when it ended by itself; when `cut` at the length limit, up to its last sentence
    end (or line break); None when nothing whole is left."""
    answer = answer.strip()
    if not cut or not answer:
        return answer or None
    ends = [m.end() for m in _SENTENCE_END.finditer(answer + " ")]
    return answer[: ends[-1]].strip() or None if ends else None


def answering_prompt(template_tokenizer: TemplateTokenizer, prompt: str, condition: str) -> list[int]:
    """The ids the base model is asked a replay prompt with: its own chat template's, or crlft's where it has none."""
    from crlft.data.records import Message
    from crlft.model import own_prompt

    own = own_prompt(template_tokenizer.tokenizer, prompt)
    return own or template_tokenizer.tokenize_prompt([Message("user", prompt)], condition=condition)


class TeacherFields(TypedDict):
    """Where a replay answer is distilled (RECORD_SCHEMA's teacher columns): the base model's input `teacher_ids`
    (its answering prompt, then the answer's tokens as crlft's template gives them), where the answer starts there
    (`teacher_from`) and in the trained conversation (`student_from`). Empty ids: nothing to distill."""

    teacher_ids: list[int]
    teacher_from: int
    student_from: int


NO_TEACHER = TeacherFields(teacher_ids=[], teacher_from=0, student_from=0)


def teacher_fields(template_tokenizer: TemplateTokenizer, line: str, input_ids: list[int],
                   weights: list[float]) -> TeacherFields:
    """The teacher columns of a tokenized replay conversation (`line` as replay_line wrote it): its supervised
    tokens must be one answer and its end of turn, else there is nothing to distill (a reward of 0, more turns)."""
    supervised = [i for i, w in enumerate(weights) if w > 0]
    if len(supervised) < 3 or supervised != list(range(supervised[0], supervised[-1] + 1)):
        return NO_TEACHER
    if input_ids[supervised[-1]] != template_tokenizer.eot_id:
        return NO_TEACHER
    from crlft.data.records import Message

    record = json.loads(line)
    items = record.get("items") or []
    if len(items) != 2:
        return NO_TEACHER
    question, condition = items[0]["content"], record.get("condition") or ""
    # The answer is what follows crlft's served prompt: a tokenizer may give the space after "Assistant:" its own
    # (unsupervised) token, which the base model must see too.
    served = template_tokenizer.tokenize_prompt([Message("user", question)], condition=condition)
    start = len(served) if input_ids[: len(served)] == served else supervised[0]
    prompt = answering_prompt(template_tokenizer, question, condition)
    return TeacherFields(teacher_ids=prompt + input_ids[start : supervised[-1]], teacher_from=len(prompt),
                         student_from=start)
