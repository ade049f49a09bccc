"""The generation engine: many requests decoded together, each with its own sampling settings, streamed as text.

Ray-free and pure PyTorch + transformers, so that tests, evaluation and the server share it. The batch is
continuous: requests join at any step (their prompts are prefilled together and their KV cache is merged into the
running one) and leave as soon as they finish, so a long answer never holds a short one back.

Layout of the running batch: every row's tokens are right-aligned in one KV cache (left padding, masked out), so a
decode step feeds one token per row at the same column; each row keeps its own position ids. Rows are removed the
moment they finish, and padding columns no row needs any more are cut.

Usage counts are exact: `prompt_tokens` is the length of the prompt ids, `completion_tokens` every token the model
sampled for the request, including the end-of-turn token that ended it or the tokens of a stop string.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

if TYPE_CHECKING:
    from crlft.template import TemplateTokenizer

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


@dataclass(eq=False)
class GenerationRequest:
    """One sequence to generate. Callbacks run on the engine's thread and must be quick (hand the data on)."""

    prompt_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    on_text: Callable[[str], None] | None = None  # each new piece of text, in order, stop strings never included
    on_finish: Callable[[Completion], None] | None = None
    cancelled: bool = False
    finished: bool = False  # on_finish has been called (exactly once, whatever goes wrong)


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


@dataclass(eq=False)
class _Row:
    request: GenerationRequest
    budget: int  # tokens it may still sample (max_tokens, bounded by the context)
    generator: torch.Generator | None
    text: StopText
    position: int  # position id of the pending token (one past the last token the model has seen)
    pending: int = -1  # sampled, not yet fed to the model
    token_ids: list[int] = field(default_factory=list)


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


