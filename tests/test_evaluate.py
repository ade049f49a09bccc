"""Evaluation: exact match per condition with batched greedy decoding, the condition swap, the representation check,
benchmark answers graded by an OpenAI-compatible judge, and `crlft eval`'s handling of bad input."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster.session import free_port
from crlft.config import Config, overridden
from crlft.errors import CrlftError
from crlft.inference.engine import vllm_installed


def _export(root: Path, mode: str) -> Path:
    from crlft.export import ModelMeta, save_exported
    from crlft.model import load_model_and_tokenizer

    cfg = Config.model_validate({"train": {"mode": mode}})
    model, tokenizer = load_model_and_tokenizer(str(root / "base"))
    return save_exported(model, tokenizer, root / mode, ModelMeta.from_config(cfg, base_model="tiny"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight exported models: one with the condition in the prompt (crlft), one without (sft)."""
    from crlft.presets import init_model

    root = tmp_path_factory.mktemp("models")
    init_model(root / "base")
    return {mode: _export(root, mode) for mode in ("crlft", "sft")}


@pytest.fixture(scope="module")
def exported(models: dict[str, Path]) -> Any:
    from crlft.export import load_exported

    return load_exported(models["crlft"])


@pytest.fixture(scope="module")
def suite_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from crlft.synth.suite import write_suite

    return write_suite(tmp_path_factory.mktemp("suite"), n_expert=12, ratio=1, n_eval=12, n_heldout=16)


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # setup_mlflow sets it; restored after each test


# ---------------------------------------------------------------------------------------------------------------------
# Generation and the condition swap


