"""The OpenAI-compatible chat endpoint on Ray Serve: `services.chat:app`, `services.chat:build_app`.

One deployment (`ChatServer`, a FastAPI ingress) per application. Each replica loads the model once into an engine
(crlft/inference/engine.py: vLLM where installed for the device, else crlft's transformers engine); requests that arrive
together are generated together, streamed or not. Prompts are built by the model's own TemplateTokenizer (the one
template), and the `condition` field chooses the class written into them.

Routes: POST /v1/chat/completions, POST /v1/feedback (on stored completions: services/store.py), GET /v1/models,
GET /v1/models/{id}, GET /healthz (alive), GET /readyz (model loaded, engine running or restarting), GET /metrics
(Prometheus text, this replica's counters). `/` is the chat page.
Every answer names the replica that gave it in the `X-Crlft-Replica` header (Serve's replica id).

Overload: a replica admits at most `serve.max_ongoing_requests + serve.max_queued_requests` chat requests (being
generated or waiting for the engine); beyond that it answers at once with an OpenAI-shaped 429 and `Retry-After`,
so a client never waits on an unbounded queue. Serve's own limit sits a little above it, for the probes; a model
still loading is a 503 with `Retry-After`.

Following the registry: the model is the deployment's `user_config` {"model": URI, "watch_s": S}. A replica serving
`models:/NAME@ALIAS` looks the alias up every S seconds and, when it moved, loads the new version next to the old
one, sends new requests to it and lets the old engine finish what it holds (nothing in flight is dropped). Changing
`user_config` (a Serve config update, KubeRay serveConfigV2) swaps the same way without restarting replicas;
deploying again is a rolling redeploy (new replicas start before old ones drain).

Faults: when a replica's engine dies (vLLM's engine core killed, out of memory, a kernel fault), the replica starts
the same model again in place. Requests of which nothing was sent yet (plain ones, streams before their first piece)
run again on the new engine, once; the requests that reach the replica meanwhile wait for it. Streams already under
way end with an OpenAI-shaped error event and `[DONE]` (a plain request that fails again: an OpenAI-shaped 503 with
Retry-After). An engine that cannot be started again, or dies again soon after its restart, makes the replica report
itself unhealthy, so that Serve replaces it. A replica whose process dies is replaced by Serve; its requests end with
the closed connection.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures (e.g. `request: Request`) at runtime.
import asyncio
import contextlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crlft.completions import open_store
from crlft.config import Config, ServeConfig, load_config
from crlft.environ import OFFLINE_ENV, set_offline_defaults
from crlft.errors import CrlftError
from crlft.inference.engine import EngineSettings, Event, Generation
from crlft.inference.sampling import Completion, ContextExceeded, SamplingParams, answer_budget
from crlft.lineage.versions import champion_uri
from crlft.storage import folder_revision, location
from services import protocol
from services.metrics import RequestCounter, metrics
from services.models import LoadedModel, default_watch_s, load_model, resolve_model_uri, served_name
from services.page import add_chat_page
from services.protocol import MAX_FEEDBACK_BYTES, ApiError
from services.store import CompletionStore, Ticket, read_limited

logger = logging.getLogger("ray.serve")

APP_NAME = "crlft-chat"
DEPLOYMENT_NAME = "ChatServer"
ENV_MODEL = "CRLFT_MODEL"
ENV_CONFIG = "CRLFT_CONFIG"
ENV_API_KEYS = "CRLFT_API_KEYS"  # comma-separated; the way to give keys to a Serve config / KubeRay (a Secret)
RETRY_AFTER_S = 1
PROBE_HEADROOM = 8  # requests Serve lets through beyond the chat admission limit: probes and /v1/models
BURST_FACTOR = 4  # Serve's router queue holds this many replicas' worth of requests while it assigns them
STREAM_INTERVAL_S = 0.05  # streamed text is sent in pieces at most this often (the first piece at once) ...
STREAMS_PER_INTERVAL = 8  # ... while a replica holds up to this many requests; beyond, the interval grows with them
MAX_STREAM_INTERVAL_S = 0.25
GRACEFUL_SHUTDOWN_S = 120.0  # a replica being replaced finishes its requests for up to this long
# A restarted engine that dies again within this long is a fault of the replica (its process, node or memory), not a
# one-off: no second restart in place, Serve replaces the replica.
MIN_ENGINE_LIFETIME_S = 60.0
# A request waits this long at most for an engine being restarted (a vLLM start), then gets a 503 with Retry-After.
RESTART_WAIT_S = 120.0
REPLICA_HEADER = "x-crlft-replica"
REPLICA_ENV = {
    # The replica's event loop runs this code too (Serve's default is a second loop on its own thread): a streamed
    # piece then crosses no thread on its way out (the handlers never block the loop: models load and engines stop
    # on worker threads).
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}
BUILD_ARGS = ("model", "config", "overrides", "model_name", "api_keys", "watch_s", "tracking_uri")


def key_matches(token: str, keys: Sequence[bytes]) -> bool:
    """Constant-time comparison against every key (the time taken tells nothing about which, or how close)."""
    given = token.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key)
    return found


@dataclass(frozen=True)
class ChatSettings:
    """What a replica is built with (the model itself comes through user_config, so it can change in place)."""

    config: dict[str, Any]  # Config.dump() without API keys
    model_name: str
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    tracking_uri: str | None = None


fastapi_app = FastAPI(title="crlft chat", docs_url=None, redoc_url=None, openapi_url=None)
add_chat_page(fastapi_app)  # GET /: the chat page (before @serve.ingress, which freezes the routes)


@fastapi_app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@fastapi_app.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first["loc"][1:]) or None
    return JSONResponse(ApiError(400, f"{param or 'request'}: {first['msg']}", param=param).body(), status_code=400)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = f"{request.method} {request.url.path}: {exc.detail}"
    code = "not_found" if exc.status_code == 404 else None
    return JSONResponse(ApiError(exc.status_code, message, code=code).body(), status_code=exc.status_code)


@fastapi_app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error")
    error = ApiError(500, f"internal error: {type(exc).__name__}", type="server_error")
    return JSONResponse(error.body(), status_code=500)


fastapi_app.add_middleware(RequestCounter)


class ReplicaHeader:
    """ASGI middleware naming this replica (Serve's replica id) in every answer's headers: which replica gave an
    answer, for operators and for the fault tests."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.header: tuple[bytes, bytes] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.header is None:
            self.header = (REPLICA_HEADER.encode(), serve.get_replica_context().replica_id.unique_id.encode())

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_named)


