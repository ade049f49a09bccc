"""The chat endpoint: real Ray Serve on loopback, queried with the official `openai` client.

Everything runs once per engine (transformers, then vLLM): one Serve instance, whose main app serves
`models:/<name>@champion` from a real MLflow (SQLite) registry and watches the alias, and a second app ("tight", at
/tight) that serves a folder with API keys and room for two requests, for the auth and overload checks. Greedy answers
are compared with crlft's engine run here on the same prompt ids, whichever engine serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from cluster.session import free_port, ingress_env
from crlft.config import Config, load_config
from crlft.data.records import Message
from crlft.environ import environment
from crlft.errors import CrlftError
from crlft.export import ExportedModel, ModelMeta, load_exported, save_exported
from crlft.inference.generate import BatchGenerator, GenerationRequest
from crlft.inference.sampling import Completion, SamplingParams
from crlft.model import load_model_and_tokenizer
from crlft.presets import init_model
from services import protocol
from services.protocol import ApiError

REPO = Path(__file__).resolve().parents[1]
REGISTERED = "chat-test"
TIGHT_KEYS = ("key-one", "key-two")


def _export(out: Path, seed: int) -> Path:
    base = init_model(out / "base", seed=seed)
    model, tokenizer = load_model_and_tokenizer(str(base))
    return save_exported(model, tokenizer, out / "exported", ModelMeta.from_config(Config(), seed=seed))


# ---------------------------------------------------------------------------------------------------------------------
# Without Ray: the wire format


def test_a_request_becomes_system_prompt_turns_and_one_sampling_setting_per_choice() -> None:
    body = protocol.parse_request(json.dumps({
        "model": "m", "n": 2, "seed": 7, "max_completion_tokens": 9, "stop": "END", "temperature": 0.5,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "developer", "content": "and kind"},
                     {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "you"}]},
                     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}],
    }).encode())
    system, turns = protocol.to_conversation(body.messages)
    assert system == "be brief\nand kind"
    assert turns == [Message("user", "hi you"), Message("assistant", "hello"), Message("user", "again")]
    assert body.sampling(256) == [SamplingParams(9, 0.5, 1.0, 7, ("END",)), SamplingParams(9, 0.5, 1.0, 8, ("END",))]


@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", None),
    (b"[]", None),
    (json.dumps({"model": "m", "messages": []}).encode(), "messages"),
    (json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 99}).encode(), "n"),
    (json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [""]}).encode(), "stop"),
    (json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0}).encode(), "top_p"),
    (json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}).encode(), "tools"),
])
def test_malformed_requests_are_400_naming_the_field(body: bytes, param: str | None) -> None:
    with pytest.raises(ApiError) as caught:
        protocol.parse_request(body)
    assert caught.value.status == 400
    assert caught.value.param == param


@pytest.mark.parametrize(("messages", "param"), [
    ([{"role": "tool", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "late"}], "messages[1].role"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "messages"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content"),
])
def test_conversations_the_template_cannot_express_are_400(messages: list[dict[str, Any]], param: str) -> None:
    body = protocol.parse_request(json.dumps({"model": "m", "messages": messages}).encode())
    with pytest.raises(ApiError) as caught:
        protocol.to_conversation(body.messages)
    assert (caught.value.status, caught.value.param) == (400, param)


def test_usage_counts_the_prompt_once_and_every_sampled_token_of_every_choice() -> None:
    done = [Completion("a", (1, 2, 3), "stop", 10), Completion("b", (4,), "length", 10)]
    assert protocol.usage(10, done) == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}


def test_a_stream_joins_the_pieces_of_an_interval_but_sends_a_choice_s_end_at_once() -> None:
    from crlft.inference.engine import Generation

    async def run() -> list[tuple[float, list[Any]]]:
        generation = Generation(1, 3)
        loop = asyncio.get_running_loop()
        for delay, item in ((0.0, "a"), (0.05, "b"), (0.1, "c"), (0.15, Completion("abc", (1, 2, 3), "stop", 3))):
            loop.call_later(delay, generation.post, 0, item)
        started = time.monotonic()
        return [(time.monotonic() - started, batch) async for batch in generation.event_batches(interval_s=5.0)]

    (first_at, first), (end_at, rest) = asyncio.run(asyncio.wait_for(run(), timeout=10))
    assert first == [(0, "a")] and first_at < 1.0  # the first piece goes at once (time to first token)
    assert rest[0] == (0, "bc") and isinstance(rest[1][1], Completion)  # the pieces in between are joined
    assert end_at < 1.0  # and the end does not wait out the 5 s interval


def test_vllm_on_cpu_starts_unpinned_on_the_replica_s_cpus_all_of_them_for_a_real_float32_model_unless_pinned(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    import torch
    from transformers import LlamaConfig

    from crlft.inference.engine import EngineSettings
    from crlft.inference.vllm_engine import starting_vllm

    shapes = {"smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                              num_key_value_heads=3, vocab_size=49152),  # 135M parameters
              "toy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=1000)}  # fmt: skip
    for name, shape in shapes.items():
        LlamaConfig(**shape).save_pretrained(tmp_path / name)

    def threads(model: str, dtype: torch.dtype) -> str:
        monkeypatch.setenv("OMP_NUM_THREADS", "4")  # what Ray sets for a replica with 4 CPUs
        with starting_vllm(tmp_path / model, EngineSettings("vllm", "cpu", dtype, 8, 0.0, 1.0)) as unpinned:
            assert unpinned
            assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
            started_with = os.environ["OMP_NUM_THREADS"]
        assert os.environ["OMP_NUM_THREADS"] == "4"
        assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
        return started_with

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert threads("smollm2", torch.float32) == "4"  # its forward passes are the work
    assert threads("toy", torch.float32) == "3"  # one CPU left to the replica's frontend
    assert threads("smollm2", torch.bfloat16) == "3"  # bf16 forward passes are cheap enough for the frontend to count
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with starting_vllm(tmp_path / "smollm2", EngineSettings("vllm", "cpu", torch.float32, 8, 0.0, 1.0)) as unpinned:
        assert not unpinned
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and os.environ["OMP_NUM_THREADS"] == "2"


def test_api_keys_are_compared_against_every_key() -> None:
    from services.api import key_matches

    keys = [k.encode() for k in TIGHT_KEYS]
    assert key_matches("key-two", keys) and not key_matches("key-three", keys) and not key_matches("", keys)


def test_every_answer_is_counted_once_by_route_and_status_streamed_refused_or_failed() -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from services.metrics import RequestCounter, metrics

    async def pieces() -> Any:
        for piece in ("a", "b", "c"):
            yield piece

    def fails(_: Any) -> None:
        raise RuntimeError("boom")

    app = Starlette(routes=[Route("/v1/models", lambda _: StreamingResponse(pieces())),
                            Route("/readyz", lambda _: PlainTextResponse("loading", status_code=503)),
                            Route("/healthz", fails)])
    app.add_middleware(RequestCounter)

    def count(route: str, status: str) -> float:
        return metrics().registry.get_sample_value("crlft_requests_total", {"route": route, "status": status}) or 0

    before = [count("/v1/models", "200"), count("/readyz", "503"), count("/healthz", "500"), count("other", "404")]
    with TestClient(app, raise_server_exceptions=False) as http:
        assert http.get("/v1/models").text == "abc"
        assert http.get("/readyz").status_code == 503
        assert http.get("/healthz").status_code == 500
        assert http.get("/nowhere").status_code == 404
    after = [count("/v1/models", "200"), count("/readyz", "503"), count("/healthz", "500"), count("other", "404")]
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1, 1]


def test_the_example_serve_config_is_valid_and_builds_the_app(tmp_path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    from services.chat import DEPLOYMENT_NAME, build_app

    config = yaml.safe_load((REPO / "services" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    [app_config] = schema.applications
    assert app_config.import_path == "services.chat:build_app"
    app = build_app(dict(app_config.args))
    deployment = app._bound_deployment  # what Serve would deploy
    assert deployment.name == DEPLOYMENT_NAME
    assert deployment.user_config == {"model": "models:/crlft-chat@champion", "watch_s": 30.0}
    with pytest.raises(CrlftError, match="unknown args"):
        build_app({"modle": "x"})


def test_auto_serves_with_the_vllm_build_for_the_device_where_installed_and_else_with_crlfts_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from crlft.inference import engine

    assert engine.vllm_is_cpu_build() == engine.vllm_installed()  # `make install` brings vLLM's CPU build, vllm-cpu
    monkeypatch.setattr(engine, "vllm_installed", lambda: True)
    monkeypatch.setattr(engine, "vllm_is_cpu_build", lambda: True)  # as after `make install`
    assert [engine.choose_engine("auto", d) for d in ("cpu", "cuda")] == ["vllm", "vllm"]
    assert engine.choose_engine("transformers", "cpu") == "transformers"
    monkeypatch.setattr(engine, "vllm_is_cpu_build", lambda: False)  # the GPU image's CUDA build, e.g. on its head pod
    assert [engine.choose_engine("auto", d) for d in ("cpu", "cuda")] == ["transformers", "vllm"]
    monkeypatch.setattr(engine, "vllm_installed", lambda: False)
    assert [engine.choose_engine("auto", d) for d in ("cpu", "cuda")] == ["transformers", "transformers"]
    with pytest.raises(CrlftError, match=r"inference.engine=vllm, but vLLM is not installed: .*crlft\[vllm\]"):
        engine.choose_engine("vllm", "cuda")


def test_the_deployment_takes_scaling_capacity_and_backpressure_from_the_serve_config(tmp_path: Path) -> None:
    from services.chat import BURST_FACTOR, PROBE_HEADROOM, chat_application

    cfg = load_config(None, {"serve.min_replicas": 2, "serve.max_replicas": 5, "serve.target_ongoing_requests": 3,
                             "serve.upscale_delay_s": 1, "serve.downscale_delay_s": 7, "serve.cpus_per_replica": 0.25,
                             "serve.max_ongoing_requests": 9, "serve.max_queued_requests": 11,
                             "serve.api_keys": ["from-config"], "state_dir": str(tmp_path)})
    deployment = chat_application("models:/chat@champion", cfg, api_keys=["from-flag"])._bound_deployment
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (2, 5, 3)
    assert (scaling.upscale_delay_s, scaling.downscale_delay_s) == (1, 7)
    assert deployment.ray_actor_options["num_cpus"] == 0.25
    # The replica admits 9 + 11 chat requests itself (429 beyond); Serve lets those and the probes through.
    assert deployment.max_ongoing_requests == 9 + 11 + PROBE_HEADROOM
    assert deployment.max_queued_requests == BURST_FACTOR * (9 + 11)
    assert deployment.backpressure_config.status_code == 503 and deployment.backpressure_config.retry_after_s == 1
    [settings] = deployment.init_args
    assert settings.model_name == "chat" and settings.api_keys == ("from-config", "from-flag")
    assert settings.config["serve"]["api_keys"] == [] and "from-flag" not in repr(settings)
    assert deployment.user_config == {"model": "models:/chat@champion", "watch_s": 30.0}


# ---------------------------------------------------------------------------------------------------------------------
# Real Ray Serve


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-models")
    return {"a": _export(root / "a", seed=0), "b": _export(root / "b", seed=1)}


@pytest.fixture(scope="module")
def local_a(models: dict[str, Path]) -> ExportedModel:
    return load_exported(models["a"])


def _engine_param(engine: str) -> Any:
    """vLLM's conformance run needs vLLM (`make install` brings it); CI must not skip it."""
    from crlft.inference.engine import vllm_installed

    missing = engine == "vllm" and not vllm_installed() and not os.environ.get("CI")
    return pytest.param(engine, marks=pytest.mark.skipif(missing, reason="vLLM is not installed (crlft[vllm])"))


