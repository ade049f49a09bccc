"""The OpenAI-compatible chat endpoint on Ray Serve: `services.chat:app`, `services.chat:build_app`, `deploy`.

One deployment (`ChatServer`, a FastAPI ingress) per application. Each replica loads the model once and runs the
continuous-batching engine (crlft.generate) on its own thread, so requests that arrive together are generated
together, streamed or not. Prompts are built by the model's own TemplateTokenizer (the one template).

Routes: POST /v1/chat/completions, GET /v1/models, GET /v1/models/{id}, GET /healthz (alive), GET /readyz (model
loaded, engine running), GET /metrics (Prometheus text, this replica's counters). `/` is left for the chat page.

Overload: each replica takes at most `serve.max_ongoing_requests` requests; each proxy queues at most
`serve.max_queued_requests` more; beyond that Serve answers 503 with `Retry-After` at once (its own plain-text
body: the request never reaches a replica), so a client never waits on an unbounded queue.

Following the registry: the model is the deployment's `user_config` {"model": URI, "watch_s": S}. A replica serving
`models:/NAME@ALIAS` looks the alias up every S seconds and, when it moved, loads the new version next to the old
one, sends new requests to it and lets the old engine finish what it holds (nothing in flight is dropped). Changing
`user_config` (a Serve config update, KubeRay serveConfigV2) swaps the same way without restarting replicas;
calling `deploy` again is a rolling redeploy (new replicas start before old ones drain).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures (e.g. `request: Request`) at runtime.
import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import signal
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from crlft.config import Config, load_config
from crlft.errors import CrlftError
from crlft.export import ModelMeta, load_exported
from crlft.generate import BatchGenerator, Completion, EngineLoop, GenerationRequest, SamplingParams
from crlft.registry import MODELS_SCHEME, champion_uri, parse_model_uri, resolve_model
from crlft.template import TemplateTokenizer
from crlft.tracking import OFFLINE_ENV, set_offline_defaults
from jobs.session import start_ray
from services import protocol
from services.page import add_chat_page
from services.protocol import ApiError

logger = logging.getLogger("ray.serve")

APP_NAME = "crlft-chat"
DEPLOYMENT_NAME = "ChatServer"
ENV_MODEL = "CRLFT_MODEL"
ENV_CONFIG = "CRLFT_CONFIG"
ENV_API_KEYS = "CRLFT_API_KEYS"  # comma-separated; the way to give keys to a Serve config / KubeRay (a Secret)
RETRY_AFTER_S = 1.0
STREAM_INTERVAL_S = 0.05  # streamed text is sent in pieces at most this often (the first piece at once)
CHAMPION_WATCH_S = 30.0  # how often a replica serving models:/NAME@ALIAS checks whether the alias moved
GRACEFUL_SHUTDOWN_S = 120.0  # a replica being replaced finishes its requests for up to this long
BUILD_ARGS = ("model", "config", "overrides", "model_name", "api_keys", "watch_s", "tracking_uri")


# ---------------------------------------------------------------------------------------------------------------------
# Models: where they come from, what revision is loaded


def resolve_model_uri(uri: str, cfg: Config, tracking_uri: str | None = None) -> Path:
    """A local model folder for a folder path or a registered model (`models:/NAME@ALIAS`, `models:/NAME/VERSION`,
    downloaded once into the registry cache)."""
    if uri.startswith(MODELS_SCHEME):
        return Path(resolve_model(uri, cfg, tracking_uri=tracking_uri))
    path = Path(uri).expanduser()
    if not (path / "config.json").is_file():
        raise CrlftError(
            f"no model at {uri}: give a folder written by `crlft train` (with config.json) or a registered model "
            "as models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    return path


def model_revision(path: Path) -> str:
    """Identifies what is loaded: the folder's real path and its files' sizes and modification times (a registry
    version has its own cache folder; a folder re-exported in place changes its files)."""
    real = path.resolve()
    digest = hashlib.sha256(str(real).encode())
    for f in sorted(real.iterdir()):
        if f.is_file():
            stat = f.stat()
            digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def served_name(uri: str, cfg: Config, override: str | None = None) -> str:
    """The name clients put in `model`: stable across champion changes (the registered name, not the version)."""
    if override or cfg.serve.model_name:
        return str(override or cfg.serve.model_name)
    if uri.startswith(MODELS_SCHEME):
        return parse_model_uri(uri).name
    return Path(uri).expanduser().resolve().name


def default_watch_s(uri: str) -> float:
    """Aliases move, versions and folders do not: only `models:/NAME@ALIAS` is watched by default."""
    return CHAMPION_WATCH_S if uri.startswith(MODELS_SCHEME) and "@" in uri else 0.0


@dataclass
class LoadedModel:
    """One model and its running engine inside a replica."""

    source: str
    path: Path
    revision: str
    meta: ModelMeta
    template_tokenizer: TemplateTokenizer
    loop: EngineLoop
    context_len: int
    loaded_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def fingerprint(self) -> str:
        return f"crlft-{self.revision}"


def load_model(source: str, path: Path, cfg: Config, device: str) -> LoadedModel:
    exported = load_exported(path, dtype=torch.bfloat16 if device.startswith("cuda") else None)
    model = exported.model.to(device)
    tokenizer = exported.tokenizer
    eos = model.generation_config.eos_token_id
    stop_ids = {exported.template_tokenizer.eot_id, *([eos] if isinstance(eos, int) else eos or [])}
    context_len = int(min(getattr(model.config, "max_position_embeddings", 2048),
                          getattr(tokenizer, "model_max_length", 10**9)))
    engine = BatchGenerator(model, tokenizer, sorted(stop_ids), max_batch_size=cfg.serve.max_batch_size,
                            context_len=context_len)
    loop = EngineLoop(engine, batch_wait_s=cfg.serve.batch_wait_timeout_s)
    return LoadedModel(source, path, model_revision(path), exported.meta, exported.template_tokenizer, loop,
                       context_len)


def key_matches(token: str, keys: Sequence[bytes]) -> bool:
    """Constant-time comparison against every key (the time taken tells nothing about which, or how close)."""
    given = token.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key)
    return found


# ---------------------------------------------------------------------------------------------------------------------
# Metrics (one registry per replica process)


class _Metrics:
    ROUTES = ("/v1/chat/completions", "/v1/models", "/healthz", "/readyz", "/metrics")

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.requests = Counter("crlft_requests", "HTTP requests by route and status code", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("crlft_request_latency_seconds", "chat completion latency, to the last token",
                                 ["stream"], buckets=buckets, registry=self.registry)
        self.ttft = Histogram("crlft_time_to_first_token_seconds", "streamed: time to the first text",
                              buckets=buckets, registry=self.registry)
        self.prompt_tokens = Counter("crlft_prompt_tokens", "prompt tokens of served requests",
                                     registry=self.registry)
        self.completion_tokens = Counter("crlft_completion_tokens", "generated tokens of served requests",
                                         registry=self.registry)
        self.running = Gauge("crlft_running_sequences", "sequences in the decoding batch", registry=self.registry)
        self.waiting = Gauge("crlft_waiting_sequences", "sequences waiting for a batch slot", registry=self.registry)
        self.model = Gauge("crlft_model_info", "the loaded model (value 1)", ["name", "revision"],
                           registry=self.registry)

    def route(self, path: str) -> str:
        return path if path in self.ROUTES or path.startswith("/v1/models/") else "other"


_metrics: _Metrics | None = None


def metrics() -> _Metrics:
    global _metrics
    if _metrics is None:
        _metrics = _Metrics()
    return _metrics


# ---------------------------------------------------------------------------------------------------------------------
# The deployment


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


@fastapi_app.middleware("http")
async def _count(request: Request, call_next: Any) -> Response:
    response = await call_next(request)
    metrics().requests.labels(metrics().route(request.url.path), str(response.status_code)).inc()
    return response


class _Generation:
    """The choices of one chat request in the engine, as an async stream of (choice index, text | Completion).

    Submitted at construction (synchronously, so a model swap cannot slip between choosing the model and
    submitting). The engine thread appends events to a deque and wakes the event loop only when no wake-up is
    pending: one wake-up per batch of tokens, not one per token."""

    def __init__(self, model: LoadedModel, prompt: list[int], params: list[SamplingParams], stream: bool) -> None:
        self.model = model
        self.prompt_tokens = len(prompt)
        self._events: deque[tuple[int, str | Completion]] = deque()
        self._ready = asyncio.Event()
        self._wake_pending = False
        loop = asyncio.get_running_loop()

        def post(item: tuple[int, str | Completion]) -> None:
            self._events.append(item)
            if not self._wake_pending:
                self._wake_pending = True
                with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening any more
                    loop.call_soon_threadsafe(self._ready.set)

        self.requests = [
            GenerationRequest(
                prompt,
                p,
                on_text=(lambda text, i=i: post((i, text))) if stream else None,
                on_finish=lambda c, i=i: post((i, c)),
            )
            for i, p in enumerate(params)
        ]
        for r in self.requests:
            model.loop.submit(r)

    async def events(self) -> AsyncIterator[tuple[int, str | Completion]]:
        async for batch in self.event_batches():
            for event in batch:
                yield event

    async def event_batches(self, interval_s: float = 0.0) -> AsyncIterator[list[tuple[int, str | Completion]]]:
        """Everything that has arrived, in order, as one list, at most once per `interval_s` after the first (which
        goes at once: time to first token). Consecutive pieces of text of the same choice are joined."""
        pending = len(self.requests)
        last: float | None = None
        while pending:
            await self._ready.wait()
            if last is not None and (wait := last + interval_s - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            last = time.monotonic()
            # Clear before draining: an event appended from here on schedules a new wake-up.
            self._ready.clear()
            self._wake_pending = False
            joined: list[tuple[int, str | Completion]] = []
            while self._events:
                index, item = self._events.popleft()
                pending -= isinstance(item, Completion)
                if joined and isinstance(item, str) and joined[-1][0] == index and isinstance(joined[-1][1], str):
                    joined[-1] = (index, joined[-1][1] + item)
                else:
                    joined.append((index, item))
            if joined:
                yield joined

    async def completions(self) -> list[Completion]:
        done: dict[int, Completion] = {}
        async for index, item in self.events():
            if isinstance(item, Completion):
                done[index] = item
        return [done[i] for i in range(len(self.requests))]

    def cancel_unfinished(self) -> None:
        for r in self.requests:
            if not r.finished:
                self.model.loop.cancel(r)


def _replica_resources() -> tuple[str, int]:
    """(device, torch threads) from what Ray gave this replica: a GPU if it has one (bf16), and one thread per
    whole CPU (at least one: fractional replicas share cores)."""
    import ray

    context = ray.get_runtime_context()
    gpus = context.get_accelerator_ids().get("GPU", [])
    cpus = context.get_assigned_resources().get("CPU", 1.0)
    device = "cuda" if gpus and torch.cuda.is_available() else "cpu"
    return device, max(1, int(cpus))


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(fastapi_app)
class ChatServer:
    def __init__(self, settings: ChatSettings) -> None:
        set_offline_defaults()
        self.settings = settings
        self.cfg = Config.model_validate(settings.config)
        self._keys = [k.encode() for k in settings.api_keys]
        self.device, threads = _replica_resources()
        torch.set_num_threads(threads)
        self._model: LoadedModel | None = None
        self._retired: list[LoadedModel] = []  # replaced models still finishing their requests in flight
        self._watch_s = 0.0
        self._watch_task: asyncio.Task[None] | None = None
        self._swap_lock = asyncio.Lock()

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
            if current is not None and current.source == source and current.revision == model_revision(path):
                return False
            new = await asyncio.to_thread(load_model, source, path, self.cfg, self.device)
            self._model = new
            m = metrics()
            if current is not None:
                current.loop.drain()  # finishes its requests in flight, then its thread ends
                self._retired.append(current)
                m.model.remove(self.settings.model_name, current.revision)
            m.model.labels(self.settings.model_name, new.revision).set(1)
            logger.info("serving %s from %s (revision %s)", self.settings.model_name, new.path, new.revision)
            return True

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

    def check_health(self) -> None:
        """Serve restarts a replica whose engine thread is gone."""
        if self._model is not None and not self._model.loop.alive():
            raise RuntimeError("the generation engine stopped")

    def _ready_model(self) -> LoadedModel:
        model = self._model
        if model is None or not model.loop.alive():
            raise ApiError(503, "the model is loading; retry shortly", type="server_error", code="model_loading",
                           headers={"Retry-After": str(int(RETRY_AFTER_S))})
        return model

    def _authorize(self, request: Request) -> None:
        if not self._keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "no API key given: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not key_matches(token.strip(), self._keys):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    def _model_card(self, model: LoadedModel) -> dict[str, Any]:
        return protocol.model_card(self.settings.model_name, model.loaded_at, {
            "revision": model.revision,
            "source": model.source,
            "conditions": sorted(model.meta.conditions),
            "inference_condition": model.meta.inference_condition,
            "context_length": model.context_len,
        })

    # -- routes ---------------------------------------------------------------------------------------------------
    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @fastapi_app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        model = self._ready_model()
        self._retired = [m for m in self._retired if m.loop.alive()]
        return JSONResponse({
            "status": "ready",
            "model": self.settings.model_name,
            "revision": model.revision,
            "running": model.loop.engine.num_running,
            "waiting": model.loop.engine.num_waiting,
            # sequences still being generated by models this replica has replaced
            "retiring": sum(m.loop.engine.num_running + m.loop.engine.num_waiting for m in self._retired),
        })

    @fastapi_app.get("/metrics")
    async def metrics_text(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        m = metrics()
        if self._model is not None:
            m.running.set(self._model.loop.engine.num_running)
            m.waiting.set(self._model.loop.engine.num_waiting)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

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
        self._authorize(request)
        body = protocol.parse_request(await request.body())
        # From here to the submission there is no await: the model chosen is the model used.
        model = self._ready_model()
        self._check_model_name(body.model)
        condition = body.condition or model.meta.inference_condition
        if condition not in model.meta.conditions:
            raise ApiError(400, f"unknown condition {condition!r}: this model knows {', '.join(model.meta.conditions)}",
                           param="condition", code="invalid_condition")
        system, turns = protocol.to_conversation(body.messages)
        prompt = model.template_tokenizer.tokenize_prompt(turns, condition, system)
        if len(prompt) >= model.context_len:
            raise ApiError(400, f"the prompt is {len(prompt)} tokens; this model's context is {model.context_len}",
                           param="messages", code="context_length_exceeded")
        generation = _Generation(model, prompt, body.sampling(self.cfg.serve.max_new_tokens), body.stream)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(generation, include_usage, started), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            completions = await generation.completions()
        finally:
            generation.cancel_unfinished()  # the client went away (this task was cancelled)
        failed = [c for c in completions if c.finish_reason == "error"]
        if failed:
            raise ApiError(500, failed[0].error or "generation failed", type="server_error")
        self._record(generation, completions, started, stream=False)
        return JSONResponse(protocol.chat_completion(protocol.completion_id(), self.settings.model_name,
                                                     model.fingerprint, generation.prompt_tokens, completions))

    async def _stream(self, generation: _Generation, include_usage: bool, started: float) -> AsyncIterator[str]:
        cid, created, name = protocol.completion_id(), int(time.time()), self.settings.model_name
        fingerprint = generation.model.fingerprint
        done: list[Completion] = []
        first_text = True
        try:
            for i in range(len(generation.requests)):
                yield protocol.chunk(cid, created, name, fingerprint,
                                     [protocol.delta_choice(i, {"role": "assistant", "content": ""})])
            # One write per batch of events, at most every STREAM_INTERVAL_S: under load, a message per token
            # through the proxy costs more than generating the token.
            async for batch in generation.event_batches(STREAM_INTERVAL_S):
                events: list[str] = []
                for index, item in batch:
                    if isinstance(item, str):
                        if first_text:
                            metrics().ttft.observe(time.perf_counter() - started)
                            first_text = False
                        events.append(protocol.chunk(cid, created, name, fingerprint,
                                                     [protocol.delta_choice(index, {"content": item})]))
                    elif item.finish_reason == "error":
                        error = ApiError(500, item.error or "generation failed", type="server_error")
                        yield "".join(events) + protocol.sse(error.body())
                        return
                    else:
                        done.append(item)
                        events.append(protocol.chunk(cid, created, name, fingerprint,
                                                     [protocol.delta_choice(index, {}, protocol.finish_reason(item))]))
                yield "".join(events)
            if include_usage:
                usage = protocol.usage(generation.prompt_tokens, done)
                yield protocol.chunk(cid, created, name, fingerprint, [], usage)
            yield protocol.sse("[DONE]")
            self._record(generation, done, started, stream=True)
        finally:
            generation.cancel_unfinished()

    def _record(self, generation: _Generation, completions: list[Completion], started: float, stream: bool) -> None:
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
    settings = ChatSettings(
        config=public.dump(),
        model_name=served_name(model, cfg, model_name),
        api_keys=keys,
        tracking_uri=tracking_uri or cfg.registry.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
    )
    env = {key: os.environ.get(key, value) for key, value in OFFLINE_ENV.items()}
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
        },
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
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
    config (crlft YAML; default $CRLFT_CONFIG), overrides ({"serve.max_replicas": 4, ...}), model_name, api_keys
    (prefer $CRLFT_API_KEYS from a secret), watch_s, tracking_uri (default $MLFLOW_TRACKING_URI / the config)."""
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


