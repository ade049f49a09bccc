"""Clean starts and stops: `crlft serve` (and every command that starts a local Ray) stopped by SIGTERM to its pid or to
its whole process group, on one port, leaves nothing running or listening; a taken port is one line of crlft's own.

Real processes throughout: `crlft serve` runs as a subprocess in a session of its own, as a shell starts it, and is
signalled by pid or by process group (what `kill`/Kubernetes and systemd/`timeout`/a terminal do)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from cluster.haproxy_pages import (
    ON_ENDPOINT_HOST,
    fallback_binds_its_own_port,
    fallback_target_on_its_port,
    on_endpoint_host,
    retry_taken_pages,
)
from cluster.ports import ephemeral_ports
from cluster.session import (
    HAPROXY_RETRY_ON,
    SESSION_MARK,
    Stopped,
    end_marked_processes,
    free_port,
    marked_processes,
    stop_on_signals,
    stop_signal_received,
)
from crlft.command_line import run_guarded
from crlft.config import Config
from crlft.export import ModelMeta, save_exported
from crlft.model import load_model_and_tokenizer
from crlft.presets import init_model

REPO = Path(__file__).resolve().parents[1]
ABORT_TRACE = re.compile(r"\*\*\* \w+ received|Traceback \(most recent call last\)|core dumped")
STOP_LIMIT_S = 45  # "within seconds" on an idle machine, with room for CI's load


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stop-model")
    trained, tokenizer = load_model_and_tokenizer(str(init_model(root / "base", seed=0)))
    return save_exported(trained, tokenizer, root / "model", ModelMeta.from_config(Config(), seed=0))


@pytest.fixture(scope="module")
def port() -> int:
    """The one port every start in this module serves on: a stop that leaves it taken fails the next start."""
    return free_port()


def _session_mark_of(pid: int) -> str | None:
    """The mark of the local session process `pid` runs (read from its children: the opener's own environment lacks
    it), or None."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if mark := child.environ().get(SESSION_MARK):
                    return mark
    return None


def _listeners(pid: int) -> list[tuple[str, int]]:
    return [(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="tcp")
            if c.pid == pid and c.status == psutil.CONN_LISTEN]


def _haproxy_of(mark: str) -> tuple[set[tuple[str, int]], set[Path]]:
    """What the session `mark`'s HAProxy listens on, and the folders of the config files it runs (`haproxy -f FILE`),
    where Serve keeps all it writes for the node; empty when it runs no HAProxy. Read again when a process went
    meanwhile: Serve reloads HAProxy (a new process; the old one leaves once its connections end) when its config
    changes, as when the fallback proxy becomes ready after the first answers."""
    for _ in range(20):
        listeners, folders = set(), set()
        try:
            for process in (p for p in marked_processes(mark) if p.name() == "haproxy"):
                command = process.cmdline()
                folders.add(Path(command[command.index("-f") + 1]).parent)
                listeners.update(_listeners(process.pid))
            return listeners, folders
        except psutil.NoSuchProcess:
            time.sleep(0.5)
    raise AssertionError("HAProxy kept restarting")


@contextlib.contextmanager
def _serving(model: Path, port: int, state: Path, engine: str) -> Iterator[subprocess.Popen[str]]:
    """`crlft serve` in a session of its own, stderr in state/stderr.log. A test that leaves it running kills its group
    and every process its session marked (HAProxy outlives a SIGKILL of the group: the next start would find the
    module's port taken)."""
    command = [sys.executable, "-m", "jobs.cli", "serve", "--model", str(model), "--port", str(port),
               "--set", "serve.cpus_per_replica=0.25", "--set", f"inference.engine={engine}",
               "--set", "inference.vllm_kv_cache_gib=0.25", "--set", f"state_dir={state}"]
    with (state / "stderr.log").open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO,
                                   start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    watchdog = threading.Timer(300, process.kill)  # a hung start fails the test instead of hanging it
    watchdog.start()
    try:
        yield process
    finally:
        watchdog.cancel()
        if process.poll() is None:
            mark = _session_mark_of(process.pid)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if mark:
                end_marked_processes(mark, grace_s=0.0)