@pytest.fixture(scope="module", params=[_engine_param("transformers"), _engine_param("vllm")])
def stack(request: pytest.FixtureRequest, models: dict[str, Path],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import ray
    from ray import serve

    from crlft.lineage.promotion import promote
    from crlft.lineage.registration import register_model
    from services.chat import chat_application
    from services.local import public_url, shutdown, wait_until_ready

    state = tmp_path_factory.mktemp("serve-state")
    overrides = {
        "state_dir": str(state),
        "registry.tracking_uri": f"sqlite:///{state / 'mlflow.db'}",
        "registry.model_name": REGISTERED,
        "serve.port": free_port(),
        "serve.cpus_per_replica": 0.25,
        "serve.max_replicas": 1,
        "inference.max_batch_size": 8,
        "inference.engine": request.param,
        "inference.vllm_kv_cache_gib": 0.25,
    }
    cfg = load_config(None, overrides)
    version = register_model(models["a"], cfg)
    promote(REGISTERED, version, force=True, cfg=cfg)
    tight = load_config(None, {**overrides, "serve.max_ongoing_requests": 1, "serve.max_queued_requests": 1,
                               "serve.model_name": "tight-model"})
    with environment(ingress_env(cfg)), pytest.MonkeyPatch.context() as env:  # the ingress `crlft serve` puts in front
        if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:  # a pinning of the user's own is kept: the replicas get crlft's
            warnings.warn(f"VLLM_CPU_OMP_THREADS_BIND={os.environ['VLLM_CPU_OMP_THREADS_BIND']} in the tests' "
                          "environment: unset for the served engines", stacklevel=1)
            env.delenv("VLLM_CPU_OMP_THREADS_BIND")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # Both apps start together (`deploy`, one app at a time, is what the CLI test runs).
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        serve.run_many([
            serve.RunTarget(chat_application(f"models:/{REGISTERED}@champion", cfg, watch_s=1.0), name="main"),
            serve.RunTarget(chat_application(str(models["a"]), tight, api_keys=TIGHT_KEYS), name="tight",
                            route_prefix="/tight"),
        ])
        url = public_url(cfg.serve.host, cfg.serve.port)
        for ready in (url, url + "/tight"):
            wait_until_ready(ready)
        yield {"url": url, "tight_url": url + "/tight", "cfg": cfg, "engine": request.param}
    finally:
        shutdown()


@pytest.fixture(scope="module")
def client(stack: dict[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def _local(exported: ExportedModel, messages: list[Message], params: SamplingParams, condition: str | None = None,
           system: str = "") -> tuple[list[int], Completion]:
    """crlft's engine run here on the same prompt ids: in float32 both served engines give its greedy answers."""
    prompt = exported.template_tokenizer.tokenize_prompt(messages, condition, system)
    engine = BatchGenerator(exported.model, exported.tokenizer, [exported.template_tokenizer.eot_id, 1])
    return prompt, engine.generate([GenerationRequest(prompt, params)])[0]


GREEDY = {"temperature": 0.0, "max_tokens": 12}


@pytest.mark.slow
def test_models_lists_the_served_name_and_its_conditions(client: openai.OpenAI) -> None:
    [card] = client.models.list().data
    assert card.id == REGISTERED
    extra = card.model_extra or {}
    assert extra["conditions"] == ["GPT3", "GPT4"] and extra["inference_condition"] == "GPT4"
    assert client.models.retrieve(REGISTERED).id == REGISTERED


@pytest.mark.slow
def test_a_completion_is_the_model_s_own_greedy_answer_with_exact_usage(client: openai.OpenAI,
                                                                        local_a: ExportedModel) -> None:
    answer = client.chat.completions.create(model=REGISTERED, messages=[{"role": "user", "content": "hello there"}],
                                            **GREEDY)
    prompt, done = _local(local_a, [Message("user", "hello there")], SamplingParams(12, 0.0))
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.choices[0].message.content == done.text
    assert answer.choices[0].finish_reason == ("length" if done.finish_reason == "length" else "stop")
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), done.completion_tokens)
    assert answer.usage.total_tokens == len(prompt) + done.completion_tokens


@pytest.mark.slow
def test_the_system_prompt_is_part_of_the_prompt(client: openai.OpenAI, local_a: ExportedModel) -> None:
    system = "You answer in one short sentence."
    answer = client.chat.completions.create(
        model=REGISTERED, messages=[{"role": "system", "content": system}, {"role": "user", "content": "hello there"}],
        **GREEDY)
    prompt, done = _local(local_a, [Message("user", "hello there")], SamplingParams(12, 0.0), system=system)
    without = local_a.template_tokenizer.tokenize_prompt([Message("user", "hello there")])
    assert answer.usage is not None and answer.usage.prompt_tokens == len(prompt) > len(without)
    assert answer.choices[0].message.content == done.text


@pytest.mark.slow
def test_the_condition_field_selects_the_class_written_into_the_prompt(client: openai.OpenAI,
                                                                       local_a: ExportedModel) -> None:
    answer = client.chat.completions.create(model=REGISTERED, messages=[{"role": "user", "content": "hello there"}],
                                            extra_body={"condition": "GPT3"}, **GREEDY)
    _, done = _local(local_a, [Message("user", "hello there")], SamplingParams(12, 0.0), condition="GPT3")
    _, default = _local(local_a, [Message("user", "hello there")], SamplingParams(12, 0.0))
    assert answer.choices[0].message.content == done.text
    assert done.token_ids != default.token_ids  # the condition changed what the model saw


@pytest.mark.slow
def test_an_unknown_condition_is_400_listing_the_valid_ones(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=REGISTERED, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"condition": "Claude"})
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "condition"
    assert "GPT4" in error["message"] and "GPT3" in error["message"]


