"""Stored completions and feedback at the endpoint (OpenAI's `store`), on the completion store of crlft/data/store.py.

A request is stored when it says `store: true`, or says nothing and `serve.store.by_default` is set. Its response id
is signed for the caller's key (`crlft.data.store.response_id`), so that feedback on it is accepted from that key
only. Once the answer is complete the replica queues one row per choice; a background task writes the queue every
`serve.store.flush_s` on a worker thread. Storing never delays or fails an answer: rows that find the queue full, or
whose write fails, are dropped, counted (crlft_store_dropped_completions_total) and warned about once per run of
failures. What is queued is written when the replica shuts down.

Feedback (POST /v1/feedback) is written before it is answered: the client learns whether it was kept.

Nothing of an API key reaches the store or the logs: rows carry `key_id`, a hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from crlft.config import StoreConfig
from crlft.data.records import Message
from crlft.data.store import id_belongs, key_id, read_secret, response_id, write_completions, write_feedback
from crlft.inference.sampling import Completion
from services import protocol
from services.metrics import metrics
from services.protocol import ApiError

if TYPE_CHECKING:
    from services.served_model import Served

logger = logging.getLogger("ray.serve")

RETRY_AFTER_S = 1


class Recorder:
    """A replica's completions waiting to be written: a bounded queue that a background task writes every `flush_s`
    through a worker thread. Never in a request's way: rows beyond `capacity`, and rows whose write fails, are
    dropped and counted."""

    def __init__(self, root: str, capacity: int, flush_s: float) -> None:
        self.root = root
        self.capacity = capacity
        self.flush_s = flush_s
        self._rows: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._warned: set[str] = set()  # reasons warned about in the current run of drops

    @property
    def queued(self) -> int:
        return len(self._rows)

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        """Queue a request's rows, all or none (called on the event loop)."""
        if len(self._rows) + len(rows) > self.capacity:
            self._drop(len(rows), "queue_full", f"{self.capacity} completions are already waiting to be written")
            return
        self._warned.discard("queue_full")
        self._rows.extend(rows)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.flush_s)
            await self.flush()
            if self._closing.is_set() or not self._rows:
                return  # the next `add` starts the task again

    async def flush(self) -> None:
        rows, self._rows = self._rows, []
        if not rows:
            return
        try:
            await asyncio.to_thread(write_completions, self.root, rows)
        except Exception as exc:
            self._drop(len(rows), "write_failed", f"writing to {self.root} failed: {type(exc).__name__}: {exc}")
            return
        metrics().stored.inc(len(rows))
        if "write_failed" in self._warned:
            self._warned.discard("write_failed")
            logger.warning("stored completions: writing to %s works again", self.root)

    async def close(self) -> None:
        """Write what is queued (the replica is shutting down)."""
        self._closing.set()
        task = self._task
        if task is not None and not task.done():
            await task
        await self.flush()

    def _drop(self, count: int, reason: str, why: str) -> None:
        metrics().store_dropped.labels(reason).inc(count)
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning("stored completions: %d dropped, %s; further drops are counted in "
                           "crlft_store_dropped_completions_total{reason=%r}", count, why, reason)


@dataclass(frozen=True)
class Ticket:
    """A request to be stored: what is known of it before it is answered."""

    id: str
    created: float
    model: str
    condition: str
    system: str
    messages: str
    metadata: str
    key_id: str

    def rows(self, model: Served, prompt_tokens: int, completions: Sequence[Completion]) -> list[dict[str, Any]]:
        """One row per choice (crlft.data.store.COMPLETION_SCHEMA)."""
        return [{
            "id": self.id, "choice": i, "created": self.created, "model": self.model,
            "model_version": model.version, "revision": model.revision, "condition": self.condition,
            "system": self.system, "messages": self.messages, "answer": c.text,
            "finish_reason": protocol.finish_reason(c), "prompt_tokens": prompt_tokens,
            "completion_tokens": c.completion_tokens, "metadata": self.metadata, "key_id": self.key_id,
        } for i, c in enumerate(completions)]


class CompletionStore:
    """A replica's side of the completion store (`serve.store`); disabled when it has no `uri`. The store must have
    been opened (`crlft.data.store.open_store`) where the deployment was built."""

    def __init__(self, cfg: StoreConfig) -> None:
        self.uri = cfg.uri
        self.by_default = cfg.by_default
        self._secret = read_secret(cfg.uri) if cfg.uri else b""
        self.recorder = Recorder(cfg.uri, cfg.queue, cfg.flush_s) if cfg.uri else None

    @property
    def enabled(self) -> bool:
        return self.uri is not None

    def ticket(self, asked: bool | None, api_key: str | None, model: str, condition: str, system: str,
               turns: Sequence[Message], metadata: Mapping[str, str] | None) -> Ticket | None:
        """The request's ticket when it is to be stored, else None; `store: true` without a store is a 400."""
        if asked and not self.enabled:
            raise ApiError(400, "store: this deployment keeps no completions; set serve.store.uri (a folder or "
                           "s3:// URI) to enable storing", param="store", code="store_disabled")
        if not self.enabled or not (self.by_default if asked is None else asked):
            return None
        key = key_id(api_key)
        return Ticket(id=response_id(self._secret, key), created=time.time(), model=model, condition=condition,
                      system=system, messages=json.dumps([{"role": t.role, "content": t.content} for t in turns],
                                                         ensure_ascii=False),
                      metadata=json.dumps(dict(metadata or {}), ensure_ascii=False, sort_keys=True), key_id=key)

    def record(self, ticket: Ticket, model: Served, prompt_tokens: int, completions: Sequence[Completion]) -> None:
        if self.recorder is not None:
            self.recorder.add(ticket.rows(model, prompt_tokens, completions))

    async def close(self) -> None:
        if self.recorder is not None:
            await self.recorder.close()

    async def feedback(self, raw: bytes, api_key: str | None) -> dict[str, Any]:
        """Validate and write one feedback row; the answer to POST /v1/feedback."""
        if self.uri is None:
            raise ApiError(400, "this deployment keeps no completions, so it takes no feedback; set serve.store.uri "
                           "to enable both", code="store_disabled")
        body = protocol.parse_feedback(raw)
        key = key_id(api_key)
        if not id_belongs(self._secret, body.id, key):  # unknown ids and other keys' ids are answered alike
            raise ApiError(404, f"no stored response {body.id!r}", param="id", code="response_not_found")
        row = {"id": body.id, "choice": body.choice, "created": time.time(), "rating": body.rating or 0,
               "correction": body.correction, "comment": body.comment, "key_id": key}
        try:
            await asyncio.to_thread(write_feedback, self.uri, [row])
        except Exception as exc:
            logger.warning("feedback: writing to %s failed: %s: %s", self.uri, type(exc).__name__, exc)
            raise ApiError(503, "the feedback could not be stored; retry shortly", type="server_error",
                           code="store_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        metrics().feedback.inc()
        return {"object": "chat.completion.feedback", "id": body.id, "choice": body.choice, "rating": body.rating,
                "correction": body.correction is not None, "comment": body.comment is not None, "stored": True}


async def read_limited(request: Request, limit: int) -> bytes:
    """The request's body, or an OpenAI-shaped 413 as soon as it is known to exceed `limit` bytes (the declared
    length is checked first, the bytes received always)."""
    too_large = ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
