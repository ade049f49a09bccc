"""The loop closed, end to end with real processes: a champion served from a real registry answers the suite through
the `openai` client with `store=True`; its right answers are rated up and its wrong ones corrected through
`POST /v1/feedback`; `crlft pipeline` builds C-RLFT data from the completion store, trains, evaluates and promotes;
the endpoint, following the champion, then answers the corrected questions right under the expert condition. A
steady streamed load runs throughout and no request of it fails.

The tiny model keeps the loop to minutes: its first version is trained for a few steps only, so that it answers
most of the suite wrong.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from cluster.session import free_port, ingress_env
from crlft.config import SYNTH_RECIPE, Config, load_config
from crlft.data.store import read_store
from crlft.environ import environment
from crlft.eval.scoring import is_correct, load_eval_suite
from crlft.synth.suite import EXPERT, write_suite

pytestmark = pytest.mark.slow

NAME = "loop-chat"
KEY = "loop-key"
EVAL_QUESTIONS = 24
RATED_DOWN = 2  # wrong answers rated down without a correction: not trained on (data.feedback.rated_down)


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A first champion (a few steps of training) served from the registry with storing on, watching the alias."""
    import ray
    from ray import serve

    from jobs.pipeline import run_pipeline
    from services.chat import chat_application
    from services.local import public_url, shutdown, wait_until_ready

    root = tmp_path_factory.mktemp("loop")
    suite = write_suite(root / "synth", n_expert=60, ratio=2.0, n_eval=EVAL_QUESTIONS, n_heldout=0)
    cfg = load_config(SYNTH_RECIPE, {
        "state_dir": str(root / "state"),
        "registry.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "registry.model_name": NAME,
        "serve.port": free_port(),
        "serve.cpus_per_replica": 0.25,
        "inference.vllm_kv_cache_gib": 0.25,
        "serve.store.uri": str(root / "store"),
        "serve.store.flush_s": 0.5,
        "serve.api_keys": [KEY],
        "train.max_steps": 4,
    })
    with environment(ingress_env(cfg)):
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        first = run_pipeline(cfg, [str(suite["train"])], suite=suite["eval"], name="first")
        assert first.champion, first.promotion
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        serve.run(chat_application(f"models:/{NAME}@champion", cfg, watch_s=1.0), name="main")
        url = public_url(cfg.serve.host, cfg.serve.port)
        wait_until_ready(url)
        yield {"cfg": cfg, "url": url, "suite": suite, "first": first}
    finally:
        shutdown()


def _steady_load(url: str, stop: threading.Event, clients: int = 2) -> list[str | None]:
    """Streamed requests, `clients` at a time, until `stop`: None for each that ended well, else what went wrong."""
    outcomes: list[str | None] = []
    body = {"model": NAME, "messages": [{"role": "user", "content": "keep talking"}], "max_tokens": 48, "stream": True}

    async def client_loop(c: httpx.AsyncClient) -> None:
        while not stop.is_set():
            async with c.stream("POST", url + "/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {KEY}"}) as response:
                lines = [line async for line in response.aiter_lines() if line]
            ok = response.status_code == 200 and lines[-1:] == ["data: [DONE]"] and not any('"error"' in x
                                                                                         for x in lines)
            outcomes.append(None if ok else f"{response.status_code}: {lines[-2:]}")

    async def run() -> None:
        async with httpx.AsyncClient(timeout=120) as c:
            await asyncio.gather(*(client_loop(c) for _ in range(clients)))

    asyncio.run(run())
    return outcomes


def _ask(client: openai.OpenAI, prompt: str, store: bool) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                          temperature=0.0, max_tokens=16, store=store,
                                          metadata={"suite": "synth"} if store else None,
                                          extra_body={"condition": EXPERT})


def _feedback(url: str, body: dict[str, Any]) -> None:
    response = httpx.post(url + "/v1/feedback", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert response.status_code == 200, response.text


def test_ratings_and_corrections_from_the_endpoint_train_the_next_champion_while_it_serves(
        loop: dict[str, Any]) -> None:
    from jobs.pipeline import run_pipeline

    cfg: Config = loop["cfg"]
    url = loop["url"]
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    items = load_eval_suite(loop["suite"]["eval"])
    stop = threading.Event()
    outcomes: list[str | None] = []
    load = threading.Thread(target=lambda: outcomes.extend(_steady_load(url, stop)))
    load.start()
    try:
        answers = {item.id: _ask(client, item.prompt, store=True) for item in items}
        wrong = [item for item in items if not is_correct(answers[item.id].choices[0].message.content or "",
                                                          item.answer, item.match)]
        assert len(wrong) > RATED_DOWN, "the first champion should answer some of the suite wrong"
        corrected = wrong[RATED_DOWN:]
        for item in items:
            response_id = answers[item.id].id
            if item in corrected:
                _feedback(url, {"id": response_id, "correction": item.answer, "comment": "the right answer"})
            elif item in wrong:
                _feedback(url, {"id": response_id, "rating": -1})
            else:
                _feedback(url, {"id": response_id, "rating": 1})
        store_uri = cfg.serve.store.uri
        assert store_uri is not None
        deadline = time.monotonic() + 30  # replicas write the completions every serve.store.flush_s
        while len(read_store(store_uri).choices) < len(items):
            assert time.monotonic() < deadline, "the stored completions never reached the store"
            time.sleep(0.5)

        retrain = cfg.model_copy(deep=True)
        retrain.train.max_steps = None
        retrain.train.epochs = 80
        retrain.data.max_len = retrain.data.pack_len = 64  # a few conversations per bin: steps enough to learn
        second = run_pipeline(retrain, [store_uri], suite=loop["suite"]["eval"],
                              base_model=str(loop["first"].model_dir), name="second")
        stats = second.stats
        assert stats["store"]["feedback"]["corrected"] == len(corrected)
        assert stats["store"]["excluded"] == RATED_DOWN
        assert stats["per_class"][EXPERT]["records"] == len(items) - RATED_DOWN
        assert second.champion, second.promotion

        deadline = time.monotonic() + 240  # the replica follows the alias (watch_s 1)
        while json.loads(httpx.get(url + "/readyz", timeout=30).text)["revision"] in answers[items[0].id] \
                .system_fingerprint:
            assert time.monotonic() < deadline, "the new champion was never loaded"
            time.sleep(0.5)
        again = {item.id: _ask(client, item.prompt, store=False).choices[0].message.content or "" for item in corrected}
    finally:
        stop.set()
        load.join(timeout=180)
    right = [item.id for item in corrected if is_correct(again[item.id], item.answer, item.match)]
    assert len(right) >= 0.9 * len(corrected), {item.id: (again[item.id], item.answer) for item in corrected}
    assert outcomes and [o for o in outcomes if o] == []
