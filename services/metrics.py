"""The replica's Prometheus metrics (one registry per replica process, served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ROUTES = ("/v1/chat/completions", "/v1/feedback", "/v1/models", "/healthz", "/readyz", "/metrics")
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("crlft_requests", "HTTP requests by route and status code", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("crlft_request_latency_seconds", "chat completion latency, to the last token",
                                 ["stream"], buckets=BUCKETS, registry=self.registry)
        self.ttft = Histogram("crlft_time_to_first_token_seconds", "streamed: time to the first text",
                              buckets=BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("crlft_prompt_tokens", "prompt tokens of served requests",
                                     registry=self.registry)
        self.completion_tokens = Counter("crlft_completion_tokens", "generated tokens of served requests",
                                         registry=self.registry)
        self.running = Gauge("crlft_running_sequences", "sequences in the decoding batch", registry=self.registry)
        self.waiting = Gauge("crlft_waiting_sequences", "sequences waiting for a batch slot", registry=self.registry)
        self.rejected = Counter("crlft_rejected_requests", "requests refused with 429: the replica was full",
                                registry=self.registry)
        self.model = Gauge("crlft_model_info", "the loaded model and its engine (value 1)",
                           ["name", "revision", "engine"], registry=self.registry)
        self.stored = Counter("crlft_stored_completions", "choices written to the completion store",
                              registry=self.registry)
        self.store_dropped = Counter("crlft_store_dropped_completions", "choices to be stored that were dropped: "
                                     "the queue was full or the write failed", ["reason"], registry=self.registry)
        self.feedback = Counter("crlft_feedback", "feedback written to the completion store", registry=self.registry)

    @staticmethod
    def route(path: str) -> str:
        return path if path in ROUTES or path.startswith("/v1/models/") else "other"


_metrics: Metrics | None = None


def metrics() -> Metrics:
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics


class RequestCounter:
    """ASGI middleware counting every HTTP answer by route and status code, when its headers go out (an exception
    before them counts as the 500 it becomes). Plain ASGI: Starlette's `@app.middleware("http")` would carry each
    streamed piece through an extra task and memory stream."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = metrics().route(scope["path"])
        started = False

        async def send_counted(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                metrics().requests.labels(route, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            if not started:
                metrics().requests.labels(route, "500").inc()
            raise
