"""The OpenAI-compatible chat endpoint on Ray Serve: `services.chat:app`, `services.chat:build_app`.

One deployment (`ChatServer`, a FastAPI ingress) per application. Each replica loads the model once into an engine
(crlft/inference/engine.py: vLLM where installed for the device, else crlft's transformers engine); requests that arrive
together are generated together, streamed or not. Prompts are built by the model's own TemplateTokenizer (the one
template), and the `condition` field chooses the class written into them.

Routes: POST /v1/chat/completions, POST /v1/feedback (on stored completions: services/store.py), GET /v1/models,
GET /v1/models/{id}, GET /healthz (alive), GET /readyz (model loaded, engine running or restarting), GET /metrics
(Prometheus text, this replica's counters). `/` is the chat page.
Every answer names the replica that gave it in the `X-Crlft-Replica` header (Serve's replica id).

The replica is put together from:
- services/api.py: the FastAPI app the routes below join (OpenAI-shaped errors, middleware, the API key check);
- services/serving.py: one chat completion (admission and the 429 beyond it, generation, plain or streamed answers);
- services/lifecycle.py: the model over time (the swap to a new version, the restart of a dead engine);
- services/served_model.py: which model, and how it is loaded; services/protocol.py: the OpenAI wire format.

Overload: a replica admits at most `serve.max_ongoing_requests + serve.max_queued_requests` chat requests (being
generated or waiting for the engine); beyond that it answers at once with an OpenAI-shaped 429 and `Retry-After`,
so a client never waits on an unbounded queue. Serve's own limit sits a little above it, for the probes; a model
still loading is a 503 with `Retry-After`.

Following the registry: the model is the deployment's `user_config` {"model": URI, "watch_s": S}; a replica serving
`models:/NAME@ALIAS` swaps to the alias's new version in place, and so does a changed `user_config`, dropping nothing
in flight (services/lifecycle.py). Deploying again is a rolling redeploy (new replicas start before old ones drain).

Faults: a dead engine is started again in place (services/lifecycle.py); requests of which nothing was sent yet run
again on it, once, and streams already under way end with an OpenAI-shaped error event (services/serving.py). An
engine that cannot be started again makes the replica report itself unhealthy, so that Serve replaces it. A replica
whose process dies is replaced by Serve; its requests end with the closed connection.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures (e.g. `request: Request`) at runtime.
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from crlft.config import Config, load_config
from crlft.data.store import open_store
from crlft.environ import OFFLINE_ENV, set_offline_defaults
from crlft.errors import CrlftError
from crlft.inference.engine import EngineSettings
from crlft.lineage.versions import champion_uri
from crlft.storage import location
from services import protocol
from services.api import RETRY_AFTER_S, authorize, fastapi_app
from services.lifecycle import ModelLifecycle
from services.metrics import metrics
from services.protocol import MAX_FEEDBACK_BYTES
from services.served_model import EVERY_CHAMPION, adapter_sources, default_watch_s, engine_model, served_name
from services.serving import ChatServing, admitted_per_replica
from services.store import CompletionStore, read_limited

APP_NAME = "crlft-chat"
DEPLOYMENT_NAME = "ChatServer"
ENV_MODEL = "CRLFT_MODEL"
ENV_CONFIG = "CRLFT_CONFIG"
ENV_API_KEYS = "CRLFT_API_KEYS"  # comma-separated; the way to give keys to a Serve config / KubeRay (a Secret)
PROBE_HEADROOM = 8  # requests Serve lets through beyond the chat admission limit: probes and /v1/models
BURST_FACTOR = 4  # Serve's router queue holds this many replicas' worth of requests while it assigns them
GRACEFUL_SHUTDOWN_S = 120.0  # a replica being replaced finishes its requests for up to this long
REPLICA_ENV = {
    # The replica's event loop runs this code too (Serve's default is a second loop on its own thread): a streamed
    # piece then crosses no thread on its way out (the handlers never block the loop: models load and engines stop
    # on worker threads).
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}
BUILD_ARGS = ("model", "config", "overrides", "model_name", "api_keys", "watch_s", "tracking_uri")


@dataclass(frozen=True)
class ChatSettings:
    """What a replica is built with (the model itself comes through user_config, so it can change in place)."""

    config: dict[str, Any]  # Config.dump() without API keys
    model_name: str
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    tracking_uri: str | None = None


# Module-level helpers the replica class calls are defined before it: Serve pickles the class by value when it is
# decorated, with the module globals its methods use that exist at that moment.
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
    """One replica: its routes, over the model it serves (`lifecycle`) and the chat completions it runs (`serving`)."""

    def __init__(self, settings: ChatSettings) -> None:
        import torch

        set_offline_defaults()
        self.settings = settings
        self.cfg = Config.model_validate(settings.config)
        self._keys = [k.encode() for k in settings.api_keys]
        torch.set_num_threads(_replica_threads())
        self.engine_settings = EngineSettings.for_replica(self.cfg, _replica_device())
        self._store = CompletionStore(self.cfg.serve.store)
        self.lifecycle = ModelLifecycle(self.cfg, settings.model_name, settings.tracking_uri, self.engine_settings)
        self.serving = ChatServing(self.cfg.serve, self.lifecycle, self._store)

    async def __del__(self) -> None:
        """Serve awaits this when the replica shuts down (after its requests drained): write the stored completions
        still queued."""
        await self._store.close()

    # -- Serve's hooks ----------------------------------------------------------------------------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Called by Serve at start and whenever user_config changes: load the model if it changed."""
        await self.lifecycle.reconfigure(user_config)

    async def check_health(self) -> None:
        """Serve replaces a replica whose engine died and could not be started again."""
        await self.lifecycle.check_health()

    # -- routes ---------------------------------------------------------------------------------------------------
    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @fastapi_app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        model = self.lifecycle.ready()
        running, waiting = model.engine.counts()
        return JSONResponse({
            "status": "ready" if model.engine.alive() else "restarting",  # requests wait for a restarting engine
            "model": self.settings.model_name,
            "revision": model.revision,
            "engine": model.engine.kind,
            "running": running,
            "waiting": waiting,
            # sequences still being generated by models this replica has replaced
            "retiring": self.lifecycle.retiring(),
        })

    @fastapi_app.get("/metrics")
    async def metrics_text(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        m = metrics()
        model = self.lifecycle.current
        if model is not None:
            running, waiting = model.engine.counts()
            m.running.set(running)
            m.waiting.set(waiting)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @fastapi_app.post("/v1/feedback")
    async def feedback(self, request: Request) -> dict[str, Any]:
        """A rating, a better answer or a comment on a stored completion of the caller's (services/store.py)."""
        api_key = authorize(request, self._keys)
        return await self._store.feedback(await read_limited(request, MAX_FEEDBACK_BYTES), api_key)

    @fastapi_app.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        authorize(request, self._keys)
        model = self.lifecycle.ready()
        return {"object": "list", "data": [self.serving.model_card(self.lifecycle.named(name, model))
                                           for name in self.lifecycle.names()]}

    @fastapi_app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request) -> dict[str, Any]:
        authorize(request, self._keys)
        return self.serving.model_card(self.lifecycle.named(model_id, self.lifecycle.ready()))

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        started = time.perf_counter()
        api_key = authorize(request, self._keys)
        body = protocol.parse_request(await request.body())
        return await self.serving.chat(body, api_key, started)