@pytest.mark.slow
@pytest.mark.parametrize(("target", "engine"), [("group", "vllm"), ("pid", "vllm")])
def test_sigterm_to_the_process_group_or_the_pid_stops_crlft_serve_in_seconds_leaving_nothing_on_its_port(
        model: Path, port: int, target: str, engine: str, tmp_path: Path) -> None:
    from crlft.inference.engine import vllm_installed

    if engine == "vllm" and not vllm_installed() and not os.environ.get("CI"):
        pytest.skip("vLLM is not installed (crlft[vllm])")
    with _serving(model, port, tmp_path, engine) as process:
        assert process.stdout is not None
        line = next((line for line in process.stdout if line.startswith("serving ")), "")
        assert f"http://127.0.0.1:{port}/v1" in line, f"not served; exit status {process.poll()}, stderr:\n" + \
            (tmp_path / "stderr.log").read_text()[-3000:]
        mark = _session_mark_of(process.pid)
        assert mark, "the session's processes carry no mark"
        listeners, haproxy_folders = _haproxy_of(mark)  # the folders: Serve's /tmp/haproxy-serve/<node id>
        assert haproxy_folders, "HAProxy is not the ingress"
        # HAProxy's endpoint, stats page and Prometheus page all listen on the endpoint's host only
        assert {ip for ip, _ in listeners} == {"127.0.0.1"}
        assert all(folder.is_dir() for folder in haproxy_folders)
        if engine == "vllm":
            assert any(p.name() == "VLLM::EngineCore" for p in marked_processes(mark))

        started = time.monotonic()
        os.killpg(process.pid, signal.SIGTERM) if target == "group" else process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=STOP_LIMIT_S)
        stop_s = time.monotonic() - started

        assert exit_code in (0, 128 + signal.SIGTERM), f"exit status {exit_code}"
        stderr = (tmp_path / "stderr.log").read_text(errors="replace")
        assert not ABORT_TRACE.search(stderr), stderr[-3000:]
        time.sleep(1.0)
        assert [f"{p.pid} {p.name()}" for p in marked_processes(mark)] == [], f"left running after {stop_s:.1f} s"
        assert not any(c.laddr.port == port for c in psutil.net_connections(kind="tcp")
                       if c.status == psutil.CONN_LISTEN), f"port {port} still listened on"
        assert [str(folder) for folder in haproxy_folders if folder.exists()] == [], "HAProxy's folder left"


def test_a_taken_port_is_one_line_naming_its_holder_and_nothing_starts(model: Path, tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        command = [sys.executable, "-m", "jobs.cli", "serve", "--model", str(model), "--port", str(port),
                   "--set", f"state_dir={tmp_path}"]
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: port {port} is in use by PID {os.getpid()} ({psutil.Process().name()}); stop it or serve on "
        "another port (--port)")
    assert "Traceback" not in result.stderr and "starting Ray" not in result.stderr


@pytest.mark.slow
def test_any_command_s_local_session_stopped_through_its_process_group_ends_every_process_it_started() -> None:
    script = ("import time\nfrom crlft.command_line import run_guarded\nfrom cluster.session import ray_session\n"
              "def run(_):\n    with ray_session():\n        print('up', flush=True)\n        time.sleep(600)\n"
              "raise SystemExit(run_guarded(run, None))\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=REPO, start_new_session=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "up"
        mark = _session_mark_of(process.pid)
        assert mark and marked_processes(mark)
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=STOP_LIMIT_S) == 128 + signal.SIGTERM
        assert process.stderr is not None
        stderr = process.stderr.read()
        assert not ABORT_TRACE.search(stderr) and "stopped (SIGTERM)" in stderr, stderr[-3000:]
        time.sleep(1.0)
        assert marked_processes(mark) == []
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_stop_signal_exits_with_128_plus_its_number_and_ctrl_c_with_130() -> None:
    def stopped(_: object) -> int:
        raise Stopped(signal.SIGTERM)

    def interrupted(_: object) -> int:
        raise KeyboardInterrupt

    assert run_guarded(stopped, object()) == 143  # type: ignore[arg-type]
    assert run_guarded(interrupted, object()) == 130  # type: ignore[arg-type]


def test_a_stop_waits_for_a_group_signal_to_reach_ray_only_after_a_stop_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    from services import local

    waits: list[float] = []
    monkeypatch.setattr(local, "ray_alive", lambda: False)  # nothing of Serve's to stop
    monkeypatch.setattr(local.time, "sleep", waits.append)
    before = signal.getsignal(signal.SIGTERM)
    stop_on_signals()
    local.shutdown(shutdown_ray=False)
    assert waits == [] and signal.getsignal(signal.SIGTERM) is before

    stop_on_signals()
    with pytest.raises(Stopped):
        signal.raise_signal(signal.SIGTERM)
    assert stop_signal_received()
    local.shutdown(shutdown_ray=False)
    assert waits == [local.SIGNAL_SPREAD_S]
    assert not stop_signal_received() and signal.getsignal(signal.SIGTERM) is before


