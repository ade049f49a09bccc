"""Serve's HAProxy ingress as a local session wants it: a local session's Ray workers run `install` at start, which
patches four of Serve's modules as they load. It is cheap where Serve never loads (training workers): it only adds an
import hook.

- **HAProxy's pages where the endpoint listens.** Serve's HAProxy config binds its stats page and its Prometheus page
  on every interface (`bind *:PORT`), whatever host the endpoint itself was asked for: a `crlft serve` on 127.0.0.1
  would answer on the machine's every address. The two bind lines of Serve's template are rewritten to the endpoint's
  own host (`config.frontend_host`: the HTTP host, `*` for 0.0.0.0).
- **The pages' ports retried when taken.** HAProxy cannot bind port 0 (`invalid port '0'`), so the pages' ports are
  settings drawn before the start (cluster/ports.py), which any process may bind first. HAProxy then exits with
  `cannot bind socket (Address already in use) for [HOST:PORT]`, and Serve's controller would restart it on the same
  taken port forever. `HAProxyApi.start` is wrapped: a start that failed only on the pages' ports moves them to fresh
  ports, rewrites the config and starts again (the ports it got are in the config file and in Serve's log). The
  endpoint's own port is never moved: it is the user's, and its holder is named by crlft before Serve starts.
- **The fallback proxy binds its own port.** Serve's fallback proxy (a Python Serve proxy, HAProxy's backup server
  for when no replica serves) binds one constant port, which the controller also gives HAProxy as the target, and
  `serve.start` fails if it is taken (it waits for every proxy's `ready`). Unless the user set
  RAY_SERVE_FALLBACK_PROXY_HTTP_PORT, the fallback proxy binds port 0 (`start_asgi_http_server` wrapped in its
  process), reads back what it got and publishes it in Ray's KV store under its actor name with its actor id, before
  it reports ready; the controller's `get_fallback_proxy_targets` reads it once per proxy it started and gives
  HAProxy that port. A restarted fallback proxy binds a fresh one the same way. `fallback_proxy_port` reads it from
  the driver.

Why these patches: Serve keeps every port in settings read at import and offers no way to ask a component what it
bound. HAProxy rejects port 0 and Serve spawns it with its descriptors closed (no socket to hand over with `fd@`), so
its pages retry; the fallback proxy is Python in Serve's own process and can bind port 0, so it does, and the one place
the controller uses its port reads back what it got. A retry of the whole `serve.start` could do neither: the settings
are fixed for the session. Each patch leaves Serve's own start, reload and stop as they are, checks what it patches
and fails loudly after a Ray upgrade that moved it.
"""

from __future__ import annotations

import asyncio
import importlib.abc
import importlib.machinery
import inspect
import os
import re
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

TEMPLATES = "ray.serve._private.haproxy_templates"
HAPROXY = "ray.serve._private.haproxy"
PROXY = "ray.serve._private.proxy"
PROXY_STATE = "ray.serve._private.proxy_state"
ON_ENDPOINT_HOST = {
    "bind *:{{ config.stats_port }}": "bind {{ config.frontend_host }}:{{ config.stats_port }}",
    "bind :{{ config.metrics_port }}": "bind {{ config.frontend_host }}:{{ config.metrics_port }}",
}
PAGE_PORTS = ("stats_port", "metrics_port")  # HAProxyConfig's fields a taken port may move
TAKEN = re.compile(r"cannot bind socket \(Address already in use\) for \[[^\]]*:(\d+)\]")
START_ATTEMPTS = 5  # HAProxy starts in ~1 s: five tries on ports a draw found free
FALLBACK_PORT_SETTING = "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"  # the user's: the fallback proxy binds it as Serve does
FALLBACK_NAMES = ("get_fallback_proxy_targets", "_fallback_proxy_state", "RequestProtocol.HTTP")  # what is read
KV_NAMESPACE, FALLBACK_KEY = "crlft", "fallback-proxy-port:"  # + the proxy's actor name: "<actor id> <port>"


def on_endpoint_host(template: str) -> str:
    """Serve's HAProxy config template with its pages bound where the endpoint is; an error when Serve's template no
    longer has the lines (a Ray upgrade), so that the change cannot go unnoticed."""
    missing = [line for line in ON_ENDPOINT_HOST if line not in template]
    if missing:
        raise RuntimeError(f"Ray Serve's HAProxy template has no {missing}: update cluster/haproxy_pages.py")
    for line, bound in ON_ENDPOINT_HOST.items():
        template = template.replace(line, bound)
    return template


def taken_ports(error: BaseException) -> set[int]:
    """The ports HAProxy's failed start says were in use (its stderr, which Serve puts in the error)."""
    return {int(port) for port in TAKEN.findall(str(error))}


def retry_taken_pages(haproxy: ModuleType) -> None:
    """`HAProxyApi.start` moving the pages to fresh ports when only they were taken (see the module's docstring)."""
    from cluster.ports import free_port

    api = haproxy.HAProxyApi
    if getattr(api.start, "_crlft", False):
        return
    if not set(PAGE_PORTS) <= set(haproxy.HAProxyConfig.__dataclass_fields__):
        raise RuntimeError(f"Ray Serve's HAProxyConfig has no {PAGE_PORTS}: update cluster/haproxy_pages.py")
    start = api.start

    async def start_on_free_pages(self: Any) -> None:
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                return await start(self)
            except RuntimeError as error:
                taken = taken_ports(error)
                moved = [name for name in PAGE_PORTS if getattr(self.cfg, name) in taken]
                if attempt == START_ATTEMPTS or not moved or taken - {getattr(self.cfg, name) for name in moved}:
                    raise
                for name in moved:
                    before, after = getattr(self.cfg, name), free_port()
                    setattr(self.cfg, name, after)
                    haproxy.logger.warning(f"HAProxy's {name} {before} is taken: starting again on {after}")

    start_on_free_pages._crlft = True  # type: ignore[attr-defined]
    api.start = start_on_free_pages


