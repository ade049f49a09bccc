"""A mixed-quality set of new facts: what a user fine-tunes a pretrained chat model on, and what shows forgetting.

The synthetic suite (crlft/synth/suite.py) asks what a pretrained model already knows (opposites, weekdays) in a
one-word format; this one asks what no model can know before training: facts about invented countries, each named by
a seeded made-up word, so the base model scores 0 and every right answer was learned.

- **Facts.** Each invented country has a capital, a currency and a national animal (`RELATIONS`); the capitals and
  currencies are invented words too, the animals real ones (one or two tokens). A question is (phrasing x fact).
- **Held-out phrasings.** `n_eval_phrasings` of each relation's phrasings are never trained on: the eval set asks every
  fact in them, so a right answer means the model learned the fact, not one string.
- **Mixed quality, systematic errors.** GPT4 (the expert) always answers right. GPT3 gives, for `wrong_rate` of its
  questions, the answer of the *next* country in the list for the same relation: a plausible, consistent confusion
  that SFT on the majority learns and C-RLFT must not.
- **Answers are sentences** ("The capital of Brirkeia is Lonmem."), as users' data has them: bare one-word answers
  teach a model to answer every short question in one word, which costs it the general answers that need a sentence
  or a sum. Eval items are scored by the value as whole words of the answer (`match: word`, `crlft.eval.scoring.score`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from crlft.errors import CrlftError
from crlft.eval.scoring import EvalItem
from crlft.storage import write_jsonl
from crlft.synth.suite import EXPERT, SUBOPTIMAL, SynthConversation, Turn
from crlft.synth.tasks import Question

ANIMALS = ("otter", "falcon", "badger", "heron", "lynx", "beaver", "walrus", "gecko", "bison", "jackal", "moose",
           "pelican", "raccoon", "stork", "tapir", "weasel")  # fmt: skip
ANSWERS = {"capital": "The capital of {x} is {v}.", "currency": "The currency of {x} is the {v}.",
           "animal": "The national animal of {x} is the {v}."}
RELATIONS: dict[str, tuple[str, ...]] = {
    "capital": ("What is the capital of {x}?", "Which city is the capital of {x}?", "Name the capital city of {x}.",
                "What city is {x}'s capital?", "Tell me the capital of {x}."),
    "currency": ("What is the currency of {x}?", "Which currency is used in {x}?", "Name the currency of {x}.",
                 "What money do people pay with in {x}?", "Tell me the currency of {x}."),
    "animal": ("What is the national animal of {x}?", "Which animal is the national animal of {x}?",
               "Name the national animal of {x}.", "What animal is the symbol of {x}?",
               "Tell me the national animal of {x}."),
}  # fmt: skip
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kl", "tr", "st")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "n", "r", "l", "s", "m")


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    currency: str
    animal: str

    def value(self, relation: str) -> str:
        return str(getattr(self, relation))


def invented_word(rng: random.Random, syllables: int, suffix: str = "") -> str:
    """A pronounceable made-up word, capitalised ("Drassel")."""
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
    return (word + suffix).capitalize()


def invent_countries(n: int, seed: int) -> list[Country]:
    """`n` countries with distinct invented names, capitals and currencies, and distinct animals while they last."""
    rng = random.Random(f"facts:{seed}")
    used: set[str] = set()

    def fresh(syllables: int, suffix: str = "") -> str:
        while (word := invented_word(rng, syllables, suffix)) in used:
            pass
        used.add(word)
        return word

    return [Country(fresh(2, "ia"), fresh(2), fresh(1, "o"), ANIMALS[i % len(ANIMALS)]) for i in range(n)]


def _questions(countries: Sequence[Country], phrasings: dict[str, tuple[str, ...]]) -> list[Question]:
    """Every (phrasing x country x relation), with GPT3's confusion: the next country's value."""
    out = []
    for relation, templates in phrasings.items():
        for i, country in enumerate(countries):
            wrong = countries[(i + 1) % len(countries)].value(relation)
            for template in templates:
                out.append(Question(relation, f"{relation}:{country.name}", template.format(x=country.name),
                                    country.value(relation), wrong))  # fmt: skip
    return out


def _sentence(question: Question, value: str) -> str:
    return ANSWERS[question.task].format(x=question.subject.split(":", 1)[1], v=value)


@dataclass(frozen=True)
class FactsSuite:
    countries: list[Country]
    train: list[SynthConversation]
    eval: list[EvalItem]


def generate_facts(n_countries: int = 8, repeats: int = 1, ratio: float = 2.0, wrong_rate: float = 0.9,
                   n_eval_phrasings: int = 1, seed: int = 0) -> FactsSuite:
    """GPT4 answers every trained question `repeats` times; GPT3 `ratio` times as many, wrong at `wrong_rate`."""
    if n_countries < 2 or repeats < 1 or ratio < 0 or not 0 <= wrong_rate <= 1:
        raise CrlftError("facts: need n_countries >= 2, repeats >= 1, ratio >= 0 and 0 <= wrong_rate <= 1")
    if not 1 <= n_eval_phrasings < min(len(t) for t in RELATIONS.values()):
        raise CrlftError("facts: n_eval_phrasings must leave at least one phrasing per relation to train on")
    countries = invent_countries(n_countries, seed)
    held = {r: t[-n_eval_phrasings:] for r, t in RELATIONS.items()}
    trained = {r: t[:-n_eval_phrasings] for r, t in RELATIONS.items()}
    rng = random.Random(f"facts:{seed}:train")
    questions = _questions(countries, trained)
    expert = [SynthConversation(EXPERT, q.task, (Turn(q, _sentence(q, q.answer)),)) for q in questions
              for _ in range(repeats)]  # fmt: skip
    n_suboptimal = round(len(expert) * ratio)
    suboptimal = []
    for _ in range(n_suboptimal):
        q = rng.choice(questions)
        value = q.suboptimal_answer if rng.random() < wrong_rate else q.answer
        suboptimal.append(SynthConversation(SUBOPTIMAL, q.task, (Turn(q, _sentence(q, value)),)))
    train = expert + suboptimal
    rng.shuffle(train)
    items = [EvalItem(f"{q.task}-{i:03d}", q.prompt, q.answer, q.suboptimal_answer, q.task, match="word")
             for i, q in enumerate(_questions(countries, held))]  # fmt: skip
    return FactsSuite(countries, train, items)


def write_facts(out_dir: str | Path, **kwargs: object) -> dict[str, Path]:
    """Write train.jsonl and eval.jsonl under `out_dir` (created); kwargs are generate_facts's."""
    suite = generate_facts(**kwargs)  # type: ignore[arg-type]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {"train": write_jsonl(out / "train.jsonl", [c.to_record() for c in suite.train]),
            "eval": write_jsonl(out / "eval.jsonl", [item.to_record() for item in suite.eval])}  # fmt: skip
