"""Faults around training, for real: the MLflow tracking server stopped (its process terminated) during `train()`
and started again on the same port and store, or never again; `crlft eval` meeting a stopped server; a checkpoint
that cannot be written. Every wait is bounded, so a regression fails instead of hanging."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_train import config, in_thread, write_dataset
from tracking_server import TrackingServer

from crlft.config import Config, overridden
from crlft.errors import CrlftError

pytestmark = pytest.mark.slow

TOTAL_STEPS = 48  # 24 bins, 2 epochs, one worker
RUN_TIMEOUT_S = 300  # one train() or evaluation, outage included
# MLflow's client retries a request for minutes, at growing intervals (up to a minute apart by default). Where a test
# waits for it to give up, it retries briefly; where it waits for the server to return, often and for longer.
BRIEF_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
PATIENT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "10", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    server = TrackingServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def server_up(tracking_server: TrackingServer) -> TrackingServer:
    """The server, running (a test before may have left it stopped)."""
    if not tracking_server.healthy():
        tracking_server.start()
    return tracking_server


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from crlft.presets import init_model

    return init_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def data(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "long", tiny_model, "crlft", bins=24, per_bin=2)


def _config(tmp: Path, tracking_uri: str | None = None, **overrides: Any) -> Config:
    settings = {"train.workers": 1, "train.epochs": 2, "train.checkpoint_every": 4, "train.max_failures": 0}
    if tracking_uri:
        settings["registry.tracking_uri"] = tracking_uri
    return config(tmp, **{**settings, **overrides})


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str, thread: threading.Thread) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert thread.is_alive(), f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.05)


def _checkpointed_step(storage: Path) -> int:
    """The step of the latest checkpoint Ray Train has recorded (written completely) in a run folder under `storage`;
    0 before the first."""
    steps = [0]
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except (json.JSONDecodeError, OSError):  # being written
            continue
        steps.append(int(latest.get("metrics", {}).get("step", 0)))
    return max(steps)


def _train_in_thread(data: Path, model: Path, out: Path, cfg: Config, resume: bool = False) -> Any:
    from jobs.train import train

    return in_thread(lambda: train(data, str(model), out, cfg, resume=resume))


def _loss_history(uri: str, run_id: str, key: str = "loss") -> list[Any]:
    from mlflow.tracking import MlflowClient

    return sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)


# ---------------------------------------------------------------------------------------------------------------------
# The tracking server goes away


def test_training_goes_on_through_a_tracker_outage_and_every_step_is_logged_and_registered_when_it_returns(
    ray_session: None, server_up: TrackingServer, data: Path, tiny_model: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.tracking import MlflowClient

    for key, value in PATIENT_RETRIES.items():  # the driver's; the workers keep MLflow's defaults
        monkeypatch.setenv(key, value)
    cfg = _config(tmp_path, server_up.uri)
    thread, outcome = _train_in_thread(data, tiny_model, tmp_path / "out", cfg)
    _wait_for(lambda: _checkpointed_step(tmp_path / "ray_results") > 0, RUN_TIMEOUT_S, "first checkpoint",
              thread)
    server_up.stop()
    stopped_ms = time.time() * 1000
    # the run checkpoints on while the server is away (the driver then waits for it at the end)
    _wait_for(lambda: _checkpointed_step(tmp_path / "ray_results") >= TOTAL_STEPS, RUN_TIMEOUT_S,
              "last checkpoint while the server was away", thread)
    server_up.start()
    back_ms = time.time() * 1000
    thread.join(RUN_TIMEOUT_S)
    assert not thread.is_alive(), f"train() did not end within {RUN_TIMEOUT_S} s of the server's return"
    assert "error" not in outcome, str(outcome.get("error"))
    result = outcome["result"]

    losses = _loss_history(server_up.uri, result.mlflow_run_id)
    assert [m.step for m in losses] == list(range(1, TOTAL_STEPS + 1))  # every step, once
    during_outage = [m.step for m in losses if stopped_ms <= m.timestamp <= back_ms]
    assert during_outage, "no step was trained while the server was away"
    step_seconds = [m.value for m in _loss_history(server_up.uri, result.mlflow_run_id, "step_s")]
    assert max(step_seconds) < 30, f"a step waited on the tracking server: {max(step_seconds):.1f} s"
    client = MlflowClient(server_up.uri)
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    version = client.get_model_version(cfg.registry.model_name, result.model_version)
    assert version.run_id == result.mlflow_run_id
    print(f"outage {(back_ms - stopped_ms) / 1000:.1f} s: steps {during_outage[0]}-{during_outage[-1]} trained "
          f"meanwhile; slowest step {max(step_seconds):.2f} s; registered v{result.model_version}")


def test_while_the_server_is_away_the_sender_only_probes_it_and_sends_the_held_metrics_once_it_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlflow.tracking

    from jobs.training import mlflow_run

    back, sent, tries, probes = threading.Event(), [], [], []

    class Client:  # MLflow's, whose every send to a server that is away retries for about a minute
        def __init__(self, _uri: str) -> None:
            pass

        def log_batch(self, _run_id: str, metrics: list[Any]) -> None:
            tries.append(len(metrics))
            if not back.is_set():
                raise ConnectionError("refused")
            sent.extend(metrics)

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", Client)
    monkeypatch.setattr(mlflow_run, "answers", lambda uri: probes.append(uri) or back.is_set())
    logger = mlflow_run.MetricsLogger("http://127.0.0.1:1", "run", flush_every_s=0.05)
    try:
        logger.log({"loss": 1.0}, step=1)
        deadline = time.monotonic() + 10
        while len(probes) < 5:  # probed at every flush, not after a growing wait
            assert time.monotonic() < deadline, "the sender does not probe the server"
            time.sleep(0.05)
        logger.log({"loss": 0.5}, step=2)
        assert tries == [1]  # the one send that found the server away
        back.set()
        deadline = time.monotonic() + 2
        while len(sent) < 2:
            assert time.monotonic() < deadline, "the held metrics were not sent after the server's return"
            time.sleep(0.05)
    finally:
        logger.close()
    assert [(m.step, m.value) for m in sent] == [(1, 1.0), (2, 0.5)]


def test_a_tracker_that_never_returns_fails_the_run_naming_the_exported_model_and_the_command_that_registers_it(
    ray_session: None, server_up: TrackingServer, data: Path, tiny_model: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.tracking import MlflowClient

    for key, value in BRIEF_RETRIES.items():
        monkeypatch.setenv(key, value)
    cfg = _config(tmp_path, server_up.uri, **{"train.epochs": 1})
    out = tmp_path / "out"
    thread, outcome = _train_in_thread(data, tiny_model, out, cfg)
    _wait_for(lambda: _checkpointed_step(tmp_path / "ray_results") > 0, RUN_TIMEOUT_S, "first checkpoint",
              thread)
    server_up.stop()
    thread.join(RUN_TIMEOUT_S)
    assert not thread.is_alive(), f"train() did not give up on the server within {RUN_TIMEOUT_S} s"
    error = outcome.get("error")
    assert isinstance(error, CrlftError), error
    message = str(error)
    assert f"exported to {out} but not registered" in message and "RUNNING, not FINISHED" in message
    assert f"crlft train --data {data} --out {out} --resume" in message
    assert (out / "config.json").is_file()

    server_up.start()
    client = MlflowClient(server_up.uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.registry.experiment).experiment_id])[0]
    assert run.info.status == "RUNNING"
    assert not client.search_model_versions(f"run_id = '{run.info.run_id}'")
    # The command the message gives registers it, with every step's metrics.
    thread, outcome = _train_in_thread(data, tiny_model, out, cfg, resume=True)
    thread.join(RUN_TIMEOUT_S)
    assert "result" in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.mlflow_run_id == run.info.run_id and result.steps == 24
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert client.get_model_version(cfg.registry.model_name, result.model_version).run_id == run.info.run_id
    assert [m.step for m in _loss_history(server_up.uri, run.info.run_id)] == list(range(1, 25))


def test_an_evaluation_the_tracker_cannot_take_says_what_was_not_recorded_and_how_to_record_it(
    server_up: TrackingServer, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import crlft.eval.measure
    import jobs.evaluate
    from crlft.export import ModelMeta, save_exported
    from crlft.model import load_model_and_tokenizer

    for key, value in BRIEF_RETRIES.items():
        monkeypatch.setenv(key, value)
    model, tokenizer = load_model_and_tokenizer(str(tiny_model))
    cfg = config(tmp_path, **{"registry.tracking_uri": server_up.uri, "inference.engine": "transformers"})
    exported = save_exported(model, tokenizer, tmp_path / "exported", ModelMeta.from_config(cfg))
    suite = tmp_path / "suite.jsonl"
    suite.write_text("".join(json.dumps({"prompt": f"What is {a}+1?", "answer": f"{a + 1}"}) + "\n" for a in range(2)))
    measure = crlft.eval.measure.measure_all

    def measure_while_the_server_stops(*args: Any, **kwargs: Any) -> Any:
        server_up.stop()  # after the checks that reach it, before anything is recorded
        return measure(*args, **kwargs)

    monkeypatch.setattr(jobs.evaluate, "measure_all", measure_while_the_server_stops)  # where it is looked up
    out = tmp_path / "eval"
    started = time.monotonic()
    with pytest.raises(CrlftError) as raised:
        jobs.evaluate.evaluate_model(exported, suite, overridden(cfg, {"eval.max_new_tokens": 2}), out_dir=out,
                                     register_as="crlft-eval")
    assert time.monotonic() - started < RUN_TIMEOUT_S
    message = str(raised.value)
    assert f"MLflow at {server_up.uri} did not record the evaluation" in message
    assert f"Not recorded: the registration of {exported} as crlft-eval; the evaluation run" in message
    assert f"The results are in {out}; once the store answers, run this `crlft eval` again" in message
    assert json.loads((out / "metrics.json").read_text())


# ---------------------------------------------------------------------------------------------------------------------
# Storage


def test_training_state_that_cannot_be_written_names_the_folder_and_the_cause(tiny_model: Path,
                                                                              tmp_path: Path) -> None:
    import torch

    from crlft.model import load_model_and_tokenizer
    from crlft.train.checkpoint import TrainingPosition, save_training_state

    model, _ = load_model_and_tokenizer(str(tiny_model))
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    (tmp_path / "storage").write_text("a regular file where the checkpoint folder's parent must be")
    target = tmp_path / "storage" / "checkpoint"
    with pytest.raises(CrlftError, match=re.escape(f"cannot write the training state to {target}: Not a directory")):
        save_training_state(target, model, optimizer, scheduler, TrainingPosition())


def _immutable(path: Path, on: bool) -> bool:
    """chattr +i: not even root may add an entry to the folder (a write that fails for real, as on a full or
    read-only volume). False where the filesystem or the container does not allow it."""
    chattr = shutil.which("chattr")
    if chattr is None:
        return False
    return subprocess.run([chattr, "+i" if on else "-i", str(path)], capture_output=True).returncode == 0


def test_a_checkpoint_that_cannot_be_stored_fails_naming_the_place_and_cause_and_the_previous_one_resumes(
    ray_session: None, data: Path, tiny_model: Path, tmp_path: Path
) -> None:
    cfg = _config(tmp_path, **{"train.epochs": 1})
    storage, out = tmp_path / "ray_results", tmp_path / "out"
    thread, outcome = _train_in_thread(data, tiny_model, out, cfg)
    _wait_for(lambda: _checkpointed_step(storage) > 0, RUN_TIMEOUT_S, "first checkpoint", thread)
    run_dir = next(storage.glob("crlft-*"))
    if not _immutable(run_dir, True):
        thread.join(RUN_TIMEOUT_S)
        pytest.skip("chattr +i is not allowed here (needs CAP_LINUX_IMMUTABLE on ext4/xfs)")
    try:
        thread.join(RUN_TIMEOUT_S)
    finally:
        _immutable(run_dir, False)
    assert not thread.is_alive(), f"train() did not end within {RUN_TIMEOUT_S} s"
    error = outcome.get("error")
    assert isinstance(error, CrlftError), error
    assert "cannot store the checkpoint of step" in str(error) and f"in {run_dir}" in str(error)
    assert "Operation not permitted" in str(error) and "--resume" in str(error)

    resumed = _train_in_thread(data, tiny_model, out, cfg, resume=True)
    resumed[0].join(RUN_TIMEOUT_S)
    result = resumed[1].get("result")
    assert result is not None, resumed[1].get("error")
    assert result.steps == 24 and result.restored_from_step is not None and result.restored_from_step % 4 == 0