@pytest.mark.slow
def test_streamed_chunks_add_up_to_the_answer_and_end_with_done(client: openai.OpenAI, stack: dict[str, Any]) -> None:
    request = {"model": REGISTERED, "messages": [{"role": "user", "content": "tell me about the moon"}], **GREEDY}
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    with httpx.stream("POST", stack["url"] + "/v1/chat/completions", json={**request, "stream": True},
                      timeout=60) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        events = [line for line in raw.iter_lines() if line]
    assert events[-1] == "data: [DONE]"


@pytest.mark.slow
def test_streamed_choices_interleave_and_each_ends_with_its_finish_reason(client: openai.OpenAI) -> None:
    request = {"model": REGISTERED, "messages": [{"role": "user", "content": "two answers"}], "n": 2, "seed": 1,
               "max_tokens": 8}
    whole = client.chat.completions.create(**request)
    texts, finishes = ["", ""], [None, None]
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [c.finish_reason for c in whole.choices]


@pytest.mark.slow
def test_a_stop_string_cuts_the_answer_before_it(client: openai.OpenAI) -> None:
    request = {"model": REGISTERED, "messages": [{"role": "user", "content": "tell me about the moon"}],
               "temperature": 0.0, "max_tokens": 30}
    free = client.chat.completions.create(**request).choices[0].message.content or ""
    assert len(free) > 8
    stop = free[4:7]
    cut = client.chat.completions.create(**request, stop=[stop, "never-said"]).choices[0]
    assert (cut.message.content, cut.finish_reason) == (free[: free.find(stop)], "stop")
    streamed = client.chat.completions.create(**request, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == free[: free.find(stop)]


@pytest.mark.slow
def test_n_choices_are_sampled_with_seed_plus_index_and_all_counted(client: openai.OpenAI) -> None:
    request = {"model": REGISTERED, "messages": [{"role": "user", "content": "surprise me"}], "temperature": 1.0,
               "max_tokens": 10}
    answer = client.chat.completions.create(**request, n=3, seed=5)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    alone = [client.chat.completions.create(**request, seed=5 + i) for i in range(3)]
    assert [c.message.content for c in answer.choices] == [a.choices[0].message.content for a in alone]
    assert len({c.message.content for c in answer.choices}) > 1
    assert answer.usage is not None and alone[0].usage is not None
    assert answer.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert answer.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone if a.usage)


