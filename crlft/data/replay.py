"""Replay without Ray: whether a build replays, which prompts the base model answers, and the conversations its
answers become (jobs/replay.py generates them, on Ray Data).

Replay is self-distillation: the base model's own greedy answers to general prompts, mixed into the training data, so
that a fine-tune on narrow data keeps what the model could do (replay against forgetting: Ibrahim et al. 2024,
arXiv 2403.08763). The base model is asked as its authors serve it (its own chat template, crlft.model.own_prompt;
crlft's where it has none): there it answers what it knows, while through crlft's template, which it has never seen,
it answers nothing to a third of the prompts. The fine-tune learns those answers under the replay class, so the
served model keeps the base model's behaviour, and retention (crlft/eval/retention.py) measures against the same
answers.

An answer cut at the length limit would teach the model to end its turn mid-sentence: it is cut back to its last
whole sentence, or dropped when it has none.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from crlft.config import Config
from crlft.errors import CrlftError

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
