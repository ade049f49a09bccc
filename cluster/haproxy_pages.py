"""HAProxy's own pages where the endpoint listens: a local session's Ray workers run `install` at start.

Ray Serve's HAProxy config binds its stats page and its Prometheus page on every interface (`bind *:PORT`), whatever
host the endpoint itself was asked for: a `crlft serve` on 127.0.0.1 would answer on the machine's every address.
`install` rewrites those two bind lines of Serve's template, when Serve's HAProxy module loads it, to the endpoint's
own host (`config.frontend_host`: the HTTP host, `*` for 0.0.0.0). It is cheap where Serve never loads (training
workers): it only adds an import hook.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

TEMPLATES = "ray.serve._private.haproxy_templates"
ON_ENDPOINT_HOST = {
    "bind *:{{ config.stats_port }}": "bind {{ config.frontend_host }}:{{ config.stats_port }}",
    "bind :{{ config.metrics_port }}": "bind {{ config.frontend_host }}:{{ config.metrics_port }}",
}


def on_endpoint_host(template: str) -> str:
    """Serve's HAProxy config template with its pages bound where the endpoint is; an error when Serve's template no
    longer has the lines (a Ray upgrade), so that the change cannot go unnoticed."""
    missing = [line for line in ON_ENDPOINT_HOST if line not in template]
    if missing:
        raise RuntimeError(f"Ray Serve's HAProxy template has no {missing}: update cluster/haproxy_pages.py")
    for line, bound in ON_ENDPOINT_HOST.items():
        template = template.replace(line, bound)
    return template


class _RebindOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> object:
        if name != TEMPLATES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            load(module)
            module.HAPROXY_CONFIG_TEMPLATE = on_endpoint_host(module.HAPROXY_CONFIG_TEMPLATE)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """The worker-process setup hook (cluster.session.ingress_env sets it for a local session's HAProxy ingress)."""
    if not any(isinstance(finder, _RebindOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RebindOnImport())
