"""Test-wide setup: everything offline and quiet before any library reads its environment at import time."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

# huggingface_hub reads HF_HUB_OFFLINE when first imported: set it before anything imports transformers.
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """A local Ray for the tests of one module (4 logical CPUs on 2 cores: workers take fractions), dashboard on
    loopback on the port it binds itself (without it Train logs state-API errors in a loop)."""
    import ray

    saved_env = dict(os.environ)
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
             logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved_env)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small tokenizer trained on the built-in corpus (what the embedded default model gets), saved in a folder."""
    from crlft.presets import default_corpus, train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(default_corpus(), vocab_size=600).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as `crlft init-model --from smollm2` writes it (its module, as `ray job submit` would run
    it), once for every module that fine-tunes the real model."""
    out = tmp_path_factory.mktemp("models") / "smollm2"
    subprocess.run([sys.executable, "-m", "crlft.commands.init_model", "--from", "smollm2", "--out", str(out)],
                   check=True)
    return out


@pytest.fixture
def judge_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A stand-in OpenAI-compatible judge (no judge model runs here): records each request, answers with a rating
    and no pairwise verdict (a tie when two answers are compared)."""
    requests: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            status, reply = (400, {"error": "no such model"}) if body["model"] == "missing" else (
                200, {"choices": [{"message": {"role": "assistant", "content": "Sound. Rating: [[6]]"}}]})
            payload = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", requests
    finally:
        server.shutdown()
        server.server_close()
