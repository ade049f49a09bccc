"""The endpoint's FastAPI app, before any route: every error answered in OpenAI's shape, the counting and
replica-naming middleware, the API key check, and the 503 a replica that cannot answer yet gives.

The routes themselves are methods of the replica (`services/chat.py`, `ChatServer`): Serve's class-based ingress
binds them to the replica that serves them.
"""

# No `from __future__ import annotations`: FastAPI reads the handler signatures (e.g. `request: Request`) at runtime.
import hmac
import logging
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.metrics import RequestCounter
from services.page import add_chat_page
from services.protocol import ApiError

logger = logging.getLogger("ray.serve")

RETRY_AFTER_S = 1
REPLICA_HEADER = "x-crlft-replica"


def key_matches(token: str, keys: Sequence[bytes]) -> bool:
    """Constant-time comparison against every key (the time taken tells nothing about which, or how close)."""
    given = token.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key)
    return found


def authorize(request: Request, keys: Sequence[bytes]) -> str | None:
    """The caller's API key (None on an endpoint without keys), or a 401."""
    if not keys:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "no API key given: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not key_matches(token.strip(), keys):
        raise ApiError(401, "incorrect API key", code="invalid_api_key")
    return token.strip()


def unavailable(message: str, code: str) -> ApiError:
    """A 503 to retry shortly: the model is loading, or its engine is being restarted."""
    return ApiError(503, message, type="server_error", code=code, headers={"Retry-After": str(RETRY_AFTER_S)})


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