def context_length(model_config: object, tokenizer: object) -> int:
    """The longest sequence the model takes: its position table, unless the tokenizer says less."""
    return int(min(getattr(model_config, "max_position_embeddings", 2048),
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


class BatchGenerator:
    """Continuous-batching generation over a causal LM. Not thread-safe by itself except `submit` and `cancel`;
    one thread calls `step` (see EngineLoop)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stop_token_ids: Sequence[int],
                 max_batch_size: int = 16, context_len: int | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset(stop_token_ids)
        self.max_batch_size = max_batch_size
        self.context_len = context_len or int(getattr(model.config, "max_position_embeddings", 2048))
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.device = model.device
        self._waiting: deque[GenerationRequest] = deque()
        self._lock = threading.Lock()
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cache columns]: 1 where a row has a real token

    # -- called from any thread --------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; it joins the batch at the next step. Raises ValueError for an empty prompt,
        ContextExceeded for one that fills the context."""
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        answer_budget(len(request.prompt_ids), request.params.max_tokens, self.context_len)
        with self._lock:
            self._waiting.append(request)

    def cancel(self, request: GenerationRequest) -> None:
        """Stop generating for a request (e.g. its client went away); it finishes with reason "cancelled"."""
        request.cancelled = True

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._rows)

    def has_work(self) -> bool:
        return bool(self._rows or self._waiting)

    # -- the engine thread ---------------------------------------------------------------------------------------
    def step(self) -> None:
        """Admit waiting requests (prefill, first token) if there is room, else decode one token for every row."""
        self._drop_cancelled()
        admitted = self._take_waiting(self.max_batch_size - len(self._rows))
        try:
            if admitted:
                self._prefill(admitted)
            elif self._rows:
                self._decode()
        except Exception as exc:  # the batch is lost; every request in it must hear so, none may hang
            self._fail([r.request for r in self._rows] + admitted, exc)
            self._rows, self._cache, self._mask = [], None, None
            raise

    def fail_all(self, exc: BaseException) -> None:
        """Finish every running and waiting request with an error (the engine cannot go on)."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        rows, self._rows = self._rows, []
        self._cache, self._mask = None, None
        self._fail([r.request for r in rows] + waiting, exc)

    @staticmethod
    def _fail(requests: list[GenerationRequest], exc: BaseException) -> None:
        message = f"generation failed: {type(exc).__name__}: {exc}"
        for request in requests:
            _finish(request, Completion("", (), "error", len(request.prompt_ids), message))

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Generate all requests (batched as capacity allows) and return their completions in order."""
        results: dict[int, Completion] = {}
        for i, request in enumerate(requests):
            request.on_finish = _chain(request.on_finish, lambda c, i=i: results.__setitem__(i, c))
            self.submit(request)
        while self.has_work():
            self.step()
        return [results[i] for i in range(len(requests))]

    # -- internals ------------------------------------------------------------------------------------------------
    def _take_waiting(self, room: int) -> list[GenerationRequest]:
        taken: list[GenerationRequest] = []
        with self._lock:
            while self._waiting and len(taken) < room:
                taken.append(self._waiting.popleft())
        for request in [r for r in taken if r.cancelled]:
            _finish(request, Completion("", (), "cancelled", len(request.prompt_ids)))
        return [r for r in taken if not r.cancelled]

    def _drop_cancelled(self) -> None:
        done = [i for i, row in enumerate(self._rows) if row.request.cancelled]
        for i in done:
            row = self._rows[i]
            prompt_tokens = len(row.request.prompt_ids)
            _finish(row.request, Completion(row.text.text, tuple(row.token_ids), "cancelled", prompt_tokens))
        self._remove(done)

    def _new_row(self, request: GenerationRequest) -> _Row:
        params = request.params
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device="cpu")
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed)
        budget = answer_budget(len(request.prompt_ids), params.max_tokens, self.context_len)
        # The last prompt token's position: sampling the first token (`_advance`) moves it on to len(prompt).
        return _Row(request, budget, generator, StopText(self.tokenizer, params.stop), len(request.prompt_ids) - 1)

    @torch.inference_mode()
    def _prefill(self, requests: list[GenerationRequest]) -> None:
        rows = [self._new_row(r) for r in requests]
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(requests):
            n = len(r.prompt_ids)
            ids[i, width - n :] = torch.tensor(list(r.prompt_ids), dtype=torch.long)
            mask[i, width - n :] = 1
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        cache = _growing_cache()
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), past_key_values=cache, use_cache=True)
        self._merge(rows, out.past_key_values, mask.to(self.device))
        self._advance(rows, out.logits[:, -1, :], offset=len(self._rows) - len(rows))

    @torch.inference_mode()
    def _decode(self) -> None:
        assert self._cache is not None and self._mask is not None
        ids = torch.tensor([[row.pending] for row in self._rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[row.position] for row in self._rows], dtype=torch.long, device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
        out = self.model(input_ids=ids, attention_mask=self._mask, position_ids=positions,
                         past_key_values=self._cache, use_cache=True)
        self._cache = out.past_key_values
        self._advance(list(self._rows), out.logits[:, -1, :], offset=0)

    def _advance(self, rows: list[_Row], logits: torch.Tensor, offset: int) -> None:
        """Sample one token for each of `rows` (at batch index offset + i), stream text, retire finished rows."""
        tokens = sample_next(
            logits,
            [r.request.params.temperature for r in rows],
            [r.request.params.top_p for r in rows],
            [r.generator for r in rows],
        )
        finished: list[int] = []
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            row.budget -= 1
            piece, stopped = next_piece(row.text, row.token_ids, token, self.stop_token_ids)
            reason: FinishReason | None = "stop" if stopped else "length" if row.budget <= 0 else None
            if reason is not None:
                piece += row.text.flush()
            if piece and row.request.on_text is not None:
                row.request.on_text(piece)
            if reason is None:
                row.pending, row.position = token, row.position + 1
                continue
            finished.append(offset + i)
            completion = Completion(row.text.text, tuple(row.token_ids), reason, len(row.request.prompt_ids))
            _finish(row.request, completion)
        self._remove(finished)

    def _merge(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append freshly prefilled rows to the running batch, left-padding whichever cache is shorter."""
        if self._cache is None or self._mask is None or not self._rows:
            self._rows, self._cache, self._mask = list(rows), cache, mask
            return
        if not _growing_only(self._cache) or not _growing_only(cache):
            raise RuntimeError("continuous batching needs the engine's own cache layers (no sliding-window layers)")
        width = max(self._mask.shape[1], mask.shape[1])
        merged = _growing_cache()
        merged.layers = [
            _GrowingLayer.holding(_cat_left_padded(old.keys, new.keys, width),
                                  _cat_left_padded(old.values, new.values, width))
            for old, new in zip(self._cache.layers, cache.layers, strict=True)
        ]
        self._cache = merged
        self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)], dim=0)
        self._rows += rows

    def _remove(self, indices: list[int]) -> None:
        if not indices:
            return
        gone = set(indices)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        assert self._cache is not None and self._mask is not None
        index = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask.index_select(0, index)
        # Columns that are padding in every remaining row are dead weight.
        used = self._mask.any(dim=0).nonzero()
        first = int(used[0].item()) if used.numel() else 0
        if first > 0:
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                assert isinstance(layer, _GrowingLayer)
                layer.drop_front(first)


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends each step's keys and values into spare room (grown by doubling) instead of
    concatenating the whole cache again at every step; `keys` and `values` are views of the filled part."""

    def __init__(self) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._len = 0

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> _GrowingLayer:
        layer = cls()
        layer.update(keys, values)
        return layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True
        n = key_states.shape[-2]
        if self._k is None or self._v is None or self._len + n > self._k.shape[-2]:
            room = 2 * (self._len + n) + 32
            k = key_states.new_empty((*key_states.shape[:-2], room, key_states.shape[-1]))
            v = value_states.new_empty((*value_states.shape[:-2], room, value_states.shape[-1]))
            if self._k is not None and self._v is not None:
                k[..., : self._len, :] = self._k[..., : self._len, :]
                v[..., : self._len, :] = self._v[..., : self._len, :]
            self._k, self._v = k, v
        self._k[..., self._len : self._len + n, :] = key_states
        self._v[..., self._len : self._len + n, :] = value_states
        self._len += n
        return self._views()

    def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._k is not None and self._v is not None
        self.keys, self.values = self._k[..., : self._len, :], self._v[..., : self._len, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._k is not None and self._v is not None:
            self._k, self._v = self._k[indices], self._v[indices]
            self._views()

    def drop_front(self, n: int) -> None:
        """Forget the first n positions (padding no row needs any more)."""
        if self._k is not None and self._v is not None:
            self._k, self._v = self._k[..., n:, :], self._v[..., n:, :]
            self._len -= n
            self._views()


def _growing_cache() -> DynamicCache:
    cache = DynamicCache()
    cache.layer_class_to_replicate = _GrowingLayer  # layers are created on first use, one per model layer
    return cache


def _growing_only(cache: DynamicCache) -> bool:
    return all(type(layer) is _GrowingLayer for layer in cache.layers)


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _cat_left_padded(old: torch.Tensor, new: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([_left_pad(old, width, dim=2), _left_pad(new, width, dim=2)], dim=0)


def _finish(request: GenerationRequest, completion: Completion) -> None:
    if request.finished:
        return
    request.finished = True
    if request.on_finish is not None:
        request.on_finish(completion)


def _chain(first: Callable[[Completion], None] | None,
           then: Callable[[Completion], None]) -> Callable[[Completion], None]:
    def both(c: Completion) -> None:
        if first is not None:
            first(c)
        then(c)

    return both


class EngineLoop:
    """Runs a BatchGenerator on its own thread: requests submitted from any thread are batched together.

    When the engine is idle, the first request waits up to `batch_wait_s` for others to arrive so that requests
    sent together are prefilled together. A step that fails finishes the requests it held with an error and the
    loop goes on (a transient failure, such as running out of memory on a large batch, must not end the server)."""

    def __init__(self, engine: BatchGenerator, batch_wait_s: float = 0.0, name: str = "crlft-engine") -> None:
        self.engine = engine
        self.batch_wait_s = batch_wait_s
        self._wake = threading.Condition()
        self._stopping = False
        self._draining = False
        self.last_error: BaseException | None = None
        self.failed_steps = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> None:
        if self._stopping or self._draining:
            raise RuntimeError("the engine is shutting down")
        self.engine.submit(request)
        with self._wake:
            self._wake.notify()

    def cancel(self, request: GenerationRequest) -> None:
        self.engine.cancel(request)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def drain(self) -> None:
        """Take no new requests; finish the ones it has, then stop (used when a new model replaces this one)."""
        with self._wake:
            self._draining = True
            self._wake.notify()

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout_s)

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self.engine.has_work() and not self._stopping and not self._draining:
                        self._wake.wait()
                    if self._stopping or (self._draining and not self.engine.has_work()):
                        break
                if self.engine.num_running == 0 and self.batch_wait_s > 0:
                    self._gather()
                try:
                    self.engine.step()
                except Exception as exc:  # step() has already failed the requests it held
                    self.last_error = exc
                    self.failed_steps += 1
        finally:
            self.engine.fail_all(RuntimeError("the engine stopped"))

    def _gather(self) -> None:
        deadline = time.monotonic() + self.batch_wait_s
        while self.engine.num_waiting < self.engine.max_batch_size and not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with self._wake:
                self._wake.wait(left)
