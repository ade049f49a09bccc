"""Stored completions and feedback at the endpoint: real Ray Serve on loopback, the official `openai` client, the
completion store read back with crlft.data.store.read_store.

One Serve instance, four apps on the tiny model:
- main (`/`): `models:/store-chat@champion` from a real MLflow registry, two API keys, a store written every 0.2 s;
- open (`/open`): no store;
- broken (`/broken`): stores by default into a store whose completions and feedback folders are files (writes fail);
- lazy (`/lazy`): a store written every hour, queue of 2 choices: only its shutdown writes it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cluster.session import free_port, ingress_env
from crlft.config import Config, load_config
from crlft.data.store import StoreContents, id_belongs, key_id, read_secret, read_store
from crlft.environ import environment
from crlft.export import ModelMeta, save_exported
from crlft.model import load_model_and_tokenizer
from crlft.presets import init_model
from services import protocol
from services.protocol import MAX_FEEDBACK_BYTES, ApiError

REGISTERED = "store-chat"
KEY_A = "sk-store-alpha-5b1e0c"
KEY_B = "sk-store-bravo-92d7aa"
ASK = {"max_tokens": 8, "temperature": 0.0}
USER = [{"role": "user", "content": "hello there"}]


# ---------------------------------------------------------------------------------------------------------------------
# Without Ray: the wire format


def _chat(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": USER, **fields}).encode()


@pytest.mark.parametrize("fields", [
    {"metadata": {f"k{i}": "v" for i in range(17)}},
    {"metadata": {"k" * 65: "v"}},
    {"metadata": {"k": "v" * 513}},
    {"metadata": {"k": 1}},
    {"metadata": ["k", "v"]},
])
def test_metadata_beyond_openai_s_limits_is_a_400_naming_it(fields: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as caught:
        protocol.parse_request(_chat(**fields))
    assert (caught.value.status, caught.value.param) == (400, "metadata")


def test_store_and_metadata_within_the_limits_are_read() -> None:
    metadata = {f"k{i}": "v" * 512 for i in range(16)}
    body = protocol.parse_request(_chat(store=True, metadata=metadata))
    assert body.store is True and body.metadata == metadata
    assert protocol.parse_request(_chat()).store is None
    with pytest.raises(ApiError) as caught:
        protocol.parse_request(_chat(store="yes"))
    assert caught.value.param == "store"


@pytest.mark.parametrize(("body", "param"), [
    ({"id": "x", "rating": 2}, "rating"),
    ({"id": "x", "rating": True}, "rating"),
    ({"id": "x", "rating": "1"}, "rating"),
    ({"id": 5, "rating": 1}, "id"),
    ({"rating": 1}, "id"),
    ({"id": "x", "choice": "0", "rating": 1}, "choice"),
    ({"id": "x", "choice": -1, "rating": 1}, "choice"),
    ({"id": "x"}, "rating"),
    ({"id": "x", "correction": "  "}, "correction"),
    ({"id": "x", "rating": 1, "ratings": 1}, "ratings"),
])
def test_malformed_feedback_is_a_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as caught:
        protocol.parse_feedback(json.dumps(body).encode())
    assert (caught.value.status, caught.value.param) == (400, param)


# ---------------------------------------------------------------------------------------------------------------------
# Real Serve


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import ray
    from ray import serve

    from crlft.lineage.promotion import promote
    from crlft.lineage.registration import register_model
    from services.chat import chat_application
    from services.local import public_url, shutdown, wait_until_ready

    root = tmp_path_factory.mktemp("store")
    model, tokenizer = load_model_and_tokenizer(str(init_model(root / "base", seed=0)))
    folder = save_exported(model, tokenizer, root / "exported", ModelMeta.from_config(Config()))
    base = {"state_dir": str(root / "state"), "registry.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
            "registry.model_name": REGISTERED, "serve.port": free_port(), "serve.cpus_per_replica": 0.25,
            "serve.max_replicas": 1, "inference.engine": "transformers"}
    cfg = load_config(None, {**base, "serve.store.uri": str(root / "main"), "serve.store.flush_s": 0.2})
    promote(REGISTERED, register_model(folder, cfg), force=True, cfg=cfg)
    broken = load_config(None, {**base, "serve.store.uri": str(root / "broken"), "serve.store.by_default": True,
                                "serve.store.flush_s": 0.2})
    lazy = load_config(None, {**base, "serve.store.uri": str(root / "lazy"), "serve.store.flush_s": 3600,
                              "serve.store.queue": 2})
    with environment(ingress_env(cfg)):
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        apps = {"main": chat_application(f"models:/{REGISTERED}@champion", cfg, api_keys=[KEY_A, KEY_B], watch_s=0),
                "open": chat_application(str(folder), load_config(None, base)),
                "broken": chat_application(str(folder), broken),
                "lazy": chat_application(str(folder), lazy)}
        for name in ("completions", "feedback"):  # a file where the store's folder should be: every write fails
            (root / "broken" / name).write_text("not a folder")
        serve.run_many([serve.RunTarget(app, name=name, route_prefix="/" if name == "main" else f"/{name}")
                        for name, app in apps.items()])
        url = public_url(cfg.serve.host, cfg.serve.port)
        for app_url in (url, url + "/open", url + "/broken", url + "/lazy"):
            wait_until_ready(app_url)
        yield {"url": url, "root": root}
    finally:
        shutdown()


def _client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client_a(stack: dict[str, Any]) -> openai.OpenAI:
    return _client(stack["url"], KEY_A)


@pytest.fixture(scope="module")
def client_b(stack: dict[str, Any]) -> openai.OpenAI:
    return _client(stack["url"], KEY_B)


def _wait_for(read: Callable[[], Any], done: Callable[[Any], bool], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def _stored(root: Path, response_id: str, choices: int = 1) -> list[dict[str, Any]]:
    """The rows of `response_id` once the replica has written them (in choice order)."""

    def rows(contents: StoreContents) -> list[dict[str, Any]]:
        return [c.completion for c in contents.choices if c.completion["id"] == response_id]

    contents = _wait_for(lambda: read_store(str(root)), lambda c: len(rows(c)) >= choices)
    return sorted(rows(contents), key=lambda r: r["choice"])


def _feedback(url: str, body: Any, key: str | None = KEY_A, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        return httpx.post(url + "/v1/feedback", content=body, headers=headers, timeout=30, **kwargs)
    return httpx.post(url + "/v1/feedback", json=body, headers=headers, timeout=30, **kwargs)


def _metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.split()[-1])
    return 0.0


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.slow
def test_a_stored_answer_keeps_what_was_asked_and_answered_under_its_response_id(
        stack: dict[str, Any], client_a: openai.OpenAI) -> None:
    [card] = client_a.models.list().data
    assert (card.model_extra or {})["store"] is True
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and now?"}]
    started = time.time()
    answer = client_a.chat.completions.create(model=REGISTERED, messages=messages, store=True,
                                              metadata={"topic": "greeting"}, extra_body={"condition": "GPT3"}, **ASK)
    secret = read_secret(str(stack["root"] / "main"))
    assert id_belongs(secret, answer.id, key_id(KEY_A)) and not id_belongs(secret, answer.id, key_id(KEY_B))
    [row] = _stored(stack["root"] / "main", answer.id)
    assert answer.usage is not None
    assert row == {
        "id": answer.id, "choice": 0, "created": row["created"], "model": REGISTERED, "model_version": "1",
        "revision": (card.model_extra or {})["revision"], "condition": "GPT3", "system": "be brief",
        "messages": json.dumps(messages[1:]), "answer": answer.choices[0].message.content,
        "finish_reason": answer.choices[0].finish_reason, "prompt_tokens": answer.usage.prompt_tokens,
        "completion_tokens": answer.usage.completion_tokens, "metadata": '{"topic": "greeting"}',
        "key_id": key_id(KEY_A)}
    assert started - 1 <= row["created"] <= time.time()


@pytest.mark.slow
def test_a_streamed_answer_of_two_choices_is_stored_under_the_chunks_id_one_row_per_choice(
        stack: dict[str, Any], client_b: openai.OpenAI) -> None:
    chunks = list(client_b.chat.completions.create(model=REGISTERED, messages=USER, store=True, n=2, seed=3,
                                                   stream=True, stream_options={"include_usage": True}, max_tokens=8))
    [cid] = {c.id for c in chunks}
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in range(2)]
    usage = chunks[-1].usage
    assert usage is not None
    rows = _stored(stack["root"] / "main", cid, choices=2)
    assert [r["choice"] for r in rows] == [0, 1] and [r["answer"] for r in rows] == texts
    assert {r["key_id"] for r in rows} == {key_id(KEY_B)} and {r["metadata"] for r in rows} == {"{}"}
    assert {r["prompt_tokens"] for r in rows} == {usage.prompt_tokens}
    assert sum(r["completion_tokens"] for r in rows) == usage.completion_tokens
    assert {r["condition"] for r in rows} == {"GPT4"} and {r["system"] for r in rows} == {""}


@pytest.mark.slow
def test_requests_that_do_not_ask_to_be_stored_are_not_stored(stack: dict[str, Any],
                                                               client_a: openai.OpenAI) -> None:
    unstored = [client_a.chat.completions.create(model=REGISTERED, messages=USER, store=False, **ASK).id,
                client_a.chat.completions.create(model=REGISTERED, messages=USER, n=2, **ASK).id]
    marker = client_a.chat.completions.create(model=REGISTERED, messages=USER, store=True, **ASK).id
    _stored(stack["root"] / "main", marker)  # written after the others would have been
    ids = {c.completion["id"] for c in read_store(str(stack["root"] / "main")).choices}
    assert marker in ids and not ids & set(unstored)


@pytest.mark.slow
def test_without_a_store_asking_to_store_or_giving_feedback_is_a_400_that_says_how_to_enable_it(
        stack: dict[str, Any]) -> None:
    client = _client(stack["url"] + "/open")
    [card] = client.models.list().data
    assert (card.model_extra or {})["store"] is False
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=card.id, messages=USER, store=True, **ASK)
    error = caught.value.body
    assert isinstance(error, dict) and (error["param"], error["code"]) == ("store", "store_disabled")
    assert "serve.store.uri" in error["message"]
    assert client.chat.completions.create(model=card.id, messages=USER, **ASK).choices
    refused = _feedback(stack["url"] + "/open", {"id": "chatcmpl-x", "rating": 1}, key=None)
    assert refused.status_code == 400 and _error(refused)["code"] == "store_disabled"


@pytest.mark.slow
def test_feedback_on_one_s_own_answer_is_written_before_it_is_acknowledged(
        stack: dict[str, Any], client_a: openai.OpenAI) -> None:
    answer = client_a.chat.completions.create(model=REGISTERED, messages=USER, store=True, n=2, **ASK)
    rated = _feedback(stack["url"], {"id": answer.id, "choice": 1, "rating": -1, "correction": "Hello! How are you?",
                                     "comment": "too terse"})
    assert rated.status_code == 200, rated.text
    assert rated.json() == {"object": "chat.completion.feedback", "id": answer.id, "choice": 1, "rating": -1,
                            "correction": True, "comment": True, "stored": True}
    _stored(stack["root"] / "main", answer.id, choices=2)
    contents = read_store(str(stack["root"] / "main"))
    [first, second] = [c for c in contents.choices if c.completion["id"] == answer.id]
    assert first.feedback is None
    assert second.feedback is not None and second.rating == -1 and second.correction == "Hello! How are you?"
    assert second.feedback["comment"] == "too terse" and second.feedback["key_id"] == key_id(KEY_A)
    assert _feedback(stack["url"], {"id": answer.id, "rating": 1}).status_code == 200  # the latest wins
    latest = read_store(str(stack["root"] / "main"))
    assert [c.rating for c in latest.choices if c.completion["id"] == answer.id] == [1, -1]


@pytest.mark.slow
def test_hostile_feedback_is_an_openai_shaped_4xx_and_stores_nothing(stack: dict[str, Any], client_a: openai.OpenAI,
                                                                     client_b: openai.OpenAI) -> None:
    url, store = stack["url"], stack["root"] / "main"
    mine = client_a.chat.completions.create(model=REGISTERED, messages=USER, store=True, **ASK).id
    theirs = client_b.chat.completions.create(model=REGISTERED, messages=USER, store=True, **ASK).id
    unstored = client_a.chat.completions.create(model=REGISTERED, messages=USER, **ASK).id
    forged = mine[:-1] + ("0" if mine[-1] != "0" else "1")
    parts_before = sorted(store.glob("feedback/**/*.parquet"))

    def chunked() -> Iterator[bytes]:  # no Content-Length: the replica counts what arrives
        yield b'{"id": "' + mine.encode() + b'", "comment": "'
        for _ in range(MAX_FEEDBACK_BYTES // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    cases: list[tuple[Any, str | None, int, str | None]] = [  # body, key, status, param
        ({"id": theirs, "rating": 1}, KEY_A, 404, "id"),
        ({"id": "chatcmpl-" + "0" * 40, "rating": 1}, KEY_A, 404, "id"),
        ({"id": forged, "rating": 1}, KEY_A, 404, "id"),
        ({"id": unstored, "rating": 1}, KEY_A, 404, "id"),
        (b"{not json", KEY_A, 400, None),
        (b"[1, 2]", KEY_A, 400, None),
        ({"id": mine, "rating": 2}, KEY_A, 400, "rating"),
        ({"id": mine, "choice": "0", "rating": 1}, KEY_A, 400, "choice"),
        ({"id": [mine], "rating": 1}, KEY_A, 400, "id"),
        ({"rating": 1}, KEY_A, 400, "id"),
        ({"id": mine}, KEY_A, 400, "rating"),
        ({"id": mine, "correction": "x" * (MAX_FEEDBACK_BYTES + 1)}, KEY_A, 413, None),
        (chunked(), KEY_A, 413, None),
        ({"id": mine, "rating": 1}, None, 401, None),
        ({"id": mine, "rating": 1}, "sk-wrong", 401, None),
    ]
    for body, key, status, param in cases:
        if isinstance(body, dict | bytes):
            response = _feedback(url, body, key)
        else:
            response = httpx.post(url + "/v1/feedback", content=body, headers={"Authorization": f"Bearer {key}"},
                                  timeout=30)
        assert response.status_code == status, (body if isinstance(body, dict | bytes) else "chunked", response.text)
        error = _error(response)
        assert error["param"] == param, (body, error)
        if status == 404:
            assert error["code"] == "response_not_found"
            assert error["message"] == f"no stored response {body['id']!r}"  # others' ids and unknown ones alike
    time.sleep(0.5)
    assert sorted(store.glob("feedback/**/*.parquet")) == parts_before


@pytest.mark.slow
def test_api_keys_never_reach_the_store_or_the_logs(stack: dict[str, Any], client_a: openai.OpenAI,
                                                    client_b: openai.OpenAI) -> None:
    import ray

    store = stack["root"] / "main"
    for client, key in ((client_a, KEY_A), (client_b, KEY_B)):
        answer = client.chat.completions.create(model=REGISTERED, messages=USER, store=True, **ASK)
        assert _feedback(stack["url"], {"id": answer.id, "rating": 1, "comment": "fine"}, key).status_code == 200
        _stored(store, answer.id)
    assert {c.completion["key_id"] for c in read_store(str(store)).choices} >= {key_id(KEY_A), key_id(KEY_B)}
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    files = [f for f in [*store.rglob("*"), *logs.rglob("*")] if f.is_file()]
    assert any(f.suffix == ".parquet" for f in files)
    for f in files:
        data = f.read_bytes()
        for secret in (KEY_A.encode(), KEY_B.encode(), b"Bearer"):
            assert secret not in data, f"{secret!r} in {f}"


@pytest.mark.slow
def test_a_failing_store_drops_and_counts_but_every_answer_is_200_and_feedback_a_503(stack: dict[str, Any]) -> None:
    url = stack["url"] + "/broken"
    client = _client(url)
    name = "crlft_store_dropped_completions_total"
    before = _metric(url, name, '{reason="write_failed"}')
    answers = [client.chat.completions.create(model="exported", messages=USER, **ASK),
               client.chat.completions.create(model="exported", messages=USER, store=True, n=2, **ASK)]
    list(client.chat.completions.create(model="exported", messages=USER, stream=True, **ASK))
    after = _wait_for(lambda: _metric(url, name, '{reason="write_failed"}'), lambda n: n >= before + 4)
    assert after == before + 4  # 1 + 2 + 1 choices, all stored by default
    assert _metric(url, "crlft_stored_completions_total") == 0
    refused = _feedback(url, {"id": answers[1].id, "rating": 1}, key=None)
    assert refused.status_code == 503 and _error(refused)["code"] == "store_unavailable"
    assert refused.headers["retry-after"] == "1"


@pytest.mark.slow
def test_what_is_queued_is_written_when_the_replica_shuts_down_and_a_full_queue_drops(stack: dict[str, Any]) -> None:
    from ray import serve

    url, store = stack["url"] + "/lazy", stack["root"] / "lazy"
    client = _client(url)
    [card] = client.models.list().data
    kept = client.chat.completions.create(model=card.id, messages=USER, store=True, n=2, **ASK)
    client.chat.completions.create(model=card.id, messages=USER, store=True, **ASK)
    assert _metric(url, "crlft_store_dropped_completions_total", '{reason="queue_full"}') == 1
    assert read_store(str(store)).choices == []  # written every hour
    serve.delete("lazy")
    rows = [c.completion for c in read_store(str(store)).choices]
    assert [(r["id"], r["choice"]) for r in rows] == [(kept.id, 0), (kept.id, 1)]
    assert {r["model_version"] for r in rows} == {(card.model_extra or {})["revision"]}  # a folder: its revision
