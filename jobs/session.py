"""The one way every stage gets Ray: the session already running in this process, the cluster in $RAY_ADDRESS, or a
local throwaway one for the duration. A caller that runs several stages (the pipeline, the demo, the ablation) opens
one session around all of them, so Ray starts once."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Iterator, Mapping

from crlft.config import Config

# Logical CPUs a local session gets beyond the machine's. Ray Data's read tasks need one while the training workers
# hold theirs (or the run waits forever: Ray Train + Ray Data on 2 CPUs deadlock silently when the workers take every
# CPU), and the tokenizer actor pool is sized to the cluster's CPUs: on 2 CPUs it once took both while a task it
# waited for needed one (a silent hang).
LOCAL_SPARE_CPUS = 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def local_cpus(cfg: Config) -> int:
    needed = math.ceil(cfg.train.workers * cfg.train.cpus_per_worker)
    return max(os.cpu_count() or 1, needed) + LOCAL_SPARE_CPUS


def ingress_env(cfg: Config) -> dict[str, str]:
    """The environment a local Ray needs at start for `serve.ingress`. For HAProxy: HAProxy's own pages and Serve's
    fallback proxy get free ports, not Ray's fixed ones, so that local sessions can run side by side; a replica leaving
    holds on 3 s, not 30, for HAProxy on the same machine to let go of it. Serve's proxy needs nothing."""
    if cfg.serve.ingress != "haproxy":
        return {}
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3",
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}


@contextlib.contextmanager
def environment(extra: Mapping[str, str], override: bool = False) -> Iterator[dict[str, str]]:
    """`extra` in os.environ for the block (a variable already set keeps its value unless `override`), as it was
    after: processes started in the block (Ray's, vLLM's) inherit it; this process's later children do not. Yields
    the values in effect."""
    before = {name: os.environ.get(name) for name in extra}
    os.environ.update({name: value for name, value in extra.items() if override or before[name] is None})
    try:
        yield {name: os.environ[name] for name in extra}
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def start_ray(cfg: Config | None = None, address: str | None = None) -> tuple[bool, str | None]:
    """Use the running session; else connect to `address` or $RAY_ADDRESS; else start a local one (loopback dashboard
    on a free port: Train polls its state API). Returns whether this call opened the session (its opener shuts it
    down) and, for a local one, the dashboard's URL."""
    import ray

    if ray.is_initialized():
        return False, None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
        return True, None
    cfg = cfg or Config()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only session; clusters keep their auth
    with environment(ingress_env(cfg)):
        context = ray.init(num_cpus=local_cpus(cfg), include_dashboard=True, dashboard_host="127.0.0.1",
                           dashboard_port=free_port(), logging_level=logging.WARNING)  # fmt: skip
    return True, f"http://{context.dashboard_url}" if context.dashboard_url else None


@contextlib.contextmanager
def ray_session(cfg: Config | None = None) -> Iterator[str | None]:
    """Ray for the duration of the block (`start_ray`); yields the dashboard's URL when this call started a local
    session. Only a session opened here is closed here."""
    import ray

    opened, dashboard = start_ray(cfg)
    try:
        yield dashboard
    finally:
        if opened:
            ray.shutdown()
