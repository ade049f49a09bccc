"""Clean starts and stops: `crlft serve` (and every command that starts a local Ray) stopped by SIGTERM to its pid or to
its whole process group, on one port, leaves nothing running or listening; a taken port is one line of crlft's own.

Real processes throughout: `crlft serve` runs as a subprocess in a session of its own, as a shell starts it, and is
signalled by pid or by process group (what `kill`/Kubernetes and systemd/`timeout`/a terminal do)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cluster.haproxy_pages import ON_ENDPOINT_HOST, on_endpoint_host
from cluster.session import SESSION_MARK, Stopped, free_port, marked_processes, stop_on_signals, stop_signal_received
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


def _config_folder(haproxy: psutil.Process) -> Path:
    """The folder of the config file HAProxy runs (`haproxy -f FILE`), where Serve keeps all it writes for the node."""
    command = haproxy.cmdline()
    return Path(command[command.index("-f") + 1]).parent


@contextlib.contextmanager
def _serving(model: Path, port: int, state: Path, engine: str) -> Iterator[subprocess.Popen[str]]:
    """`crlft serve` in a session of its own, stderr in state/stderr.log; killed with its group if a test leaves it."""
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
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


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
        haproxy = [p for p in marked_processes(mark) if p.name() == "haproxy"]
        assert haproxy, "HAProxy is not the ingress"
        # HAProxy's endpoint, stats page and Prometheus page all listen on the endpoint's host only
        assert {ip for p in haproxy for ip, _ in _listeners(p.pid)} == {"127.0.0.1"}
        haproxy_folders = {_config_folder(p) for p in haproxy}  # Serve's /tmp/haproxy-serve/<node id>
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
