"""Ports for listeners another process binds later.

The rule: a listener binds its own port (port 0, then reads back what it got) wherever it can. Where it cannot, its
port being a setting read before it starts (Serve's HAProxy pages and fallback proxy, an `mlflow server --port`), the
port is drawn by `free_port` and the start that fails to bind it is retried on a fresh one: a port free when drawn is
not reserved, and any process may bind it before the listener does. The retries live beside each such start
(cluster/haproxy_pages.py for Serve's ingress, tests/tracking_server.py for the tests' MLflow server).

Kept apart from cluster/session.py so that the worker-process setup hook can draw a port without importing crlft's
config."""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

PORT_BAND = range(20000, 30000)


def free_port() -> int:
    """A port free now, for a listener another process starts later and that cannot choose its own (see the module's
    rule: the start that uses it retries on a fresh one if it fails to bind). Drawn from `PORT_BAND` less the kernel's
    ephemeral range, ports no process binds by chance (Ray's processes bind port 0 and connect from the ephemeral
    range, its workers bind 10002-19999, Serve's replicas 30000 and up), which makes a retry rare."""
    ephemeral = ephemeral_ports()
    candidates = [port for port in PORT_BAND if port not in ephemeral]
    for port in random.sample(candidates, min(len(candidates), 100)):
        with socket.socket() as probe, contextlib.suppress(OSError):
            probe.bind(("127.0.0.1", port))
            return port
    with socket.socket() as probe:  # the band is full or inside the ephemeral range: any port
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):  # not Linux: the IANA range
        low, high = 49152, 65535
    return range(low, high + 1)