def test_batched_greedy_generation_gives_the_same_answers_as_one_prompt_at_a_time(exported: Any) -> None:
    from crlft.data.records import Message
    from crlft.eval.answers import chat_prompt, generate

    texts = ("Hi", "What is the opposite of hot?", "Name the colour of snow, please, in one word.")
    prompts = [chat_prompt(exported, [Message("user", text)], "GPT4") for text in texts]
    batched = generate(exported, prompts, max_new_tokens=6, batch_size=3)
    assert batched == [generate(exported, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert all("<|end_of_turn|>" not in answer for answer in batched)


# Long answers: more decode steps, so a decoder that strays from the model shows (crlft's engine once fed every
# decoded token one position too far: its logits differed from a plain forward pass by ~3e-3 and 4 of these 24
# answers differed at 32 tokens; fixed, Hugging Face, vLLM and crlft's engine agree on every answer).
ANSWER_TOKENS = 32
# vLLM is installed by `make install`; CI must not skip its tests.
NEEDS_VLLM = pytest.mark.skipif(not vllm_installed() and not os.environ.get("CI"),
                                reason="vLLM is not installed (crlft[vllm])")  # fmt: skip


@pytest.fixture(scope="module")
def suite_prompts(exported: Any, suite_files: dict[str, Path]) -> list[list[int]]:
    """The suite's prompts under both conditions."""
    from crlft.data.records import Message
    from crlft.eval.answers import chat_prompt
    from crlft.eval.scoring import load_eval_suite

    items = load_eval_suite(suite_files["eval"])
    return [chat_prompt(exported, [Message("user", item.prompt)], c) for c in ("GPT4", "GPT3") for item in items]


@pytest.fixture(scope="module")
def reference_answers(exported: Any, suite_prompts: list[list[int]]) -> list[str]:
    """Hugging Face's greedy decoding, one prompt at a time (no padding, its own cache): what the model says."""
    import torch

    from crlft.inference.sampling import answer_text

    stops = exported.stop_ids
    answers = []
    with torch.inference_mode():
        for prompt in suite_prompts:
            output = exported.model.generate(
                input_ids=torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=ANSWER_TOKENS,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=exported.tokenizer.pad_token_id,
            )
            answers.append(answer_text(exported.tokenizer, output[0, len(prompt) :].tolist(), stops))
    return answers


def test_evaluation_decodes_with_the_serving_transformers_engine(exported: Any, suite_prompts: list[list[int]]) -> None:
    """The default decoder is the engine `crlft serve` runs with inference.engine=transformers: built as
    crlft.inference.engines.TransformersEngine builds it, the same answers, as the endpoint's text."""
    from crlft.eval.answers import generate
    from crlft.inference.generate import BatchGenerator, GenerationRequest
    from crlft.inference.sampling import SamplingParams, context_length, stop_token_ids

    stops = stop_token_ids(exported.template_tokenizer, exported.model.generation_config.eos_token_id)
    assert exported.stop_ids == stops
    engine = BatchGenerator(exported.model, exported.tokenizer, stops, max_batch_size=8,
                            context_len=context_length(exported.model.config, exported.tokenizer))  # fmt: skip
    params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0)
    served = engine.generate([GenerationRequest(prompt, params) for prompt in suite_prompts])
    assert generate(exported, suite_prompts, ANSWER_TOKENS, batch_size=8) == [c.text.strip() for c in served]


def test_evaluation_fits_prompts_to_the_context_the_server_applies(exported: Any) -> None:
    """One context limit (`context_length`, read into the folder's context_len) for serving and evaluation: a prompt
    longer than it loses its oldest tokens and its answer gets at most half of it, where the engine would refuse it;
    a model whose config names no position table gets the same limit there as when served."""
    import dataclasses

    from transformers import PretrainedConfig

    from crlft.eval.answers import fit_prompts, generate
    from crlft.inference.sampling import UNSTATED_CONTEXT, context_length

    assert exported.folder.context_len == context_length(exported.model.config, exported.tokenizer)
    assert context_length(PretrainedConfig(), exported.tokenizer) == min(UNSTATED_CONTEXT,
                                                                         exported.tokenizer.model_max_length)
    short = dataclasses.replace(exported, folder=dataclasses.replace(exported.folder, context_len=24))
    bos = exported.template_tokenizer.bos_ids
    prompt = bos + list(range(100, 140))
    [fitted], budget = fit_prompts([prompt], 20, 24, bos)
    assert budget == 12 and len(fitted) == 12 and fitted[: len(bos)] == bos and fitted[-1] == 139
    assert len(generate(short, [prompt], 20, batch_size=2)) == 1  # crlft's engine would refuse it unfitted


def test_the_serving_engine_answers_what_the_model_says(
    exported: Any, suite_prompts: list[list[int]], reference_answers: list[str]
) -> None:
    from crlft.eval.answers import generate

    assert generate(exported, suite_prompts, ANSWER_TOKENS, batch_size=8) == reference_answers


@pytest.fixture(scope="module")
def vllm_decoder(models: dict[str, Path]) -> Iterator[Any]:
    """vLLM on the CPU in float32, as `crlft eval` builds it where inference.engine is vllm (started once: ~40 s
    here)."""
    import torch

    from crlft.inference.engine import EngineSettings
    from crlft.inference.vllm_decoder import VllmDecoder

    decoder = VllmDecoder(models["crlft"], EngineSettings("vllm", "cpu", torch.float32, max_batch_size=8,
                                                          batch_wait_s=0.0, kv_cache_gib=0.25))  # fmt: skip
    try:
        yield decoder
    finally:
        decoder.close()


@pytest.mark.slow
@NEEDS_VLLM
def test_vllm_answers_what_the_model_says(
    exported: Any, vllm_decoder: Any, suite_prompts: list[list[int]], reference_answers: list[str]
) -> None:
    import psutil

    from crlft.eval.answers import generate

    assert generate(exported, suite_prompts, ANSWER_TOKENS, decoder=vllm_decoder) == reference_answers
    # As in the replica, the model runs in vLLM's engine core: no worker process for the engine core to spin on.
    # A child that ends (or is a zombie not yet reaped) between the listing and the read is not one of vLLM's.
    started = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            started.append(" ".join(child.cmdline()[:1]))
    assert "VLLM::EngineCore" in started and "VLLM::Worker" not in started, started


@pytest.mark.slow
@NEEDS_VLLM
def test_vllm_and_the_transformers_engine_give_the_same_answers_in_float32(
    exported: Any, vllm_decoder: Any, suite_prompts: list[list[int]]
) -> None:
    """Either serving engine must gate promotion with the same accuracy. Measured on this tiny random-weight model
    (logits often within 1e-3 of a tie): vLLM agrees with Hugging Face on all 24 answers here; with the transformers
    engine's position fixed, vLLM and it agree on 344 of 344 answers (1, 3, 6 and 16 tokens, 43 other prompts, both
    conditions), unfixed on 333 of 344."""
    from crlft.eval.answers import generate

    with_vllm = generate(exported, suite_prompts, ANSWER_TOKENS, decoder=vllm_decoder)
    assert with_vllm == generate(exported, suite_prompts, ANSWER_TOKENS, batch_size=8)


def test_every_condition_answers_the_same_prompts_and_the_swap_table_shows_them_side_by_side(
    exported: Any, suite_files: dict[str, Path]
) -> None:
    from crlft.eval.scoring import load_eval_suite
    from crlft.eval.suites import evaluate_suite, suite_metrics, swap_rows, swap_table

    items = load_eval_suite(suite_files["eval"])
    evaluation = evaluate_suite(exported, items, max_new_tokens=3, batch_size=8)
    assert list(evaluation.results) == ["GPT4", "GPT3"]  # best reward first
    assert (evaluation.expert, evaluation.suboptimal) == ("GPT4", "GPT3")
    metrics = suite_metrics(evaluation)
    assert metrics["accuracy_expert"] == metrics["accuracy_GPT4"]
    assert metrics["condition_gap"] == pytest.approx(metrics["accuracy_GPT4"] - metrics["accuracy_GPT3"])
    assert {f"{item.task}/accuracy_GPT3" for item in items} <= set(metrics)
    table = swap_table(evaluation)
    assert "GPT4 (expert)" in table and "GPT3 (sub-optimal)" in table and "no effect" not in table
    rows = swap_rows(evaluation)
    assert len(rows) == len(items) and {"prediction_GPT4", "prediction_GPT3", "answer"} <= set(rows[0])


def test_a_model_trained_without_the_condition_is_said_to_ignore_it(models: dict[str, Path],
                                                                    suite_files: dict[str, Path]) -> None:
    from crlft.eval.scoring import load_eval_suite
    from crlft.eval.suites import evaluate_suite, swap_table
    from crlft.export import load_exported

    evaluation = evaluate_suite(load_exported(models["sft"]), load_eval_suite(suite_files["eval"])[:4],
                                max_new_tokens=2)  # fmt: skip
    assert not evaluation.condition_in_prompt
    assert evaluation.results["GPT4"].predictions == evaluation.results["GPT3"].predictions
    assert "mode 'sft' puts no condition in the prompt" in swap_table(evaluation)


def test_an_unknown_condition_is_refused_with_the_model_conditions(exported: Any) -> None:
    from crlft.eval.suites import select_conditions

    assert select_conditions(exported.meta, ["GPT3"]) == ["GPT3"]
    with pytest.raises(CrlftError, match="conditions are GPT4, GPT3"):
        select_conditions(exported.meta, ["GPT5"])


# ---------------------------------------------------------------------------------------------------------------------
# Representation check


def test_the_representation_check_scores_and_plots_expert_against_suboptimal_conversations(
    exported: Any, suite_files: dict[str, Path], tmp_path: Path
) -> None:
    from crlft.eval.representation import load_heldout, representation_check

    conversations = load_heldout(suite_files["heldout"], exported.meta)
    result = representation_check(exported, conversations, tmp_path / "plot.png", max_per_class=5)
    assert result.counts == {"GPT3": 5, "GPT4": 5}
    assert result.silhouette is not None and -1.0 <= result.silhouette <= 1.0
    assert result.method == "UMAP"  # the paper's projection: umap-learn is a dependency
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_projection_falls_back_to_pca_without_umap(monkeypatch: pytest.MonkeyPatch) -> None:
    from crlft.eval.representation import project_2d

    monkeypatch.setitem(sys.modules, "umap", None)  # what an environment without umap-learn gives: ImportError
    points = np.random.default_rng(0).normal(size=(12, 8))
    projected, method = project_2d(points)
    assert method == "PCA" and projected.shape == (12, 2)


def test_silhouette_is_high_for_separate_clusters_and_undefined_for_one_class() -> None:
    from crlft.eval.representation import silhouette

    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0, 0.1, (20, 8)), rng.normal(5, 0.1, (20, 8))])
    assert silhouette(points, ["a"] * 20 + ["b"] * 20) > 0.9
    assert silhouette(points, ["a"] * 40) is None


