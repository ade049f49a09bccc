"""A real `mlflow server` on loopback for the tests (SQLite store, served artifacts under its folder): launched, waited
for, stopped and started again on the same port and store."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cluster.session import free_port

START_TIMEOUT_S = 120


class TrackingServer:
    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def launch(self) -> None:
        """Start the process without waiting for it (its start is slow: let other setup overlap it)."""
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
        """The URI, once the server answers its health check (the test fails if it exits or takes too long)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.healthy():
            if self.process is None or self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        return self.uri

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