def test_serve_s_haproxy_template_binds_its_pages_on_the_endpoint_s_host() -> None:
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    rebound = on_endpoint_host(HAPROXY_CONFIG_TEMPLATE)
    assert all(line not in rebound for line in ON_ENDPOINT_HOST)
    assert rebound.count("bind {{ config.frontend_host }}:") == 3  # the endpoint, the stats page, the metrics page


def test_serve_s_haproxy_config_holds_a_request_whole_before_sending_it_so_that_a_dying_replicas_is_resent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve has no setting for `option http-buffer-request`: it rides on RAY_SERVE_HAPROXY_RETRY_ON's second line,
    which Serve writes into its config as it is. A Ray that escaped or checked that value would drop it: this says so,
    and HAProxy itself checks the file."""
    from ray.serve._private.haproxy import get_haproxy_binary

    api = _haproxy(tmp_path, free_port(), free_port(), free_port(), monkeypatch)
    api.cfg.retry_on = HAPROXY_RETRY_ON
    api._generate_config_file_internal()
    config = (tmp_path / "haproxy.cfg").read_text()
    defaults = config.split("\ndefaults\n", 1)[1].split("\nfrontend ", 1)[0].splitlines()
    assert "    retry-on conn-failure empty-response" in defaults
    assert "    option http-buffer-request" in defaults
    check = subprocess.run([get_haproxy_binary(), "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True,
                           text=True, timeout=30)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


def _held_ports(count: int) -> list[socket.socket]:
    """`count` ports on the serving host, bound and listening until closed: taken, as another process may take them."""
    holders = []
    for _ in range(count):
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        holders.append(holder)
    return holders


def _answers(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status


def _haproxy(folder: Path, endpoint: int, stats: int, metrics: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Serve's HAProxyApi as Serve's HAProxyManager makes it, patched as the setup hook patches it, files in `folder`:
    a real HAProxy without Ray."""
    from ray.serve._private import haproxy
    from ray.serve.config import HTTPOptions

    monkeypatch.setattr(haproxy, "HAPROXY_CONFIG_TEMPLATE", on_endpoint_host(haproxy.HAPROXY_CONFIG_TEMPLATE))
    monkeypatch.setattr(haproxy.HAProxyApi, "start", haproxy.HAProxyApi.start)  # put back after the test
    retry_taken_pages(haproxy)
    config = haproxy.HAProxyConfig(
        http_options=HTTPOptions(host="127.0.0.1", port=endpoint), stats_port=stats, metrics_port=metrics,
        socket_path=f"{folder}/admin.sock", server_state_base=str(folder), server_state_file=f"{folder}/server-state",
        metrics_socket_path=f"{folder}/metrics.sock")
    return haproxy.HAProxyApi(cfg=config, config_file_path=f"{folder}/haproxy.cfg")


