"""A real `mlflow server` on loopback for the tests (SQLite store, served artifacts under its folder): launched, waited
for, stopped and started again on the same port and store."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from cluster.ports import free_port

START_TIMEOUT_S = 120
BIND_ATTEMPTS = 3
IN_USE = "address already in use"  # what uvicorn logs, before the server exits (with status 0), on a taken port


class TrackingServer:
    """`mlflow server --port` takes a port and cannot say which it bound: its port is drawn by `free_port`, and a first
    start that finds it taken starts again on a fresh one (cluster/ports.py's rule). Once the server has answered, its
    URI is the tests' and a restart keeps the port."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.process: subprocess.Popen | None = None
        self.answered = False  # the URI handed out: the port is the tests' now
        self._log_from = 0

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> None:
        """Start the process without waiting for it (its start is slow: let other setup overlap it)."""
        log_file = self.root / "server.log"
        self._log_from = log_file.stat().st_size if log_file.exists() else 0
        command = [
            str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"), "--default-artifact-root", "mlflow-artifacts:/",
            "--workers", "1",
        ]  # fmt: skip
        with (self.root / "server.log").open("a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})

    def wait(self) -> str:
        """The URI, once this server (not another process on its port) answers its health check; a first start that
        found its port taken starts again on a fresh one; the test fails if it exits otherwise or takes too long."""
        deadline, attempts = time.monotonic() + START_TIMEOUT_S, 1
        while not (self.healthy() and self._listening()):
            exited = self.process is None or self.process.poll() is not None
            if exited and not self.answered and attempts < BIND_ATTEMPTS and IN_USE in self._log().lower():
                self.port, attempts = free_port(), attempts + 1
                self.launch()
                continue
            if exited or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {self._log()[-2000:]}")
            time.sleep(0.3)
        self.answered = True
        return self.uri

    def _log(self) -> str:
        """What the server logged since its last launch."""
        with (self.root / "server.log").open(errors="replace") as log:
            log.seek(self._log_from)
            return log.read()

    def _listening(self) -> bool:
        """Whether the port's listener is this server's process or one of its children."""
        if self.process is None:
            return False
        try:
            root = psutil.Process(self.process.pid)
            ours = {root.pid, *(child.pid for child in root.children(recursive=True))}
        except psutil.Error:
            return False
        return any(c.pid in ours for c in psutil.net_connections(kind="tcp")
                   if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port)

    def start(self) -> str:
        self.launch()
        return self.wait()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM, as a server being shut down gets (SIGKILL after 20 s); the port refuses connections after."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)
        self.process = None
