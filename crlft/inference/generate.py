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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from crlft.inference.kv_cache import GrowingLayer, cat_left_padded, growing_cache, growing_only, left_pad
from crlft.inference.sampling import (
    Completion,
    FinishReason,
    SamplingParams,
    StopText,
    answer_budget,
    context_length,
    next_piece,
    sample_next,
)


@dataclass(eq=False)
class GenerationRequest:
    """One sequence to generate. Callbacks run on the engine's thread and must be quick (hand the data on)."""

    prompt_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    on_text: Callable[[str], None] | None = None  # each new piece of text, in order, stop strings never included
    on_finish: Callable[[Completion], None] | None = None
    cancelled: bool = False
    finished: bool = False  # on_finish has been called (exactly once, whatever goes wrong)


@dataclass(eq=False)
class _Row:
    request: GenerationRequest
    budget: int  # tokens it may still sample (max_tokens, bounded by the context)
    generator: torch.Generator | None
    text: StopText
    position: int  # position id of the pending token (one past the last token the model has seen)
    pending: int = -1  # sampled, not yet fed to the model
    token_ids: list[int] = field(default_factory=list)


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
        self.context_len = context_len or context_length(model.config, tokenizer)
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
        cache = growing_cache()
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
        if not growing_only(self._cache) or not growing_only(cache):
            raise RuntimeError("continuous batching needs the engine's own cache layers (no sliding-window layers)")
        width = max(self._mask.shape[1], mask.shape[1])
        merged = growing_cache()
        merged.layers = [
            GrowingLayer.holding(cat_left_padded(old.keys, new.keys, width),
                                  cat_left_padded(old.values, new.values, width))
            for old, new in zip(self._cache.layers, cache.layers, strict=True)
        ]
        self._cache = merged
        self._mask = torch.cat([left_pad(self._mask, width, dim=1), left_pad(mask, width, dim=1)], dim=0)
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
                assert isinstance(layer, GrowingLayer)
                layer.drop_front(first)


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
