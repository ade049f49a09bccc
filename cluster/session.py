"""The one way every stage gets Ray: the session already running in this process, the cluster in $RAY_ADDRESS, or a
local throwaway one for the duration. A caller that runs several stages (the pipeline, the demo, the ablation) opens
one session around all of them, so Ray starts once.

Stopping: SIGTERM and SIGINT, to the pid or to its whole process group, leave a command like Ctrl-C does (`Stopped`),
through the blocks that stop what it started. A local session marks every process it starts (Ray's own, Serve's
actors, HAProxy, vLLM's engine cores) with `SESSION_MARK` in their environment, which their children inherit: stopping
it ends whichever of them outlived Ray's shutdown, whatever parent or process group they have by then (a group signal
kills Ray's head processes before Serve can stop its HAProxy and replicas)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from cluster.ports import free_port
from crlft.config import Config
from crlft.environ import environment

if TYPE_CHECKING:
    import psutil

# Logical CPUs a local session gets beyond the machine's. Ray Data's read tasks need one while the training workers
# hold theirs (or the run waits forever: Ray Train + Ray Data on 2 CPUs deadlock silently when the workers take every
# CPU), and the tokenizer actor pool is sized to the cluster's CPUs: on 2 CPUs it once took both while a task it
# waited for needed one (a silent hang).
LOCAL_SPARE_CPUS = 2
SESSION_MARK = "CRLFT_LOCAL_RAY"
STOP_GRACE_S = 3.0  # a marked process left after Ray's shutdown gets this long after SIGTERM, then SIGKILL
_local_mark: str | None = None  # this process's local session, while it runs
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_handlers_before: dict[int, Any] = {}  # while stop_on_signals' handler is installed: what it replaced
_received: int | None = None  # the stop signal that handler took, until `restore_signals`


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT received: the command unwinds as on Ctrl-C, and exits with 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def local_cpus(cfg: Config) -> int:
    needed = math.ceil(cfg.train.workers * cfg.train.cpus_per_worker)
    return max(os.cpu_count() or 1, needed) + LOCAL_SPARE_CPUS


# Serve's HAProxy `retry-on`, and on the next line of its config one more directive (Serve writes the value as it is,
# and has no setting for it). `empty-response` resends a request that reached a dying replica and got nothing back (a
# response begun is never resent), but HAProxy resends only a request it held whole when it first sent it, and a client
# that writes its body after its headers (httpx, so OpenAI's SDK) had its headers forwarded at once: HAProxy's own 502
# (SH, 0 retries; benchmarks/RESULTS.md, Faults). `option http-buffer-request` waits for the body (up to tune.bufsize,
# 16 KiB) before choosing a server. Also in k8s/ and cluster/cluster.yaml.
HAPROXY_RETRY_ON = "conn-failure empty-response\n    option http-buffer-request"


def ingress_env(cfg: Config) -> dict[str, str]:
    """The environment a local Ray needs at start for `serve.ingress`. For HAProxy: HAProxy's own pages get free
    ports, not Ray's fixed ones, so that local sessions can run side by side (a start that finds one taken all the
    same starts again on a fresh one), the pages listen on the endpoint's host only, and Serve's fallback proxy binds
    a port of its own unless RAY_SERVE_FALLBACK_PROXY_HTTP_PORT is set (all three: cluster/haproxy_pages.py); a
    replica leaving holds on 3 s, not 30, for HAProxy on the same machine to let go of it. Serve's proxy needs
    nothing."""
    if cfg.serve.ingress != "haproxy":
        return {}
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3",
            # A replica whose connection fails is marked down at once (Serve's default waits for 3 errors): with
            # leastconn a dead replica, holding no connections, is otherwise every retry's pick until then. A request
            # that reached a replica as it died, and got nothing back, is sent to another (Serve retries only refused
            # connections): a chat completion has no side effect to repeat (HAPROXY_RETRY_ON).
            "RAY_SERVE_HAPROXY_OBSERVE_ERROR_LIMIT": "1", "RAY_SERVE_HAPROXY_RETRY_ON": HAPROXY_RETRY_ON,
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            # What ray.init(runtime_env={"worker_process_setup_hook": ...}) sets, here inherited by every worker of
            # the session, the Serve actors that start HAProxy included.
            WORKER_PROCESS_SETUP_HOOK_ENV_VAR: "cluster.haproxy_pages.install"}


def start_ray(cfg: Config | None = None, address: str | None = None) -> tuple[bool, str | None]:
    """Use the running session; else connect to `address` or $RAY_ADDRESS; else start a local one (loopback dashboard:
    Train polls its state API). Returns whether this call opened the session (its opener shuts it
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
    global _local_mark
    _local_mark = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    try:
        with environment(ingress_env(cfg) | {SESSION_MARK: _local_mark}):
            # No dashboard_port: the dashboard binds its own, 8265 or the next free one, and reports what it got.
            context = ray.init(num_cpus=local_cpus(cfg), include_dashboard=True, dashboard_host="127.0.0.1",
                               logging_level=logging.WARNING)  # fmt: skip
    except BaseException:
        stop_ray()
        raise
    stop_on_signals()  # after ray.init, which sets a SIGTERM handler of its own that skips the finally blocks
    return True, f"http://{context.dashboard_url}" if context.dashboard_url else None


def stop_on_signals() -> None:
    """Until `restore_signals`, SIGTERM and SIGINT raise `Stopped` in the main thread, once: the blocks that stop what
    the command started then run undisturbed by the same signal sent again (a process group's every member gets it, a
    user presses Ctrl-C twice)."""
    if _handlers_before:
        return
    with contextlib.suppress(ValueError):  # not the main thread: its owner handles signals
        for name in STOP_SIGNALS:
            _handlers_before[name] = signal.signal(name, _stop)


def _stop(signum: int, _frame: FrameType | None) -> None:
    global _received
    for name in STOP_SIGNALS:
        signal.signal(name, signal.SIG_IGN)
    _received = signum
    raise Stopped(signum)


def stop_signal_received() -> bool:
    """Whether `stop_on_signals`' handler took a stop signal (since it was installed): only then may the signal have
    gone to the whole process group, Ray's processes included."""
    return _received is not None


def restore_signals() -> None:
    global _received
    with contextlib.suppress(ValueError):
        for name, handler in _handlers_before.items():
            signal.signal(name, handler)
    _handlers_before.clear()
    _received = None


def ray_alive() -> bool:
    """Whether every process of the local session is still running (False once a signal to the process group reached
    them, and then nothing can be asked of Serve's controller); always True for a cluster this process connected to."""
    from ray._private import worker

    node = worker._global_node
    return node is None or node.remaining_processes_alive()


def stop_ray() -> None:
    """Shut down Ray, then end what a local session started that outlived it."""
    import ray
    from ray._private import worker

    global _local_mark
    node = worker._global_node if _local_mark is not None else None  # the local session's one node; gone after
    if _local_mark is not None and not ray_alive():  # a signal to the group: Ray's head processes are going already,
        end_marked_processes(_local_mark, grace_s=0.0)  # and would take seconds over it
    ray.shutdown()
    if _local_mark is not None:
        end_marked_processes(_local_mark)
        _local_mark = None
    if node is not None:
        remove_haproxy_folders(node.node_id)
    restore_signals()


def remove_haproxy_folders(node_id: str) -> None:
    """Remove the folders Serve's HAProxy ingress wrote for the node `node_id` (config, sockets, server state, logs:
    /tmp/haproxy-serve/<node id>, unless Serve's RAY_SERVE_HAPROXY_* paths move them), which Serve leaves behind once
    HAProxy has stopped. Only that node's: other sessions' HAProxy, side by side, keep theirs. Nothing when this process
    never loaded Serve, the only way a local session gets HAProxy (importing Serve here would cost every command ~1 s).
    """
    constants = sys.modules.get("ray.serve._private.constants")
    if constants is None or not node_id:  # no id: the folders' parent itself would go
        return
    paths = (constants.RAY_SERVE_HAPROXY_CONFIG_FILE_LOC, constants.RAY_SERVE_HAPROXY_SOCKET_PATH,
             constants.RAY_SERVE_HAPROXY_SERVER_STATE_FILE, constants.RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH)
    folders = {Path(path).parent / node_id for path in paths}
    folders.add(Path(constants.RAY_SERVE_HAPROXY_SERVER_STATE_BASE) / node_id)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def marked_processes(mark: str) -> list[psutil.Process]:
    """The running processes, this one aside, whose environment carries the local session's `mark`."""
    import psutil

    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.pid != os.getpid() and process.status() != psutil.STATUS_ZOMBIE \
                    and process.environ().get(SESSION_MARK) == mark:
                found.append(process)
    return found


def end_marked_processes(mark: str, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every process of the session `mark`, SIGKILL those still running after `grace_s`."""
    import psutil

    marked = marked_processes(mark)
    for process in marked:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(marked, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


@contextlib.contextmanager
def ray_session(cfg: Config | None = None) -> Iterator[str | None]:
    """Ray for the duration of the block (`start_ray`); yields the dashboard's URL when this call started a local
    session. Only a session opened here is closed here."""
    opened, dashboard = start_ray(cfg)
    try:
        yield dashboard
    finally:
        if opened:
            stop_ray()
