"""One chat completion, from the parsed request to the answer: admission, the prompt, generation, the plain or
streamed answer, and what is counted and stored.

Overload: a replica admits at most `serve.max_ongoing_requests + serve.max_queued_requests` chat requests (being
generated or waiting for the engine); beyond that it answers at once with an OpenAI-shaped 429 and `Retry-After`,
so a client never waits on an unbounded queue.

Faults: requests of which nothing was sent yet (plain ones, streams before their first piece) run again on the
restarted engine, once (services/lifecycle.py restarts it). Streams already under way end with an OpenAI-shaped error
event and `[DONE]`; a plain request that fails again is an OpenAI-shaped 503 with Retry-After.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from crlft.config import ServeConfig
from crlft.inference.engine import Event, Generation
from crlft.inference.sampling import Completion, ContextExceeded, SamplingParams, answer_budget
from services import protocol
from services.api import RETRY_AFTER_S, unavailable
from services.lifecycle import ModelLifecycle
from services.metrics import metrics
from services.protocol import ApiError, ChatCompletionRequest
from services.served_model import Served
from services.store import CompletionStore, Ticket

STREAM_INTERVAL_S = 0.05  # streamed text is sent in pieces at most this often (the first piece at once) ...
STREAMS_PER_INTERVAL = 8  # ... while a replica holds up to this many requests; beyond, the interval grows with them
MAX_STREAM_INTERVAL_S = 0.25


def admitted_per_replica(s: ServeConfig) -> int:
    """Chat requests a replica holds at once: generating or waiting for the engine."""
    return s.max_ongoing_requests + s.max_queued_requests


def stream_interval(requests_held: int) -> float:
    """How often a stream writes: every piece is a message through the ingress, which under load costs more than
    generating the tokens in it (through Serve's Python proxy most), so the more requests share the replica the longer
    the pieces."""
    return min(MAX_STREAM_INTERVAL_S, STREAM_INTERVAL_S * max(1.0, requests_held / STREAMS_PER_INTERVAL))


def generation_failed(served: Served, failed: Completion) -> ApiError:
    """A generation's error: a 503 to retry when its engine died under it (it is being restarted), else a 500."""
    if not served.engine.alive():
        return unavailable(f"the model's engine stopped while generating ({failed.error}); retry shortly",
                           "engine_unavailable")
    return ApiError(500, failed.error or "generation failed", type="server_error")


async def _begin(served: Served, prompt: list[int], params: list[SamplingParams], stream: bool,
                 interval_s: float) -> tuple[Generation, list[Event], AsyncIterator[list[Event]]]:
    """Submit a request to the model's engine: its generation, the first batch of events, and the batches to come."""
    generation = served.engine.submit(prompt, params, stream, served.engine_adapter)
    batches = generation.event_batches(interval_s)
    try:
        first = await anext(batches)
    except BaseException:  # the client went away
        generation.cancel()
        raise
    return generation, first, batches


def _failed(batch: list[Event]) -> bool:
    return any(isinstance(item, Completion) and item.finish_reason == "error" for _, item in batch)


async def _chained(first: list[Event], rest: AsyncIterator[list[Event]]) -> AsyncIterator[list[Event]]:
    yield first
    async for batch in rest:
        yield batch


class ChatServing:
    """The chat completions of one replica: it admits them, generates them with the lifecycle's model, answers and
    records them."""

    def __init__(self, serve_cfg: ServeConfig, lifecycle: ModelLifecycle, store: CompletionStore) -> None:
        self.max_new_tokens = serve_cfg.max_new_tokens
        self.lifecycle = lifecycle
        self.store = store
        self.capacity = admitted_per_replica(serve_cfg)
        self.admitted = 0

    async def chat(self, body: ChatCompletionRequest, api_key: str | None, started: float) -> Response:
        """The answer to a parsed request: JSON, or an event stream."""
        # From the model's choice to the submission there is no await: the model chosen is the model used.
        served = self.lifecycle.named(body.model, await self.lifecycle.serving())
        meta = served.meta
        condition = body.condition or meta.inference_condition
        if condition not in meta.conditions:
            raise ApiError(400, f"unknown condition {condition!r}: this model knows {', '.join(meta.conditions)}",
                           param="condition", code="invalid_condition")
        system, turns = protocol.to_conversation(body.messages)
        ticket = self.store.ticket(body.store, api_key, served.name, condition, system, turns, body.metadata)
        cid = ticket.id if ticket else protocol.completion_id()
        prompt = served.template_tokenizer.tokenize_prompt(turns, condition, system)
        try:
            answer_budget(len(prompt), 1, served.engine.context_len)
        except ContextExceeded as exc:
            raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
        release = self._admit()
        try:
            served, generation, batches = await self._generate(served, prompt, body.sampling(self.max_new_tokens),
                                                               body.stream)
        except BaseException:
            release()
            raise
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(served, generation, batches, include_usage, started, release, cid,
                                                  ticket),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(release))  # also when the stream never started
        try:
            completions = await generation.completions(batches)
        finally:
            generation.cancel()  # the client went away (this task was cancelled)
            release()
        failed = [c for c in completions if c.finish_reason == "error"]
        if failed:
            raise generation_failed(served, failed[0])
        answer = protocol.chat_completion(cid, served.name, served.fingerprint, generation.prompt_tokens,
                                          completions)
        self._record(served, generation, completions, started, False, ticket)
        return JSONResponse(answer)

    def _admit(self) -> Callable[[], None]:
        """Take one chat request, or refuse it at once when the replica is full. Returns its (idempotent) release."""
        if self.admitted >= self.capacity:
            metrics().rejected.inc()
            raise ApiError(429, f"the server is full ({self.capacity} requests in progress or waiting); retry in "
                           f"{RETRY_AFTER_S} s", type="rate_limit_error", code="server_overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        self.admitted += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.admitted -= 1

        return release

    async def _generate(self, served: Served, prompt: list[int], params: list[SamplingParams], stream: bool
                        ) -> tuple[Served, Generation, AsyncIterator[list[Event]]]:
        """Submit, and wait for the first events. Where they say that the engine died, nothing of the answer has
        reached the client yet: the request runs again, once, on the restarted engine (waiting for it as a new request
        does). An engine's death then fails only the answers that were partly sent."""
        interval = stream_interval(self.admitted) if stream else 0.0
        generation, first, batches = await _begin(served, prompt, params, stream, interval)
        if _failed(first) and not served.engine.alive():
            generation.cancel()  # its other choices, if any
            served = self.lifecycle.named(served.name, await self.lifecycle.serving())
            generation, first, batches = await _begin(served, prompt, params, stream, interval)
        return served, generation, _chained(first, batches)

    async def _stream(self, served: Served, generation: Generation, batches: AsyncIterator[list[Event]],
                      include_usage: bool, started: float, release: Callable[[], None], cid: str,
                      ticket: Ticket | None) -> AsyncIterator[str]:
        created, name = int(time.time()), served.name
        fingerprint = served.fingerprint
        done: dict[int, Completion] = {}
        first_text = True
        # Every message is a hop through the ingress: the role chunks go with the first pieces, the last pieces
        # with the usage and [DONE].
        events = [protocol.chunk(cid, created, name, fingerprint,
                                 [protocol.delta_choice(i, {"role": "assistant", "content": ""})])
                  for i in range(generation.choices)]
        try:
            async for batch in batches:
                for index, item in batch:
                    if isinstance(item, str):
                        if first_text:
                            metrics().ttft.observe(time.perf_counter() - started)
                            first_text = False
                        events.append(protocol.chunk(cid, created, name, fingerprint,
                                                     [protocol.delta_choice(index, {"content": item})]))
                    elif item.finish_reason == "error":  # the stream ends as OpenAI's do: the error, then [DONE]
                        error = generation_failed(served, item)
                        yield "".join(events) + protocol.sse(error.body()) + protocol.sse("[DONE]")
                        return
                    else:
                        done[index] = item
                        events.append(protocol.chunk(cid, created, name, fingerprint,
                                                     [protocol.delta_choice(index, {}, protocol.finish_reason(item))]))
                if len(done) < generation.choices:
                    yield "".join(events)
                    events = []
            if include_usage:
                events.append(protocol.chunk(cid, created, name, fingerprint, [],
                                             protocol.usage(generation.prompt_tokens, list(done.values()))))
            yield "".join(events) + protocol.sse("[DONE]")
            completions = [done[i] for i in sorted(done)]
            self._record(served, generation, completions, started, True, ticket)
        finally:
            generation.cancel()
            release()

    def _record(self, served: Served, generation: Generation, completions: list[Completion], started: float,
                stream: bool, ticket: Ticket | None) -> None:
        """Count a complete answer; queue it for the store when it is to be stored (never waiting on the store)."""
        if ticket is not None:
            self.store.record(ticket, served, generation.prompt_tokens, completions)
        m = metrics()
        m.latency.labels(str(stream).lower()).observe(time.perf_counter() - started)
        m.prompt_tokens.inc(generation.prompt_tokens)
        m.completion_tokens.inc(sum(c.completion_tokens for c in completions))

    def model_card(self, served: Served) -> dict[str, Any]:
        """What GET /v1/models says of a model it serves."""
        return protocol.model_card(served.name, served.loaded_at, {
            "revision": served.revision,
            "source": served.source,
            "engine": served.engine.kind,
            "adapter_of": self.lifecycle.base_name if served.adapter else None,
            "conditions": sorted(served.meta.conditions),
            "inference_condition": served.meta.inference_condition,
            "context_length": served.engine.context_len,
            "store": self.store.enabled,  # whether requests may ask `store: true` (and give feedback)
            "store_by_default": self.store.enabled and self.store.by_default,
        })