def _fallback_key(actor_name: str) -> bytes:
    return f"{FALLBACK_KEY}{actor_name}".encode()


def fallback_binds_its_own_port(proxy: ModuleType) -> None:
    """In a proxy actor's process: the fallback proxy binds port 0 and publishes the port it got (see the module's
    docstring); every other proxy, and a fallback proxy on a port the user set, as Serve has it."""
    from ray.serve._private.constants import SERVE_PROXY_NAME

    start = proxy.start_asgi_http_server
    if getattr(start, "_crlft", False):
        return
    fallback = f"{SERVE_PROXY_NAME}-fallback-"  # the fallback proxy's actor name: this, then the node's id

    async def start_on_own_port(app: Any, http_options: Any, **kwargs: Any) -> Any:
        import ray
        from ray.experimental.internal_kv import _internal_kv_put

        context = ray.get_runtime_context()
        name = context.get_actor_name() or ""
        if not name.startswith(fallback) or FALLBACK_PORT_SETTING in os.environ:
            return await start(app, http_options, **kwargs)
        task, server = await start(app, http_options.model_copy(update={"port": 0}), **kwargs)
        while not server.started:  # uvicorn listens on the bound socket once it has started
            if task.done():
                task.result()
                raise RuntimeError("the fallback proxy's HTTP server stopped before it started")
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        _internal_kv_put(_fallback_key(name), f"{context.get_actor_id()} {port}", overwrite=True,
                         namespace=KV_NAMESPACE)
        proxy.logger.info(f"The fallback proxy listens on port {port}, its own")
        return task, server

    start_on_own_port._crlft = True  # type: ignore[attr-defined]
    proxy.start_asgi_http_server = start_on_own_port


def fallback_target_on_its_port(proxy_state: ModuleType) -> None:
    """In the controller: the fallback proxy's target carries the port the proxy published (once read per proxy
    started), not Serve's constant (see the module's docstring)."""
    manager = proxy_state.ProxyStateManager
    targets = manager.get_fallback_proxy_targets
    if getattr(targets, "_crlft", False):
        return
    missing = [name for name in FALLBACK_NAMES if name not in inspect.getsource(manager)]
    if missing:
        raise RuntimeError(f"Ray Serve's ProxyStateManager has no {missing}: update cluster/haproxy_pages.py")

    def targets_on_bound_port(self: Any) -> dict[Any, Any]:
        from ray.experimental.internal_kv import _internal_kv_get

        found = targets(self)
        http = found.get(proxy_state.RequestProtocol.HTTP)
        state = self._fallback_proxy_state
        if http is None or state is None:
            return found
        known = self.__dict__.setdefault("_crlft_fallback_ports", {})
        if state.actor_id not in known:  # published before the proxy reported ready, the one state giving a target
            published = (_internal_kv_get(_fallback_key(state.actor_name), namespace=KV_NAMESPACE) or b"").split()
            ours = len(published) == 2 and published[0].decode() == state.actor_id
            known[state.actor_id] = int(published[1]) if ours else None
        port = known[state.actor_id]
        if port is None:  # the user's port: Serve's constant
            return found
        return {**found, proxy_state.RequestProtocol.HTTP: http.model_copy(update={"port": port})}

    targets_on_bound_port._crlft = True  # type: ignore[attr-defined]
    manager.get_fallback_proxy_targets = targets_on_bound_port


def fallback_proxy_port() -> int:
    """The port of the local session's fallback proxy, for a process connected to the session: the user's setting, or
    the port the proxy bound and published (a LookupError until it has)."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    if FALLBACK_PORT_SETTING in os.environ:
        return int(os.environ[FALLBACK_PORT_SETTING])
    for key in _internal_kv_list(FALLBACK_KEY, namespace=KV_NAMESPACE):
        published = (_internal_kv_get(key, namespace=KV_NAMESPACE) or b"").split()
        if len(published) == 2:
            return int(published[1])
    raise LookupError("Serve's fallback proxy has published no port (not started, or not a local session's)")


def _rebind_template(templates: ModuleType) -> None:
    templates.HAPROXY_CONFIG_TEMPLATE = on_endpoint_host(templates.HAPROXY_CONFIG_TEMPLATE)


PATCHES: dict[str, Callable[[ModuleType], None]] = {
    TEMPLATES: _rebind_template, HAPROXY: retry_taken_pages, PROXY: fallback_binds_its_own_port,
    PROXY_STATE: fallback_target_on_its_port}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> object:
        patch = PATCHES.get(name)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            load(module)
            patch(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """The worker-process setup hook (cluster.session.ingress_env sets it for a local session's HAProxy ingress): each
    of Serve's modules above is patched as it loads (at once if it already has: the template only before Serve's
    HAProxy module, which renders it)."""
    if any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _PatchOnImport())
    for name in (HAPROXY, PROXY, PROXY_STATE):
        if name in sys.modules:
            PATCHES[name](sys.modules[name])