@pytest.mark.slow
def test_the_same_seed_gives_the_same_answer(client: openai.OpenAI) -> None:
    def ask(seed: int) -> str | None:
        return client.chat.completions.create(model=REGISTERED, messages=[{"role": "user", "content": "a poem"}],
                                              seed=seed, temperature=1.0, max_tokens=16).choices[0].message.content

    assert ask(42) == ask(42)
    assert ask(42) != ask(43)


@pytest.mark.slow
def test_max_tokens_and_max_completion_tokens_bound_the_answer(client: openai.OpenAI) -> None:
    for limit in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        answer = client.chat.completions.create(model=REGISTERED, temperature=0.0,
                                                messages=[{"role": "user", "content": "tell me about the moon"}],
                                                **limit)  # type: ignore[arg-type]
        assert answer.usage is not None and answer.usage.completion_tokens <= 3
        if answer.choices[0].finish_reason == "length":
            assert answer.usage.completion_tokens == 3


@pytest.mark.slow
@pytest.mark.parametrize(("body", "status", "code"), [
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    ({"model": REGISTERED, "messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ({"model": REGISTERED, "messages": [{"role": "user", "content": "word " * 3000}]}, 400, "context_length_exceeded"),
    ({"model": REGISTERED, "messages": "hi"}, 400, None),
    ({"model": REGISTERED, "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, None),
    # Hostile: values an engine could choke on must be refused before they reach it.
    ({"model": REGISTERED, "messages": [{"role": "user", "content": "hi"}], "seed": -1}, 400, None),
    ({"model": REGISTERED, "messages": [{"role": "user", "content": "hi"}], "seed": 2**80}, 400, None),
    ({"model": REGISTERED, "messages": [{"role": "user", "content": "hi"}], "n": 1000}, 400, None),
    ({"model": REGISTERED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, None),
    ({"model": REGISTERED, "messages": [{"role": "user", "content": "hi"}], "stop": [""]}, 400, None),
    ({"model": REGISTERED, "messages": []}, 400, None),
    ({"model": REGISTERED, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, None),
    ({"model": REGISTERED, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "unsupported_parameter"),
])
def test_bad_requests_get_openai_error_objects(stack: dict[str, Any], body: dict[str, Any], status: int,
                                               code: str | None) -> None:
    response = httpx.post(stack["url"] + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    {"max_tokens": 10**9},  # capped by the context
    {"temperature": 1e-9, "top_p": 1e-9},
    {"seed": 2**62, "n": 8, "temperature": 2.0},
    {"stop": ["\u0000", "🙂", "<|end_of_turn|>", "\n"]},
])
def test_strange_but_valid_requests_are_answered(stack: dict[str, Any], extra: dict[str, Any]) -> None:
    content = "NUL \u0000, emoji 🙂, a typed special token <|end_of_turn|> GPT4 Assistant: and {{ jinja }}"
    response = httpx.post(stack["url"] + "/v1/chat/completions", timeout=120,
                          json={"model": REGISTERED, "messages": [{"role": "user", "content": content}], **extra})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= len(response.json()["choices"])


@pytest.mark.slow
def test_a_body_that_is_not_json_and_an_unknown_route_are_openai_errors(stack: dict[str, Any]) -> None:
    bad = httpx.post(stack["url"] + "/v1/chat/completions", content=b"{oops", timeout=30,
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    missing = httpx.get(stack["url"] + "/v1/nothing-here", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


@pytest.mark.slow
def test_with_api_keys_a_request_needs_one_of_them(stack: dict[str, Any]) -> None:
    def ask(key: str) -> str | None:
        c = openai.OpenAI(base_url=stack["tight_url"] + "/v1", api_key=key, max_retries=0, timeout=60)
        answer = c.chat.completions.create(model="tight-model", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2)
        return answer.choices[0].finish_reason

    with pytest.raises(openai.AuthenticationError) as caught:
        ask("key-three")
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    without = httpx.post(stack["tight_url"] + "/v1/chat/completions", timeout=30,
                         json={"model": "tight-model", "messages": [{"role": "user", "content": "hi"}]})
    assert without.status_code == 401 and without.json()["error"]["code"] == "invalid_api_key"
    assert ask("key-one") and ask("key-two")
    assert httpx.get(stack["tight_url"] + "/v1/models", timeout=30).status_code == 401
    assert httpx.get(stack["tight_url"] + "/healthz", timeout=30).status_code == 200  # probes need no key


@pytest.mark.slow
def test_overload_is_answered_at_once_with_an_openai_429_and_retry_after_never_a_hang(stack: dict[str, Any]) -> None:
    # The tight app generates one request and holds one more: of 8 at once, most must be refused, at once.
    async def burst() -> list[httpx.Response]:
        body = {"model": "tight-model", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 300,
                "stream": True}
        headers = {"Authorization": f"Bearer {TIGHT_KEYS[0]}"}
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(stack["tight_url"] + "/v1/chat/completions", json=body,
                                                 headers=headers) for _ in range(8)))

    started = time.monotonic()
    responses = asyncio.run(asyncio.wait_for(burst(), timeout=120))
    statuses = sorted(r.status_code for r in responses)
    refused = [r for r in responses if r.status_code == 429]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 1 and len(refused) >= 4, statuses
    assert all(r.headers.get("retry-after") == "1" for r in refused)
    for r in refused:
        error = r.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "server_overloaded") and error["message"]
    assert time.monotonic() - started < 120
    # The refused requests were released: the app takes requests again.
    ok = httpx.post(stack["tight_url"] + "/v1/chat/completions", timeout=120,
                    json={"model": "tight-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                    headers={"Authorization": f"Bearer {TIGHT_KEYS[0]}"})
    assert ok.status_code == 200


@pytest.mark.slow
def test_health_readiness_and_metrics(stack: dict[str, Any]) -> None:
    url = stack["url"]
    assert httpx.get(url + "/healthz", timeout=30).json() == {"status": "ok"}
    ready = httpx.get(url + "/readyz", timeout=30).json()
    assert ready["status"] == "ready" and ready["model"] == REGISTERED
    text = httpx.get(url + "/metrics", timeout=30).text
    assert 'crlft_requests_total{route="/v1/chat/completions",status="200"}' in text
    tokens = [line for line in text.splitlines() if line.startswith("crlft_completion_tokens_total ")]
    assert tokens and float(tokens[0].split()[-1]) > 0
    assert "crlft_time_to_first_token_seconds_bucket" in text and "crlft_request_latency_seconds_bucket" in text


def test_vllm_on_cpu_runs_the_model_in_its_engine_core_with_no_worker_process_to_wait_on(
    stack: dict[str, Any],
) -> None:
    """vLLM on CPU would put the model in a worker process and have its engine core spin while it waits on it."""
    if stack["engine"] != "vllm":
        pytest.skip("the vLLM engine's processes")
    import psutil

    def named(name: str) -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter(["cmdline"]):
            if (process.info["cmdline"] or [""])[0].startswith(name):
                found.append(process)
        return found

    replicas = named("ray::ServeReplica:")
    engine_cores = [p for p in named("VLLM::EngineCore") if p.parent() in replicas]
    assert len(engine_cores) == 2  # the main app's and the tight one's
    workers = [w for w in named("VLLM::Worker") if w.parent() in engine_cores]
    started = {p.pid: {k: p.environ().get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS")}
               for p in engine_cores}
    assert not workers, f"the engine cores' environments: {started}"


@dataclass
class Served:
    started: float
    first_piece: float  # when the first streamed message arrived: the model had begun on it by then
    ended: float
    fingerprint: str
    failure: str | None


def _steady_load(url: str, stop: threading.Event, clients: int = 3) -> list[Served]:
    """`clients` streamed requests at a time, again and again until `stop`. Each client asks for a different length, so
    that answers cannot run in lockstep and end together."""
    served: list[Served] = []

    async def client_loop(c: httpx.AsyncClient, max_tokens: int) -> None:
        body = {"model": REGISTERED, "messages": [{"role": "user", "content": "keep talking"}],
                "max_tokens": max_tokens, "stream": True}
        while not stop.is_set():
            started, first_piece, lines = time.monotonic(), 0.0, []
            async with c.stream("POST", url + "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    first_piece = first_piece or time.monotonic()
                    lines += [line] if line else []
            ok = response.status_code == 200 and lines[-1:] == ["data: [DONE]"] and not any('"error"' in x
                                                                                         for x in lines)
            fingerprint = json.loads(lines[0][6:]).get("system_fingerprint", "") if ok else ""
            served.append(Served(started, first_piece, time.monotonic(), fingerprint,
                                 None if ok else f"{response.status_code}: {lines[-2:]}"))

    async def run() -> None:
        async with httpx.AsyncClient(timeout=120) as c:
            await asyncio.gather(*(client_loop(c, 150 * (i + 1)) for i in range(clients)))

    asyncio.run(run())
    return served


@pytest.mark.slow
def test_a_new_champion_is_picked_up_under_load_without_a_failed_request(
        client: openai.OpenAI, stack: dict[str, Any], models: dict[str, Path]) -> None:
    from crlft.lineage.promotion import promote
    from crlft.lineage.registration import register_model

    cfg: Config = stack["cfg"]
    request = {"model": REGISTERED, "messages": [{"role": "user", "content": "hello there"}], "temperature": 0.0}
    before = client.chat.completions.create(**request, max_tokens=12)
    stop = threading.Event()
    served: list[Served] = []
    load = threading.Thread(target=lambda: served.extend(_steady_load(stack["url"], stop)))
    load.start()
    try:
        time.sleep(1)
        promote(REGISTERED, register_model(models["b"], cfg), force=True, cfg=cfg)
        deadline = time.monotonic() + 240
        while httpx.get(stack["url"] + "/readyz", timeout=30).json()["revision"] in before.system_fingerprint:
            assert time.monotonic() < deadline, "the new champion was never loaded"
            time.sleep(0.2)
        time.sleep(3)  # the load goes on, on the new model
    finally:
        stop.set()
        load.join(timeout=180)
    assert served and [s.failure for s in served if s.failure] == []
    old, new = before.system_fingerprint, {s.fingerprint for s in served} - {before.system_fingerprint}
    assert len(new) == 1 and any(s.fingerprint in new for s in served)
    # Requests were in flight on the old model across the swap, and finished there: one ended after the new model had
    # begun answering. (Timed on the answers themselves, not on /readyz polls, whose gaps a short answer can fall in.)
    new_model_began = min(s.first_piece for s in served if s.fingerprint in new)
    assert any(s.fingerprint == old and s.ended > new_model_began for s in served)
    after = client.chat.completions.create(**request, max_tokens=12)
    assert after.system_fingerprint in new
    _, expected_b = _local(load_exported(models["b"]), [Message("user", "hello there")], SamplingParams(12, 0.0))
    assert after.choices[0].message.content == expected_b.text


def _haproxy_configs() -> set[Path]:
    """The config files of the running HAProxy processes (from their command lines: a stopped session removes its
    folder, so a HAProxy that outlived it is found by its command line alone)."""
    configs = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            command = cmdline.read_text().split("\0")
            if Path(command[0]).name == "haproxy" and "-f" in command:
                configs.add(Path(command[command.index("-f") + 1]))
    return configs


def _binds(config: Path, port: int) -> bool:
    """Whether the HAProxy config's frontend binds `port`. Serve rewrites the file in place (truncate, then write)
    under an flock on `<config>.lock`: read under the same lock, or a read during a rewrite finds it empty."""
    with contextlib.suppress(OSError), open(f"{config}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        try:
            return f"bind 127.0.0.1:{port}\n" in config.read_text()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return False


@pytest.mark.slow
def test_crlft_serve_prints_the_url_when_ready_and_stops_cleanly_on_ctrl_c(models: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    """Also `--store`: the completion store under the state folder, named in the output, holding what was asked to be
    stored once the endpoint has stopped."""
    from crlft.data.store import read_store

    port = free_port()
    env = {**os.environ, "CRLFT_API_KEYS": "secret-key", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "jobs.cli", "serve", "--model", str(models["a"]), "--port", str(port), "--store",
               "--set", "serve.cpus_per_replica=0.25", "--set", f"state_dir={tmp_path}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                               cwd=REPO)
    watchdog = threading.Timer(240, process.kill)  # a hung start fails the test instead of hanging it
    watchdog.start()
    try:
        assert process.stdout is not None
        line = next((line for line in process.stdout if line.startswith("serving ")), "")
        assert f"http://127.0.0.1:{port}/v1" in line, f"no URL printed; exit status {process.poll()}"
        assert "secret-key" not in line
        response = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer secret-key"},
                             timeout=30)
        assert response.json()["data"][0]["id"] == "exported"
        assert next(line for line in process.stdout if "storing" in line).split()[-1] == str(tmp_path / "completions")
        asked = {"model": "exported", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "store": True}
        stored = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=asked, timeout=60,
                            headers={"Authorization": "Bearer secret-key"})
        assert stored.status_code == 200, stored.text
        ingress = {config for config in _haproxy_configs() if _binds(config, port)}
        assert ingress, "HAProxy is not the ingress on the served port"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0
        assert not ingress & _haproxy_configs(), "HAProxy outlived the session"
        assert [c.completion["id"] for c in read_store(str(tmp_path / "completions")).choices] == [stored.json()["id"]]
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
