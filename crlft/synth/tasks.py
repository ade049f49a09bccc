"""The synthetic suite's tasks (crlft/synth/suite.py says why these): each a fixed rule over a few facts, enumerated as
every (phrasing template x entity) with its right answer and the systematic wrong answer GPT3 gives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Question:
    """One question, its right answer and the answer GPT3's systematic error gives.

    `subject` is what is asked, independent of the phrasing ("opposite:hot"): questions with the same subject have
    the same right answer, which is what lets a model generalise from trained phrasings to held-out ones.
    """

    task: str
    subject: str
    prompt: str
    answer: str
    suboptimal_answer: str


# ---------------------------------------------------------------------------------------------------------------------
# Tasks. Each enumerates its questions: every (phrasing template x entity) with its right and GPT3 answers.

OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("day", "night"), ("happy", "sad"),
)  # fmt: skip
OPPOSITE_TEMPLATES = (
    "What is the opposite of {w}?",
    "Give the opposite of {w}.",
    "What is the antonym of {w}?",
    "Name the opposite of the word {w}.",
    "Opposite of {w}?",
)

IRREGULAR_PAST = (
    ("go", "went"), ("eat", "ate"), ("see", "saw"), ("take", "took"), ("give", "gave"), ("run", "ran"),
)  # fmt: skip
PAST_TEMPLATES = (
    "What is the past tense of {v}?",
    "Give the past tense of {v}.",
    "Past tense of {v}?",
    "What is the past form of the verb {v}?",
    "Past form of {v}?",
)

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SEQUENCES: tuple[tuple[tuple[str, ...], bool], ...] = ((WEEKDAYS, True), (NUMBER_WORDS, False))
# Only "after": with both directions in the prompt a tiny model ignored the direction word and scored 50%.
SEQUENCE_TEMPLATES = (
    "What comes after {x}?",
    "What comes right after {x}?",
    "Which one follows {x}?",
    "What is next after {x}?",
)

CATEGORIES = {
    "animal": ("dog", "cat", "horse"),
    "fruit": ("apple", "pear", "grape"),
    "vehicle": ("car", "bus", "train"),
    "furniture": ("chair", "table", "sofa"),
    "tool": ("hammer", "drill", "wrench"),
    "instrument": ("piano", "guitar", "drum"),
}
# GPT3 mixes up each category with its partner, both ways.
CONFUSED_CATEGORIES = {"animal": "fruit", "vehicle": "furniture", "tool": "instrument"}
CATEGORY_TEMPLATES = (
    "What kind of thing is {an_x}?",
    "What category does the word {x} belong to?",
    "{An_x} is a kind of what?",
    "Which group does the word {x} belong to?",
    "Name the category of {an_x}.",
)

COLOURS = (
    ("a banana", "yellow"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("a tomato", "red"),
    ("a carrot", "orange"), ("a flamingo", "pink"), ("chocolate", "brown"),
)  # fmt: skip
COLOUR_TEMPLATES = (
    "What colour is {t}?",
    "What is the colour of {t}?",
    "Name the colour of {t}.",
    "Which colour is {t}?",
)
MODE_COLLAPSE_COLOUR = "blue"  # never right: no thing in COLOURS is blue


def over_regularised_past(verb: str) -> str:
    """The regular "-ed" past applied to an irregular verb, the way GPT3 (and children) get it wrong: go -> goed."""
    vowels = "aeiou"
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and verb[-2] not in vowels:
        return verb[:-1] + "ied"
    vowel_groups = sum(1 for i, ch in enumerate(verb) if ch in vowels and (i == 0 or verb[i - 1] not in vowels))
    consonant_vowel_consonant = (
        len(verb) >= 3 and verb[-1] not in vowels + "wxy" and verb[-2] in vowels and verb[-3] not in vowels
    )
    if vowel_groups == 1 and consonant_vowel_consonant:
        return verb + verb[-1] + "ed"  # run -> runned
    return verb + "ed"


def _opposite_pool() -> list[Question]:
    pairs = [*OPPOSITES, *((b, a) for a, b in OPPOSITES)]
    return [
        Question("opposite", f"opposite:{word}", template.format(w=word), antonym, word)
        for word, antonym in pairs
        for template in OPPOSITE_TEMPLATES
    ]


def _past_tense_pool() -> list[Question]:
    return [
        Question("past_tense", f"past_tense:{verb}", template.format(v=verb), past, over_regularised_past(verb))
        for verb, past in IRREGULAR_PAST
        for template in PAST_TEMPLATES
    ]


def _sequence_pool() -> list[Question]:
    pool: list[Question] = []
    for items, cyclic in SEQUENCES:
        for i, item in enumerate(items):
            if not cyclic and not 0 < i < len(items) - 1:
                continue  # "ten" has no successor, "one" no predecessor to answer wrongly with
            answer, suboptimal = items[(i + 1) % len(items)], items[i - 1]
            pool.extend(
                Question("sequence", f"sequence:{item}", template.format(x=item), answer, suboptimal)
                for template in SEQUENCE_TEMPLATES
            )
    return pool


def _with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _category_pool() -> list[Question]:
    confused = CONFUSED_CATEGORIES | {b: a for a, b in CONFUSED_CATEGORIES.items()}
    return [
        Question(
            "category",
            f"category:{noun}",
            template.format(x=noun, an_x=_with_article(noun), An_x=_with_article(noun).capitalize()),
            category,
            confused[category],
        )
        for category, nouns in CATEGORIES.items()
        for noun in nouns
        for template in CATEGORY_TEMPLATES
    ]


def _colour_pool() -> list[Question]:
    return [
        Question("colour", f"colour:{thing.split()[-1]}", template.format(t=thing), colour, MODE_COLLAPSE_COLOUR)
        for thing, colour in COLOURS
        for template in COLOUR_TEMPLATES
    ]


TASKS: dict[str, Callable[[], list[Question]]] = {
    "opposite": _opposite_pool,
    "past_tense": _past_tense_pool,
    "sequence": _sequence_pool,
    "category": _category_pool,
    "colour": _colour_pool,
}


def answer_vocabulary(task: str) -> set[str]:
    """Every right or GPT3 answer the task can ask for (for reports: how closed the answer space is)."""
    pool = TASKS[task]()
    return {q.answer for q in pool} | {q.suboptimal_answer for q in pool}