def test_a_bad_heldout_line_is_one_error_naming_file_and_line(exported: Any, tmp_path: Path) -> None:
    from crlft.eval.representation import load_heldout

    path = tmp_path / "heldout.jsonl"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    good = {"items": turns, "condition": "GPT4"}
    path.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({**good, "condition": "GPT9"}) + "\n")
    expected = r"2 bad held-out.*heldout.jsonl:2: not valid JSON.*heldout.jsonl:3"
    with pytest.raises(CrlftError, match=expected) as raised:
        load_heldout(path, exported.meta)
    assert "\n" not in str(raised.value)


# ---------------------------------------------------------------------------------------------------------------------
# Benchmarks and the judge


def test_benchmarks_load_two_turn_mt_bench_with_references_and_vicuna() -> None:
    from crlft.eval.mt_bench import BENCH_DATA, load_bench

    mt_bench = load_bench("mt_bench", BENCH_DATA)
    assert len(mt_bench) == 80 and all(len(q.turns) == 2 for q in mt_bench)
    assert all(q.reference for q in mt_bench if q.category == "math")
    assert len(load_bench("vicuna", BENCH_DATA, limit=5)) == 5
    with pytest.raises(CrlftError, match="unknown benchmark"):
        load_bench("arena", BENCH_DATA)