fastapi_app.add_middleware(ReplicaHeader)


def admitted_per_replica(s: ServeConfig) -> int:
    """Chat requests a replica holds at once: generating or waiting for the engine."""
    return s.max_ongoing_requests + s.max_queued_requests


def stream_interval(requests_held: int) -> float:
    """How often a stream writes: every piece is a message through the ingress, which under load costs more than
    generating the tokens in it (through Serve's Python proxy most), so the more requests share the replica the longer
    the pieces."""
    return min(MAX_STREAM_INTERVAL_S, STREAM_INTERVAL_S * max(1.0, requests_held / STREAMS_PER_INTERVAL))


# Module-level helpers the replica class calls are defined before it: Serve pickles the class by value when it is
# decorated, with the module globals its methods use that exist at that moment.
def _unavailable(message: str, code: str) -> ApiError:
    return ApiError(503, message, type="server_error", code=code, headers={"Retry-After": str(RETRY_AFTER_S)})


async def _begin(model: LoadedModel, prompt: list[int], params: list[SamplingParams], stream: bool,
                 interval_s: float) -> tuple[Generation, list[Event], AsyncIterator[list[Event]]]:
    """Submit a request to the model's engine: its generation, the first batch of events, and the batches to come."""
    generation = model.engine.submit(prompt, params, stream)
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


def _replica_device() -> str:
    """A GPU if Ray gave this replica one (the engines then use bf16), else the CPU."""
    import ray
    import torch

    gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    return "cuda" if gpus and torch.cuda.is_available() else "cpu"


