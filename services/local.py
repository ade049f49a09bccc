"""Running the chat application on Ray Serve from this process: local Ray unless an address is given."""

from __future__ import annotations

import contextlib
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from ray import serve

from crlft.config import Config
from crlft.errors import CrlftError
from crlft.tracking import set_offline_defaults
from jobs.session import start_ray
from services.chat import APP_NAME, chat_application
from services.engine import choose_engine
from services.models import resolve_model_uri


def public_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "", None) else ("[::1]" if host == "::" else host)
    return f"http://{shown}:{port}"


def wait_until_ready(url: str, timeout_s: float = 300.0) -> None:
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
    # Fail here, with a clear message, not in a replica's retry loop.
    resolve_model_uri(model, cfg, tracking_uri)
    choose_engine(cfg.serve.engine, "cpu")  # vLLM asked for and missing
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
    """Where Serve's HTTP ingress really listens: an already running Serve keeps its own HTTP options."""
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