# ---------------------------------------------------------------------------------------------------------------------
# Running it: local Ray + Serve


def public_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "", None) else ("[::1]" if host == "::" else host)
    return f"http://{shown}:{port}"


def wait_until_ready(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        time.sleep(0.25)
    raise CrlftError(f"the endpoint at {url} was not ready after {timeout_s:.0f} s ({last})")


def deploy(model: str, cfg: Config | None = None, blocking: bool = False, *, api_keys: Sequence[str] = (),
           model_name: str | None = None, watch_s: float | None = None, tracking_uri: str | None = None,
           address: str | None = None, name: str = APP_NAME, route_prefix: str = "/",
           timeout_s: float = 300.0) -> str:
    """Serve `model` (a folder or models:/ URI) on Ray Serve (local Ray unless `address`/$RAY_ADDRESS) and return
    the base URL once it answers (clients use URL + "/v1"). `blocking` serves until Ctrl-C / SIGTERM, then stops
    Serve. Calling it again with the same `name` redeploys (rolling, nothing in flight dropped)."""
    cfg = cfg or Config()
    set_offline_defaults()
    resolve_model_uri(model, cfg, tracking_uri)  # fail here, with a clear message, not in a replica retry loop
    started_ray, _ = start_ray(cfg, address)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    host, port = _http_address(cfg)
    app = chat_application(model, cfg, api_keys=api_keys, model_name=model_name, watch_s=watch_s,
                           tracking_uri=tracking_uri)
    try:
        serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    except RuntimeError as exc:
        raise CrlftError(f"deploying {model} failed: {exc}") from None
    url = public_url(host, port) + (route_prefix.rstrip("/") if route_prefix != "/" else "")
    wait_until_ready(url, timeout_s)
    if blocking:
        try:
            wait_for_interrupt()
        finally:
            shutdown(started_ray)
    return url


def _http_address(cfg: Config) -> tuple[str, int]:
    """Where Serve's proxy really listens: an already running Serve keeps its own HTTP options."""
    try:
        from ray.serve.context import _get_global_client

        options = _get_global_client().http_config
        return str(options.host), int(options.port)
    except Exception:  # private API: fall back to what was asked for
        return cfg.serve.host, cfg.serve.port


def wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def shutdown(shutdown_ray: bool = True) -> None:
    """Stop Serve (and Ray, when this process started it)."""
    import ray

    with contextlib.suppress(Exception):
        serve.shutdown()
    if shutdown_ray:
        ray.shutdown()