def _replica_threads() -> int:
    """One torch thread per whole CPU Ray gave this replica (at least one: fractional replicas share cores)."""
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)))


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(fastapi_app)
class ChatServer:
    def __init__(self, settings: ChatSettings) -> None:
        import torch

        set_offline_defaults()
        self.settings = settings
        self.cfg = Config.model_validate(settings.config)
        self._keys = [k.encode() for k in settings.api_keys]
        torch.set_num_threads(_replica_threads())
        self.engine_settings = EngineSettings.for_replica(self.cfg, _replica_device())
        self._capacity = admitted_per_replica(self.cfg.serve)
        self._admitted = 0
        self._model: LoadedModel | None = None
        self._retired: list[LoadedModel] = []  # replaced models still finishing their requests in flight
        self._watch_s = 0.0
        self._watch_task: asyncio.Task[None] | None = None
        self._swap_lock = asyncio.Lock()
        self._restart: asyncio.Task[None] | None = None  # a dead engine being started again (failed: kept, unhealthy)
        self._restarted_at: float | None = None
        self._store = CompletionStore(self.cfg.serve.store)

    async def __del__(self) -> None:
        """Serve awaits this when the replica shuts down (after its requests drained): write the stored completions
        still queued."""
        await self._store.close()

    # -- model lifecycle ------------------------------------------------------------------------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Called by Serve at start and whenever user_config changes: load the model if it changed."""
        source = str(user_config["model"])
        self._watch_s = float(user_config.get("watch_s") or 0.0)
        await self._load(source)
        if self._watch_s > 0 and (self._watch_task is None or self._watch_task.done()):
            self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    async def _load(self, source: str) -> bool:
        """Resolve `source`; if that is not what is loaded, load it and swap. Returns whether it swapped."""
        async with self._swap_lock:
            path = await asyncio.to_thread(resolve_model_uri, source, self.cfg, self.settings.tracking_uri)
            current = self._model
            if current is not None and current.source == source and current.revision == folder_revision(path):
                return False
            self._install(await asyncio.to_thread(load_model, source, path, self.engine_settings))
            return True

    def _install(self, new: LoadedModel) -> None:
        """Send new requests to `new`; the model it replaces finishes its requests in flight, then frees its engine."""
        current, self._model = self._model, new
        m = metrics()
        if current is not None:
            current.engine.drain()
            self._retired.append(current)
            m.model.remove(self.settings.model_name, current.revision, current.engine.kind)
        m.model.labels(self.settings.model_name, new.revision, new.engine.kind).set(1)
        logger.info("serving %s from %s (revision %s, %s engine)", self.settings.model_name, new.path, new.revision,
                    new.engine.kind)

    async def _watch(self) -> None:
        while self._watch_s > 0:
            await asyncio.sleep(self._watch_s)
            model = self._model
            if model is None:
                continue
            try:
                await self._load(model.source)
            except Exception as exc:  # the registry may be briefly unreachable: keep serving what is loaded
                logger.warning("could not check %s for a new version: %s", model.source, exc)

    def _restarting(self) -> asyncio.Task[None] | None:
        """Where the engine has died: its restart in place, begun by whichever caller finds it dead first (a request,
        a probe, Serve's health check). None while the engine is alive."""
        model = self._model
        if model is None or model.engine.alive():
            return None
        if self._restart is None:
            self._restart = asyncio.get_running_loop().create_task(self._restart_engine(model))
        return self._restart

    async def _restart_engine(self, dead: LoadedModel) -> None:
        if self._restarted_at is not None and time.monotonic() - self._restarted_at < MIN_ENGINE_LIFETIME_S:
            raise RuntimeError(f"the {dead.engine.kind} engine died again within {MIN_ENGINE_LIFETIME_S:.0f} s of its "
                               "restart")
        logger.error("the %s engine stopped: starting %s again", dead.engine.kind, dead.path)
        async with self._swap_lock:
            if self._model is dead:  # else a new model was swapped in meanwhile
                self._install(await asyncio.to_thread(load_model, dead.source, dead.path, self.engine_settings))
        self._restarted_at = time.monotonic()
        self._restart = None

    async def check_health(self) -> None:
        """Serve replaces a replica whose engine died and could not be started again (a dead engine is restarted in
        place first: faster than a new replica, and no request fails meanwhile)."""
        restart = self._restarting()
        if restart is not None and restart.done():
            raise RuntimeError(f"the generation engine stopped and could not be restarted: {restart.exception()}")

    def _ready_model(self) -> LoadedModel:
        """The model, unless this replica cannot answer: still loading, or its engine could not be restarted. A dead
        engine being restarted counts as ready: requests wait for it (`_serving_model`)."""
        restart = self._restarting()
        model = self._model
        if model is None:
            raise _unavailable("the model is loading; retry shortly", "model_loading")
        if restart is not None and restart.done():
            raise _unavailable("the model's engine stopped and could not be restarted; retry shortly",
                               "engine_unavailable")
        return model

    async def _serving_model(self) -> LoadedModel:
        """The model to generate with: where its engine died, after its restart (at most RESTART_WAIT_S)."""
        restart = self._restarting()
        if restart is not None:
            with contextlib.suppress(Exception):  # too slow or failed: answered below
                await asyncio.wait_for(asyncio.shield(restart), RESTART_WAIT_S)
        model = self._ready_model()
        if not model.engine.alive():
            raise _unavailable("the model's engine is being restarted; retry shortly", "engine_unavailable")
        return model

    def _generation_failed(self, model: LoadedModel, failed: Completion) -> ApiError:
        """A generation's error: a 503 to retry when its engine died under it (it is being restarted), else a 500."""
        if not model.engine.alive():
            return _unavailable(f"the model's engine stopped while generating ({failed.error}); retry shortly",
                                "engine_unavailable")
        return ApiError(500, failed.error or "generation failed", type="server_error")

    def _authorize(self, request: Request) -> str | None:
        """The caller's API key (None on an endpoint without keys), or a 401."""
        if not self._keys:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "no API key given: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not key_matches(token.strip(), self._keys):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")
        return token.strip()

    def _admit(self) -> Callable[[], None]:
        """Take one chat request, or refuse it at once when the replica is full. Returns its (idempotent) release."""
        if self._admitted >= self._capacity:
            metrics().rejected.inc()
            raise ApiError(429, f"the server is full ({self._capacity} requests in progress or waiting); retry in "
                           f"{RETRY_AFTER_S} s", type="rate_limit_error", code="server_overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        self._admitted += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._admitted -= 1

        return release

    def _model_card(self, model: LoadedModel) -> dict[str, Any]:
        return protocol.model_card(self.settings.model_name, model.loaded_at, {
            "revision": model.revision,
            "source": model.source,
            "engine": model.engine.kind,
            "conditions": sorted(model.engine.meta.conditions),
            "inference_condition": model.engine.meta.inference_condition,
            "context_length": model.engine.context_len,
            "store": self._store.enabled,  # whether requests may ask `store: true` (and give feedback)
            "store_by_default": self._store.enabled and self._store.by_default,
        })

    # -- routes ---------------------------------------------------------------------------------------------------
    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @fastapi_app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        model = self._ready_model()
        self._retired = [m for m in self._retired if m.engine.alive()]
        running, waiting = model.engine.counts()
        return JSONResponse({
            "status": "ready" if model.engine.alive() else "restarting",  # requests wait for a restarting engine
            "model": self.settings.model_name,
            "revision": model.revision,
            "engine": model.engine.kind,
            "running": running,
            "waiting": waiting,
            # sequences still being generated by models this replica has replaced
            "retiring": sum(sum(m.engine.counts()) for m in self._retired),
        })

    @fastapi_app.get("/metrics")
    async def metrics_text(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        m = metrics()
        if self._model is not None:
            running, waiting = self._model.engine.counts()
            m.running.set(running)
            m.waiting.set(waiting)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @fastapi_app.post("/v1/feedback")
    async def feedback(self, request: Request) -> dict[str, Any]:
        """A rating, a better answer or a comment on a stored completion of the caller's (services/store.py)."""
        api_key = self._authorize(request)
        return await self._store.feedback(await read_limited(request, MAX_FEEDBACK_BYTES), api_key)

    @fastapi_app.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list", "data": [self._model_card(self._ready_model())]}

    @fastapi_app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request) -> dict[str, Any]:
        self._authorize(request)
        model = self._ready_model()
        self._check_model_name(model_id)
        return self._model_card(model)

    def _check_model_name(self, name: str) -> None:
        if name != self.settings.model_name:
            raise ApiError(404, f"the model {name!r} does not exist: this server serves {self.settings.model_name!r}",
                           param="model", code="model_not_found")

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        started = time.perf_counter()
        api_key = self._authorize(request)
        body = protocol.parse_request(await request.body())
        # From the model's choice to the submission there is no await: the model chosen is the model used.
        model = await self._serving_model()
        self._check_model_name(body.model)
        meta = model.engine.meta
        condition = body.condition or meta.inference_condition
        if condition not in meta.conditions:
            raise ApiError(400, f"unknown condition {condition!r}: this model knows {', '.join(meta.conditions)}",
                           param="condition", code="invalid_condition")
        system, turns = protocol.to_conversation(body.messages)
        ticket = self._store.ticket(body.store, api_key, self.settings.model_name, condition, system, turns,
                                    body.metadata)
        cid = ticket.id if ticket else protocol.completion_id()
        prompt = model.engine.template_tokenizer.tokenize_prompt(turns, condition, system)
        try:
            answer_budget(len(prompt), 1, model.engine.context_len)
        except ContextExceeded as exc:
            raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
        release = self._admit()
        try:
            model, generation, batches = await self._generate(model, prompt,
                                                              body.sampling(self.cfg.serve.max_new_tokens), body.stream)
        except BaseException:
            release()
            raise
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(model, generation, batches, include_usage, started, release, cid,
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
            raise self._generation_failed(model, failed[0])
        answer = protocol.chat_completion(cid, self.settings.model_name, model.fingerprint,
                                          generation.prompt_tokens, completions)
        self._record(model, generation, completions, started, False, ticket)
        return JSONResponse(answer)

    async def _generate(self, model: LoadedModel, prompt: list[int], params: list[SamplingParams], stream: bool
                        ) -> tuple[LoadedModel, Generation, AsyncIterator[list[Event]]]:
        """Submit, and wait for the first events. Where they say that the engine died, nothing of the answer has
        reached the client yet: the request runs again, once, on the restarted engine (waiting for it as a new request
        does). An engine's death then fails only the answers that were partly sent."""
        interval = stream_interval(self._admitted) if stream else 0.0
        generation, first, batches = await _begin(model, prompt, params, stream, interval)
        if _failed(first) and not model.engine.alive():
            generation.cancel()  # its other choices, if any
            model = await self._serving_model()
            generation, first, batches = await _begin(model, prompt, params, stream, interval)
        return model, generation, _chained(first, batches)

    async def _stream(self, model: LoadedModel, generation: Generation, batches: AsyncIterator[list[Event]],
                      include_usage: bool, started: float, release: Callable[[], None], cid: str,
                      ticket: Ticket | None) -> AsyncIterator[str]:
        created, name = int(time.time()), self.settings.model_name
        fingerprint = model.fingerprint
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
                        error = self._generation_failed(model, item)
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
            self._record(model, generation, completions, started, True, ticket)
        finally:
            generation.cancel()
            release()

    def _record(self, model: LoadedModel, generation: Generation, completions: list[Completion], started: float,
                stream: bool, ticket: Ticket | None) -> None:
        """Count a complete answer; queue it for the store when it is to be stored (never waiting on the store)."""
        if ticket is not None:
            self._store.record(ticket, model, generation.prompt_tokens, completions)
        m = metrics()
        m.latency.labels(str(stream).lower()).observe(time.perf_counter() - started)
        m.prompt_tokens.inc(generation.prompt_tokens)
        m.completion_tokens.inc(sum(c.completion_tokens for c in completions))


# ---------------------------------------------------------------------------------------------------------------------
# Building the application


def api_keys_from_env() -> list[str]:
    return [k.strip() for k in os.environ.get(ENV_API_KEYS, "").split(",") if k.strip()]


def chat_application(model: str, cfg: Config, *, api_keys: Sequence[str] = (), model_name: str | None = None,
                     watch_s: float | None = None, tracking_uri: str | None = None) -> Application:
    """The Serve application for `model` (a folder or models:/ URI), with the options of `cfg.serve`."""
    s = cfg.serve
    keys = tuple(dict.fromkeys([*s.api_keys, *api_keys]))
    # Replicas may run elsewhere (another cwd, another node): state paths must not be relative.
    public = cfg.model_copy(deep=True)
    public.state_dir = str(Path(cfg.state_dir).resolve())
    public.serve.api_keys = []
    if s.store.uri:  # made a store here, once, before the replicas read its secret
        public.serve.store.uri = location(s.store.uri)
        open_store(public.serve.store.uri)
    settings = ChatSettings(
        config=public.dump(),
        model_name=served_name(model, cfg, model_name),
        api_keys=keys,
        tracking_uri=tracking_uri or cfg.registry.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
    )
    env = {key: os.environ.get(key, value) for key, value in (OFFLINE_ENV | REPLICA_ENV).items()}
    deployment = ChatServer.options(
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica,
                           "runtime_env": {"env_vars": env}},
        autoscaling_config={
            "min_replicas": s.min_replicas,
            "initial_replicas": max(1, s.min_replicas),
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.downscale_delay_s,
            "look_back_period_s": s.autoscaling_window_s,
            "metrics_interval_s": min(10.0, s.autoscaling_window_s / 3),
        },
        # The replica admits max_ongoing + max_queued chat requests itself (and answers 429 beyond): Serve lets
        # that many through, plus room for probes. Serve's own queue only holds a burst while its router assigns
        # it (refused requests leave at once); overflowing it is the last resort, Serve's plain-text 503.
        max_ongoing_requests=admitted_per_replica(s) + PROBE_HEADROOM,
        max_queued_requests=BURST_FACTOR * admitted_per_replica(s),
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
        user_config={"model": model, "watch_s": default_watch_s(model) if watch_s is None else watch_s},
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
        max_surge_percent=100,  # a redeploy starts the new replicas before the old ones stop
        max_constructor_retry_count=3,
        logging_config={"enable_access_log": s.access_log},
    )
    return deployment.bind(settings)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Application builder for Serve configs and KubeRay serveConfigV2 (`import_path: services.chat:build_app`).

    args (all optional): model (folder or models:/ URI; default $CRLFT_MODEL, else the config's champion),
    config (crlft YAML; default $CRLFT_CONFIG), overrides ({"serve.max_replicas": 4, "serve.engine": "vllm", ...}),
    model_name, api_keys (prefer $CRLFT_API_KEYS from a secret), watch_s, tracking_uri (default
    $MLFLOW_TRACKING_URI / the config)."""
    args = dict(args or {})
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown:
        raise CrlftError(f"services.chat:build_app: unknown args {unknown}; known: {', '.join(BUILD_ARGS)}")
    cfg = load_config(args.get("config") or os.environ.get(ENV_CONFIG) or None, args.get("overrides") or {})
    model = str(args.get("model") or os.environ.get(ENV_MODEL) or champion_uri(cfg))
    keys = [*(args.get("api_keys") or []), *api_keys_from_env()]
    watch_s = args.get("watch_s")
    return chat_application(model, cfg, api_keys=keys, model_name=args.get("model_name"),
                            watch_s=None if watch_s is None else float(watch_s), tracking_uri=args.get("tracking_uri"))


def __getattr__(name: str) -> Any:
    # `services.chat:app` (import path for Serve configs), built from the environment only when asked for.
    if name == "app":
        return build_app({})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