def test_judge_ratings_are_read_as_fastchat_does() -> None:
    from crlft.eval.judge import parse_rating

    assert parse_rating("Fine answer. Rating: [[7]]") == 7.0
    assert parse_rating("Rating: [8.5]") == 8.5
    assert parse_rating("I cannot rate this.") == -1.0


def test_grading_uses_the_multi_turn_prompt_for_turn_two_and_the_reference_for_math() -> None:
    from crlft.eval.judge import load_judge_prompts
    from crlft.eval.mt_bench import BENCH_DATA, BenchAnswer, bench_metrics, grade, load_bench

    questions = [q for q in load_bench("mt_bench", BENCH_DATA) if q.category in ("writing", "math")][::10][:2]
    assert [q.category for q in questions] == ["writing", "math"]
    answers = [BenchAnswer(q.question_id, "m", (f"first {q.question_id}", f"second {q.question_id}"), "GPT4")
               for q in questions]  # fmt: skip
    seen: list[str] = []

    def judge(system: str, user: str) -> str:
        seen.append(user)
        return "Rating: [[4]]" if len(seen) % 2 else "Rating: [[8]]"

    judgments = grade(questions, answers, judge, load_judge_prompts(BENCH_DATA / "judge_prompts.jsonl"))
    assert [(j.turn, j.judge_prompt) for j in judgments] == [
        (1, "single-v1"), (2, "single-v1-multi-turn"), (1, "single-math-v1"), (2, "single-math-v1-multi-turn")]
    assert f"second {questions[0].question_id}" in seen[1] and questions[1].reference[0] in seen[2]
    assert bench_metrics("mt_bench", judgments) == {"mt_bench_unrated": 0.0, "mt_bench_score": 6.0,
                                                    "mt_bench_turn1": 4.0, "mt_bench_turn2": 8.0}  # fmt: skip


def test_the_judge_is_any_openai_compatible_endpoint_with_the_key_from_the_environment(
    judge_server: tuple[str, list[dict[str, Any]]]
) -> None:
    from crlft.eval.judge import openai_judge

    url, requests = judge_server
    assert openai_judge(url, "judge-1", api_key="sk-test")("system text", "user text") == "Sound. Rating: [[6]]"
    request = requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"]["temperature"] == 0 and request["body"]["model"] == "judge-1"
    assert [m["role"] for m in request["body"]["messages"]] == ["system", "user"]
    with pytest.raises(CrlftError, match="answered 400"):
        openai_judge(url, "missing")("s", "u")


