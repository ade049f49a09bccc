"""Running the chat application on Ray Serve from this process: local Ray unless an address is given."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

import ray
from ray import serve

from cluster.session import ray_alive, restore_signals, start_ray, stop_on_signals, stop_ray, stop_signal_received
from crlft.config import Config
from crlft.environ import set_offline_defaults
from crlft.errors import CrlftError
from crlft.inference.engine import choose_engine
from services.chat import APP_NAME, chat_application
from services.served_model import adapter_sources, engine_model, resolve_model_uri

SIGNAL_SPREAD_S = 0.3
SERVE_STOP_S = 10.0


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


def deploy(model: str | None, cfg: Config | None = None, blocking: bool = False, *, api_keys: Sequence[str] = (),
           model_name: str | None = None, watch_s: float | None = None, tracking_uri: str | None = None,
           address: str | None = None, name: str = APP_NAME, route_prefix: str = "/",
           timeout_s: float = 300.0) -> str:
    """Serve `model` (a folder or models:/ URI; None: the base of cfg.serve.adapters) and those adapters on Ray Serve
    (local Ray unless `address`/$RAY_ADDRESS) and return the base URL once it answers (clients use URL + "/v1").
    `blocking` serves until Ctrl-C / SIGTERM, then stops Serve. Calling it again with the same `name` redeploys
    (rolling, nothing in flight dropped)."""
    cfg = cfg or Config()
    set_offline_defaults()
    # Fail here, with a clear message, not in a replica's retry loop.
    model = engine_model(model, cfg, tracking_uri)
    for uri in (model, *adapter_sources(cfg.serve.adapters, cfg).values()):
        if uri is not None:
            resolve_model_uri(uri, cfg, tracking_uri)
    choose_engine(cfg.inference.engine, "cpu")  # vLLM asked for and missing
    check_port_free_for_local_ray(cfg, address)
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


def check_port_free_for_local_ray(cfg: Config, address: str | None) -> None:
    """`check_port_free` for the endpoint's port where Serve's ingress will be a local Ray's that start_ray is about to
    start (a cluster's nodes bind their own ports)."""
    if not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS")):
        check_port_free(cfg.serve.host, cfg.serve.port)


def check_port_free(host: str, port: int) -> None:
    """Fail in one line, before anything starts, when `host:port` cannot be listened on: naming the process that holds
    it where this user may see it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise CrlftError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            holder = port_holder(port)
            raise CrlftError(f"port {port} is in use{holder}; stop it or serve on another port (--port)") from None


def port_holder(port: int) -> str:
    """' by PID N (name)' for the process listening on `port`, or '' when it cannot be seen."""
    import psutil

    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return f" by PID {conn.pid} ({psutil.Process(conn.pid).name()})"
    return ""


def wait_for_interrupt() -> None:
    """Block until Ctrl-C, SIGINT or SIGTERM."""
    stop_on_signals()
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


def shutdown(shutdown_ray: bool = True) -> None:
    """Stop Serve (and Ray, when this process started it). Serve's controller stops the replicas and HAProxy in order
    while the session's processes all run; after a signal to the whole process group they are dying, and the
    session's stop ends what is left (cluster.session.stop_ray)."""
    if stop_signal_received():  # it may have gone to the group, reaching Ray's processes at once: let that show
        time.sleep(SIGNAL_SPREAD_S)
    if ray_alive():
        with contextlib.suppress(Exception):
            _stop_serve(SERVE_STOP_S)
    if shutdown_ray:
        stop_ray()
    else:
        restore_signals()  # what wait_for_interrupt installed


def _stop_serve(timeout_s: float) -> None:
    """serve.shutdown, waiting `timeout_s` at most for the controller (Serve's own wait is 30 s: a session whose head
    processes die under it, as on a loaded machine after a group signal, would spend them all)."""
    try:
        from ray.serve.context import _check_cached_client_alive, _disconnect
    except ImportError:  # private API moved: Serve's own wait
        serve.shutdown()
        return
    client, had_client = _check_cached_client_alive()  # at most 5 s
    if client is not None:
        client.shutdown(timeout_s=timeout_s)
        _disconnect()
    elif not had_client:  # none cached in this process: Serve finds a running one itself
        serve.shutdown()