# ---------------------------------------------------------------------------------------------------------------------
# Building the application


def api_keys_from_env() -> list[str]:
    return [k.strip() for k in os.environ.get(ENV_API_KEYS, "").split(",") if k.strip()]


def chat_application(model: str | None, cfg: Config, *, api_keys: Sequence[str] = (), model_name: str | None = None,
                     watch_s: float | None = None, tracking_uri: str | None = None) -> Application:
    """The Serve application for `model` (a folder or models:/ URI) and the adapters of `cfg.serve.adapters` on it (or,
    without a model, on their base), with the options of `cfg.serve`."""
    s = cfg.serve
    adapters = adapter_sources(s.adapters, cfg)
    every_champion = EVERY_CHAMPION in s.adapters
    if model is None and not adapters and not every_champion:
        raise CrlftError("nothing to serve: give a model, or adapters (serve.adapters)")
    if adapters or every_champion:  # crlft's engine serves none: say so now, not in every replica's failed start
        EngineSettings.for_replica(cfg, "cuda" if s.gpus_per_replica else "cpu").with_adapters(cfg.inference.max_loras)
    model = engine_model(model, cfg, tracking_uri)  # `*` alone: the base its champions are on
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
        model_name=served_name(model, cfg, model_name) if model else cfg.registry.base_model_name,
        api_keys=keys,
        tracking_uri=tracking_uri or cfg.registry.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
    )
    env = {key: os.environ.get(key, value) for key, value in (OFFLINE_ENV | REPLICA_ENV).items()}
    watch_s = default_watch_s(model, *adapters.values(), every_champion=every_champion) if watch_s is None else watch_s
    user_config: dict[str, Any] = {"model": model, "watch_s": watch_s}
    if adapters:
        user_config["adapters"] = adapters
    if every_champion:
        user_config["every_champion"] = True
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
        user_config=user_config,
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
        max_surge_percent=100,  # a redeploy starts the new replicas before the old ones stop
        max_constructor_retry_count=3,
        logging_config={"enable_access_log": s.access_log},
    )
    return deployment.bind(settings)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Application builder for Serve configs and KubeRay serveConfigV2 (`import_path: services.chat:build_app`).

    args (all optional): model (folder or models:/ URI; default $CRLFT_MODEL, else the config's champion),
    config (crlft YAML; default $CRLFT_CONFIG), overrides ({"serve.max_replicas": 4, "inference.engine": "vllm", ...}),
    model_name, api_keys (prefer $CRLFT_API_KEYS from a secret), watch_s, tracking_uri (default
    $MLFLOW_TRACKING_URI / the config)."""
    args = dict(args or {})
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown:
        raise CrlftError(f"services.chat:build_app: unknown args {unknown}; known: {', '.join(BUILD_ARGS)}")
    cfg = load_config(args.get("config") or os.environ.get(ENV_CONFIG) or None, args.get("overrides") or {})
    model = args.get("model") or os.environ.get(ENV_MODEL) or (None if cfg.serve.adapters else champion_uri(cfg))
    keys = [*(args.get("api_keys") or []), *api_keys_from_env()]
    watch_s = args.get("watch_s")
    return chat_application(model and str(model), cfg, api_keys=keys, model_name=args.get("model_name"),
                            watch_s=None if watch_s is None else float(watch_s), tracking_uri=args.get("tracking_uri"))


def __getattr__(name: str) -> Any:
    # `services.chat:app` (import path for Serve configs), built from the environment only when asked for.
    if name == "app":
        return build_app({})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