def test_eval_answers_the_packaged_mt_bench_and_the_judge_grades_it(
        models: dict[str, Path], tmp_path: Path, judge_server: tuple[str, list[dict[str, Any]]]) -> None:
    from jobs.evaluate import evaluate_model

    url, requests = judge_server
    cfg = overridden(_config(tmp_path), {"eval.bench_limit": 1, "eval.bench_max_new_tokens": 4})
    report = evaluate_model(models["crlft"], None, cfg, bench=["mt_bench"], judge_url=url, judge_model="judge-1",
                            log_mlflow=False, out_dir=tmp_path / "out")  # fmt: skip
    assert report["metrics"]["mt_bench_score"] == 6.0 and len(requests) == 2  # one question, two turns
    answers = [json.loads(line) for line in (tmp_path / "out" / "mt_bench_answers.jsonl").read_text().splitlines()]
    assert len(answers[0]["choices"][0]["turns"]) == 2
    assert (tmp_path / "out" / "mt_bench_judgments.jsonl").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# crlft eval end to end, and its bad inputs


def _config(tmp_path: Path, engine: str = "transformers") -> Config:
    """State under tmp_path; crlft's engine decodes unless a test is about vLLM (each vLLM start costs ~40 s here), in
    float32 on any machine."""
    inference = {"engine": engine, "precision": "fp32", "vllm_kv_cache_gib": 0.25}
    return Config.model_validate({"state_dir": str(tmp_path / "state"), "inference": inference})


