"""Autoscaling: under load the chat deployment grows from one replica to two, and back to one when the load ends.

Real Ray Serve on loopback with the transformers engine (the replica count is Serve's business, whatever the engine),
short autoscaling windows and delays so that it happens within a test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from cluster.session import free_port, ingress_env
from crlft.config import Config, load_config
from crlft.environ import environment
from crlft.export import ModelMeta, save_exported
from crlft.model import load_model_and_tokenizer
from crlft.presets import init_model

APP = "scaling"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import ray
    from ray import serve

    from services.chat import chat_application
    from services.local import public_url, shutdown, wait_until_ready

    root = tmp_path_factory.mktemp("scaling")
    model, tokenizer = load_model_and_tokenizer(str(init_model(root / "base", seed=0)))
    folder = save_exported(model, tokenizer, root / "exported", ModelMeta.from_config(Config(), seed=0))
    cfg = load_config(None, {
        "state_dir": str(root / "state"), "serve.port": free_port(), "inference.engine": "transformers",
        "serve.cpus_per_replica": 0.25, "serve.min_replicas": 1, "serve.max_replicas": 2,
        "serve.target_ongoing_requests": 1, "serve.upscale_delay_s": 0.5, "serve.downscale_delay_s": 3,
        "serve.autoscaling_window_s": 2, "serve.model_name": APP,
    })
    with environment(ingress_env(cfg)):  # the ingress `crlft serve` puts in front
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        serve.run(chat_application(str(Path(folder)), cfg), name=APP)
        url = public_url(cfg.serve.host, cfg.serve.port)
        wait_until_ready(url)
        yield url
    finally:
        shutdown()


def _running_replicas() -> int:
    from ray import serve

    [deployment] = serve.status().applications[APP].deployments.values()
    return deployment.replica_states.get("RUNNING", 0)


def _wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def _load(url: str, stop: threading.Event, statuses: list[int]) -> None:
    body = {"model": APP, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 200}
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            statuses.append(client.post(url + "/v1/chat/completions", json=body).status_code)


@pytest.mark.slow
def test_replicas_go_from_one_to_two_under_load_and_back_to_one_after(endpoint: str) -> None:
    assert _running_replicas() == 1
    stop, statuses = threading.Event(), []
    clients = [threading.Thread(target=_load, args=(endpoint, stop, statuses)) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        assert _wait_for(lambda: _running_replicas() == 2, timeout_s=120), "never scaled up to 2 replicas"
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=120)
    assert statuses and set(statuses) == {200}
    assert _wait_for(lambda: _running_replicas() == 1, timeout_s=120), "never scaled back down to 1 replica"
