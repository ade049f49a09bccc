"""How one answer is sampled and where it ends, for every engine and decoder: the sampling settings, the completion
they give, the next token of each row (greedy or nucleus), incremental detokenizing with stop strings (`StopText`),
the stop rule (`next_piece`), the context rule (`answer_budget`) and the tokens an answer stops on."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    from crlft.data.template import TemplateTokenizer


FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # same seed, same prompt, same settings: same text
    stop: tuple[str, ...] = ()  # the text ends before the first of these (which is not returned)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    error: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class StopText:
    """Incremental detokenization with stop strings: what text may be shown now, and whether a stop string ended it.

    Each step decodes only the last few tokens (with one token of context, which tokenizers that drop a leading
    space at the start of a decode need), so long answers cost the same per token as short ones. Text that could
    still become a stop string, and bytes of a character not complete yet, are held back."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._ids: Sequence[int] = ()
        self._prefix = 0  # decoding context starts at this token
        self._read = 0  # tokens before this one are in `text`
        self.text = ""  # the text so far (cut before the stop string once one is found)
        self.shown = 0  # characters of `text` handed out
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _tail(self) -> str:
        """Text of the tokens not in `text` yet (may end in U+FFFD: an unfinished UTF-8 character)."""
        before = self._decode(self._ids[self._prefix : self._read])
        return self._decode(self._ids[self._prefix :])[len(before) :]

    def update(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """Take the tokens so far; return (new text that is safe to show, whether a stop string was hit)."""
        self._ids = token_ids
        if self.stopped:
            return "", True
        tail = self._tail()
        if tail and not tail.endswith("\ufffd"):
            old_len = len(self.text)
            self.text += tail
            self._prefix, self._read = self._read, len(token_ids)
            start = max(0, old_len - self._longest_stop + 1)
            hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._show(len(self.text)), True
        safe = len(self.text) - _longest_partial_stop(self.text, self._stop)
        return self._show(safe), False

    def flush(self) -> str:
        """The rest of the text, at the end of generation (an unfinished character included, as U+FFFD)."""
        if not self.stopped:
            self.text += self._tail()
            self._prefix = self._read = len(self._ids)
        return self._show(len(self.text))

    def _show(self, upto: int) -> str:
        if upto <= self.shown:
            return ""
        piece = self.text[self.shown : upto]
        self.shown = upto
        return piece


def _longest_partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string (so may become one)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):  # longest first: stop at the first match
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def next_piece(text: StopText, ids: list[int], token: int, stop_ids: Collection[int]) -> tuple[str, bool]:
    """The stop rule, one generated token at a time (every engine applies it): `token` joins `ids`; a stop token ends
    the answer without text of its own, a stop string ends it where the string begins. Returns (the new text safe to
    show, whether the answer stopped)."""
    ids.append(token)
    if token in stop_ids:
        piece, _ = text.update(ids[:-1])
        return piece, True
    return text.update(ids)


def answer_text(tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int], stops: Collection[int]) -> str:
    """A whole answer's tokens as the stop rule leaves them (those before the first stop token), decoded as `StopText`
    decodes (no special tokens, no clean-up of spaces) and stripped: the offline decoders' answers read as the
    endpoint's do."""
    cut = next((k for k, token in enumerate(token_ids) if token in stops), len(token_ids))
    return tokenizer.decode(list(token_ids[:cut]), skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()


class ContextExceeded(ValueError):
    """A prompt that leaves no room for an answer in the model's context."""


def answer_budget(prompt_len: int, max_tokens: int, context_len: int) -> int:
    """The context rule, the one every engine and the endpoint apply: a prompt must leave room for one token, and an
    answer runs at most to the end of the context. Raises ContextExceeded for a prompt that fills it."""
    if prompt_len >= context_len:
        raise ContextExceeded(f"the prompt is {prompt_len} tokens; the model's context is {context_len} tokens")
    return min(max_tokens, context_len - prompt_len)


UNSTATED_CONTEXT = 2048  # assumed for a model whose config names no position table (max_position_embeddings)


def context_length(model_config: object, tokenizer: object) -> int:
    """The longest sequence the model takes, the one context limit (read once into `ModelFolder.context_len`): serving,
    evaluation and replay fit to it. Its position table (else UNSTATED_CONTEXT), unless the tokenizer says less."""
    return int(min(getattr(model_config, "max_position_embeddings", UNSTATED_CONTEXT),
                   getattr(tokenizer, "model_max_length", 10**9)))


def stop_token_ids(template_tokenizer: TemplateTokenizer, eos: int | list[int] | None) -> list[int]:
    """What generation stops on: the end-of-turn token and the model's own end-of-sequence token(s)."""
    return sorted({template_tokenizer.eot_id, *([eos] if isinstance(eos, int) else eos or [])})


def sample_next(logits: torch.Tensor, temperatures: Sequence[float], top_ps: Sequence[float],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row: greedy where the temperature is 0, else nucleus sampling with the row's own generator."""
    greedy = logits.argmax(dim=-1).tolist()
    sampled_rows = [i for i, t in enumerate(temperatures) if t > 0]
    if not sampled_rows:
        return greedy
    index = torch.tensor(sampled_rows, device=logits.device)
    temps = torch.tensor([temperatures[i] for i in sampled_rows], device=logits.device, dtype=torch.float32)
    tops = torch.tensor([top_ps[i] for i in sampled_rows], device=logits.device, dtype=torch.float32)
    probs = torch.softmax(logits.index_select(0, index).float() / temps[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest set of most likely tokens whose mass reaches top_p (always at least the first).
    outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= tops[:, None]
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    out = list(greedy)
    for k, row in enumerate(sampled_rows):
        choice = torch.multinomial(sorted_probs[k].cpu(), 1, generator=generators[row])
        out[row] = int(order[k, choice].item())
    return out