def test_eval_without_mlflow_writes_the_table_plot_and_metrics_and_nothing_partial(
    models: dict[str, Path], suite_files: dict[str, Path], tmp_path: Path
) -> None:
    from jobs.evaluate import evaluate_model

    out = tmp_path / "out"
    cfg = overridden(_config(tmp_path), {"eval.max_per_class": 4, "eval.max_new_tokens": 2})
    report = evaluate_model(models["crlft"], suite_files["eval"], cfg, heldout=suite_files["heldout"],
                            log_mlflow=False, out_dir=out)  # fmt: skip
    assert {p.name for p in out.iterdir()} == {"condition_swap.jsonl", "condition_swap.txt", "embeddings.png",
                                               "metrics.json", "representation.json"}  # fmt: skip
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(report["metrics"])
    assert report["run_id"] is None and report["plot"] == str(out / "embeddings.png")
    assert "condition swap" in report["text"] and "silhouette" in report["text"]
    assert report["engine"] == "transformers" and "answers decoded by transformers (float32 on " in report["text"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert not (tmp_path / "state").exists()  # no MLflow store created when told not to log


@pytest.mark.slow
@NEEDS_VLLM
def test_eval_decodes_with_vllm_where_the_server_would(
    models: dict[str, Path], suite_files: dict[str, Path], tmp_path: Path
) -> None:
    from jobs.evaluate import evaluate_model

    report = evaluate_model(models["crlft"], suite_files["eval"],
                            overridden(_config(tmp_path, "vllm"), {"eval.max_new_tokens": 2}), log_mlflow=False,
                            out_dir=tmp_path / "out")  # fmt: skip
    assert report["engine"] == "vllm" and "answers decoded by vllm (float32 on " in report["text"]
    assert "accuracy_expert" in report["metrics"]


def test_vllm_asked_for_where_it_is_missing_is_one_line_error_before_the_model_runs(
    models: dict[str, Path],
    suite_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("crlft.inference.engine.vllm_installed", lambda: False)
    code, err = run_cli(["eval", "--model", str(models["crlft"]), "--suite", str(suite_files["eval"]), "--engine",
                         "vllm", "--out", str(tmp_path / "out"), "--no-mlflow"], capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "inference.engine=vllm, but vLLM is not installed" in err
    assert not (tmp_path / "out").exists()


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from jobs.cli import main

    code = main(argv)
    return code, capsys.readouterr().err


def test_a_suite_with_malformed_lines_is_one_line_error_and_nothing_is_registered(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = tmp_path / "suite.jsonl"
    suite.write_text('{"prompt": "a?", "answer": "b"}\n{"prompt": "c?"}\nnot json\n')
    db = tmp_path / "mlflow.db"
    code, err = run_cli(["eval", "--model", str(models["crlft"]), "--suite", str(suite), "--register-as", "x",
                         "--mlflow-uri", f"sqlite:///{db}", "--set", f"state_dir={tmp_path / 'state'}"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "suite.jsonl:2: missing field 'answer'" in err and "suite.jsonl:3" in err
    assert not db.exists() and not (tmp_path / "state").exists()


def test_a_model_that_does_not_exist_is_one_line_error(tmp_path: Path, suite_files: dict[str, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["eval", "--model", str(tmp_path / "nope"), "--suite", str(suite_files["eval"]),
                         "--no-mlflow"], capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "no model directory" in err


def test_an_unreachable_tracking_server_is_one_line_error_before_the_model_runs(
    models: dict[str, Path], suite_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(["eval", "--model", "models:/crlft-chat@champion", "--suite", str(suite_files["eval"]),
                         "--mlflow-uri", f"http://127.0.0.1:{free_port()}",
                         "--set", f"state_dir={tmp_path / 'state'}"], capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "unreachable" in err
    assert not (tmp_path / "state" / "eval").exists()


@pytest.mark.slow
def test_eval_registers_the_model_and_logs_figures_table_and_plot_on_its_version(
    models: dict[str, Path], suite_files: dict[str, Path], tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from crlft.lineage.evaluation import suite_id
    from crlft.lineage.versions import list_versions
    from jobs.evaluate import evaluate_model

    cfg = overridden(_config(tmp_path), {"eval.max_per_class": 4, "eval.max_new_tokens": 2})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = evaluate_model(models["crlft"], suite_files["eval"], cfg, heldout=suite_files["heldout"],
                           register_as="crlft-chat", tracking_uri=uri)  # fmt: skip
    assert first["model_version"] == {"name": "crlft-chat", "version": "1"}
    client = MlflowClient(uri, uri)
    logged = {Path(a.path).name for a in client.list_artifacts(first["run_id"], "evaluation")}
    assert {"embeddings.png", "condition_swap.jsonl", "metrics.json"} <= logged
    assert "condition_swap_table.json" in {a.path for a in client.list_artifacts(first["run_id"])}
    run_metrics = client.get_run(first["run_id"]).data.metrics
    assert {"accuracy_expert", "accuracy_suboptimal", "condition_gap", "silhouette"} <= set(run_metrics)
    params = client.get_run(first["run_id"]).data.params
    assert (params["eval_engine"], params["eval_dtype"]) == ("transformers", "float32")

    (version,) = list_versions("crlft-chat", cfg, tracking_uri=uri)
    assert version.latest_suite == suite_id(suite_files["eval"])
    assert version.metric("accuracy_expert") == pytest.approx(first["metrics"]["accuracy_expert"])
    assert version.evaluations[suite_id(suite_files["heldout"])]["silhouette"] == pytest.approx(
        first["metrics"]["silhouette"])

    again = evaluate_model("models:/crlft-chat/1", suite_files["eval"], cfg, conditions=["GPT4"],
                           tracking_uri=uri)  # fmt: skip
    assert again["model_version"] == {"name": "crlft-chat", "version": "1"}  # a registered model logs on itself
    assert again["metrics"]["accuracy_expert"] == pytest.approx(first["metrics"]["accuracy_expert"])


def test_results_never_replace_a_folder_that_holds_other_files(models: dict[str, Path], suite_files: dict[str, Path],
                                                               tmp_path: Path) -> None:
    from jobs.evaluate import evaluate_model

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CrlftError, match="not evaluation results"):
        evaluate_model(models["crlft"], suite_files["eval"], _config(tmp_path),
                       log_mlflow=False, out_dir=tmp_path)  # fmt: skip
    assert (tmp_path / "notes.txt").read_text() == "mine"