def test_haproxy_whose_pages_ports_are_taken_starts_again_on_fresh_ones_its_pages_answering_on_the_serving_host(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    holders = _held_ports(2)
    taken = [holder.getsockname()[1] for holder in holders]
    endpoint = free_port()
    api = _haproxy(tmp_path, endpoint, taken[0], taken[1], monkeypatch)

    async def start_and_ask() -> tuple[list[tuple[str, int]], int, int]:
        await asyncio.wait_for(api.start(), timeout=60)
        try:
            return (_listeners(api._proc.pid), _answers(f"http://127.0.0.1:{api.cfg.stats_port}/stats"),
                    _answers(f"http://127.0.0.1:{api.cfg.metrics_port}/metrics"))
        finally:
            await api.stop()

    try:
        listeners, stats, metrics = asyncio.run(start_and_ask())
    finally:
        for holder in holders:
            holder.close()
    pages = {api.cfg.stats_port, api.cfg.metrics_port}
    assert len(pages) == 2 and not pages & set(taken)
    assert sorted(listeners) == sorted(("127.0.0.1", p) for p in (endpoint, *pages))
    assert (stats, metrics) == (200, 200)
    assert f"127.0.0.1:{api.cfg.stats_port}" in (tmp_path / "haproxy.cfg").read_text()  # what it got, read back


def test_haproxy_whose_endpoint_port_is_taken_fails_at_once_its_pages_not_moved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint's port is the user's: crlft names its holder before Serve starts; nothing moves it elsewhere."""
    holders = _held_ports(2)
    endpoint, stats = (holder.getsockname()[1] for holder in holders)
    metrics = free_port()
    api = _haproxy(tmp_path, endpoint, stats, metrics, monkeypatch)
    try:
        with pytest.raises(RuntimeError, match=rf"Address already in use\) for \[127.0.0.1:{endpoint}\]"):
            asyncio.run(asyncio.wait_for(api.start(), timeout=60))
    finally:
        for holder in holders:
            holder.close()
    assert (api.cfg.stats_port, api.cfg.metrics_port, api._spawn_seq) == (stats, metrics, 1)


def test_what_the_setup_hook_patches_is_in_the_installed_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each patch checks what it patches and fails loudly after a Ray upgrade that moved it: none fails on this Ray."""
    from ray.serve._private import haproxy, proxy, proxy_state

    monkeypatch.setattr(haproxy.HAProxyApi, "start", haproxy.HAProxyApi.start)  # each put back after the test
    monkeypatch.setattr(proxy, "start_asgi_http_server", proxy.start_asgi_http_server)
    monkeypatch.setattr(proxy_state.ProxyStateManager, "get_fallback_proxy_targets",
                        proxy_state.ProxyStateManager.get_fallback_proxy_targets)
    for module, patch in ((haproxy, retry_taken_pages), (proxy, fallback_binds_its_own_port),
                          (proxy_state, fallback_target_on_its_port)):
        patch(module)
        patch(module)  # once only
    assert proxy.start_asgi_http_server._crlft and proxy_state.ProxyStateManager.get_fallback_proxy_targets._crlft


@pytest.mark.slow
def test_crlft_serve_whose_pages_ports_are_taken_comes_up_on_fresh_ones_on_the_serving_host_its_fallback_on_its_own(
        model: Path, port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ports for HAProxy's pages taken before HAProxy binds them (set as a user would: the user's values win over
    crlft's draw): the stack still serves, its pages on fresh ports, all on the serving host; Serve's fallback proxy
    binds a port of its own (the kernel's choice: the ephemeral range, where crlft's draws never fall) and HAProxy's
    backup server is that port."""
    holders = _held_ports(2)
    taken = {holder.getsockname()[1] for holder in holders}
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", str(holders[0].getsockname()[1]))
    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", str(holders[1].getsockname()[1]))
    monkeypatch.delenv("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", raising=False)
    try:
        with _serving(model, port, tmp_path, "transformers") as process:
            assert process.stdout is not None
            line = next((line for line in process.stdout if line.startswith("serving ")), "")
            assert f"http://127.0.0.1:{port}/v1" in line, f"not served; exit status {process.poll()}, stderr:\n" + \
                (tmp_path / "stderr.log").read_text()[-3000:]
            mark = _session_mark_of(process.pid)
            assert mark
            listeners, folders = _haproxy_of(mark)
            assert {ip for ip, _ in listeners} == {"127.0.0.1"}
            config = next(iter(folders)) / "haproxy.cfg"
            pages = {name: int(re.search(rf"{frontend}\s+bind 127\.0\.0\.1:(\d+)", config.read_text())[1])
                     for name, frontend in (("stats", "listen stats"), ("metrics", "frontend prometheus"))}
            assert {("127.0.0.1", page) for page in pages.values()} <= listeners and not set(pages.values()) & taken
            assert _answers(f"http://127.0.0.1:{pages['stats']}/stats") == 200
            assert _answers(f"http://127.0.0.1:{pages['metrics']}/metrics") == 200
            fallback = None
            deadline = time.monotonic() + 60
            while fallback is None and time.monotonic() < deadline:  # HAProxy is told of it once it is ready
                fallback = re.search(r"server \S+ ([\d.]+):(\d+) check backup", config.read_text())
                time.sleep(0.5)
            assert fallback, "HAProxy was never given the fallback proxy"
            assert int(fallback[2]) in ephemeral_ports()
            assert _answers(f"http://{fallback[1]}:{fallback[2]}/-/routes") == 200
            assert _answers(f"http://127.0.0.1:{port}/v1/models") == 200
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=STOP_LIMIT_S) in (0, 128 + signal.SIGTERM)
        time.sleep(1.0)
        assert marked_processes(mark) == []
    finally:
        for holder in holders:
            holder.close()
