"""The registry: every model a version with its lineage, loadable by alias, and a champion that only moves to a model
at least as good, even when promotions race. Run against a real `mlflow server` on loopback and the SQLite file."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tracking_server import TrackingServer

from cluster.session import free_port
from crlft.config import Config, overridden
from crlft.errors import CrlftError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    """A real tracking server, launched first and awaited only by the tests that use it, so that its slow start
    overlaps the other setup."""
    server = TrackingServer(tmp_path_factory.mktemp("mlflow-server"))
    server.launch()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mlflow_server(tracking_server: TrackingServer) -> str:
    return tracking_server.wait()


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite file for the module (its schema takes seconds to create); tests use their own model names."""
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny exported C-RLFT model folder (random weights: registry tests do not need a good one)."""
    from crlft.export import ModelMeta, save_exported
    from crlft.model import load_model_and_tokenizer
    from crlft.presets import init_model

    root = tmp_path_factory.mktemp("model")
    base = init_model(root / "base")
    model, tokenizer = load_model_and_tokenizer(str(base))
    meta = ModelMeta.from_config(Config(), base_model=str(base), data_fingerprint="data-fp-123", git_commit="abc123")
    return save_exported(model, tokenizer, root / "exported", meta)


@pytest.fixture(params=["server", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Config, str]:
    """(config with a temp state folder, tracking URI) for each kind of store; MLFLOW_TRACKING_URI is restored."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config(state_dir=str(tmp_path / "state"))
    return cfg, request.getfixturevalue("mlflow_server" if request.param == "server" else "sqlite_uri")


@pytest.fixture
def server_store(mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Config, str]:
    """The tracking server only: for behaviour that does not depend on the kind of store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Config(state_dir=str(tmp_path / "state")), mlflow_server


def unique_name() -> str:
    return f"crlft-test-{uuid.uuid4().hex[:8]}"


def register_evaluated(model_dir: Path, cfg: Config, uri: str, name: str, accuracy: float | None,
                       suite: str = "suite-a") -> str:
    from crlft.lineage.evaluation import record_evaluation
    from crlft.lineage.registration import register_model

    version = register_model(model_dir, cfg, name=name, tracking_uri=uri)
    if accuracy is not None:
        record_evaluation(name, version, {"accuracy_expert": accuracy}, suite, cfg=cfg, tracking_uri=uri)
    return version


def champion_version(cfg: Config, uri: str, name: str) -> str | None:
    from crlft.lineage.versions import list_versions

    holders = [v.version for v in list_versions(name, cfg, tracking_uri=uri) if "champion" in v.aliases]
    assert len(holders) <= 1
    return holders[0] if holders else None


def test_a_registered_version_carries_lineage_tags_and_points_to_the_run_holding_the_model(
    store: tuple[Config, str], exported_model: Path
) -> None:
    from mlflow import MlflowClient

    from crlft.lineage.registration import register_model
    from crlft.lineage.versions import version_info

    cfg, uri = store
    name = unique_name()
    version = register_model(exported_model, cfg, name=name, tracking_uri=uri, tags={"team": "x"})
    assert version == "1"
    info = version_info(name, version, cfg, tracking_uri=uri)
    assert info.tags["crlft.mode"] == "crlft"
    assert info.tags["crlft.data_fingerprint"] == "data-fp-123"
    assert info.tags["crlft.git_commit"] == "abc123"
    assert info.tags["crlft.base_model"].endswith("base")
    assert info.tags["team"] == "x"
    client = MlflowClient(uri, uri)
    assert {Path(a.path).name for a in client.list_artifacts(info.run_id, "model")} >= {"config.json", "crlft.json"}
    assert info.source.endswith("/model")


def test_registering_with_the_training_run_links_it_and_reuses_the_model_it_logged(
    store: tuple[Config, str], exported_model: Path
) -> None:
    from mlflow import MlflowClient

    from crlft.lineage.registration import register_model
    from crlft.lineage.versions import version_info
    from crlft.tracking import client_for

    cfg, uri = store
    client, _ = client_for(cfg, uri)
    experiment = MlflowClient(uri, uri).get_experiment_by_name(cfg.registry.experiment)
    training_run = client.create_run(experiment.experiment_id, run_name="train").info.run_id
    client.log_artifacts(training_run, str(exported_model), "model")
    name = unique_name()
    version = register_model(exported_model, cfg, run_id=training_run, name=name, tracking_uri=uri)
    info = version_info(name, version, cfg, tracking_uri=uri)
    assert info.run_id == training_run
    assert [a.path for a in client.list_artifacts(training_run)] == ["model"]  # logged once, by "the trainer"

    with pytest.raises(CrlftError, match="does not exist in this MLflow store"):
        register_model(exported_model, cfg, run_id="0" * 32, name=name, tracking_uri=uri)


def test_a_champion_loads_by_alias_and_by_version_into_transformers_from_a_local_cache(
    store: tuple[Config, str], exported_model: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crlft.lineage.cache import resolve_model
    from crlft.lineage.promotion import promote

    cfg, uri = store
    name = unique_name()
    version = register_evaluated(exported_model, cfg, uri, name, 0.5)
    assert promote(name, version, cfg=cfg, tracking_uri=uri).decision == "promoted"

    by_alias = resolve_model(f"models:/{name}@champion", cfg, tracking_uri=uri)
    assert by_alias.is_relative_to(Path(cfg.state_dir).resolve())
    model = AutoModelForCausalLM.from_pretrained(by_alias)
    tokenizer = AutoTokenizer.from_pretrained(by_alias)
    assert model.config.vocab_size == len(tokenizer)
    assert resolve_model(f"models:/{name}/{version}", cfg, tracking_uri=uri) == by_alias  # cached once
    assert resolve_model(exported_model, cfg) == exported_model  # a folder is used as it is


def test_champion_moves_only_to_a_version_at_least_as_good_and_every_decision_is_recorded(
    store: tuple[Config, str], exported_model: Path
) -> None:
    from crlft.lineage.promotion import promote
    from crlft.lineage.versions import version_info

    cfg, uri = store
    name = unique_name()
    v1, v2, v3, v4 = (register_evaluated(exported_model, cfg, uri, name, a) for a in (0.5, 0.7, 0.6, 0.7))

    first = promote(name, v1, cfg=cfg, tracking_uri=uri)
    assert (first.decision, first.champion_version) == ("promoted", None)
    assert promote(name, v2, cfg=cfg, tracking_uri=uri).decision == "promoted"
    worse = promote(name, v3, cfg=cfg, tracking_uri=uri)
    assert worse.decision == "refused"
    assert champion_version(cfg, uri, name) == v2
    assert (worse.candidate_value, worse.champion_value, worse.champion_version) == (0.6, 0.7, v2)
    tags = version_info(name, v3, cfg, tracking_uri=uri).tags
    assert tags["crlft.promotion.decision"] == "refused"
    assert (tags["crlft.promotion.candidate_value"], tags["crlft.promotion.champion_value"]) == ("0.6", "0.7")
    assert promote(name, v4, cfg=cfg, tracking_uri=uri).decision == "promoted"  # equal is good enough
    assert promote(name, v4, cfg=cfg, tracking_uri=uri).decision == "unchanged"
    assert champion_version(cfg, uri, name) == v4


def test_force_moves_the_champion_to_a_worse_version_and_is_recorded_as_forced(
    server_store: tuple[Config, str], exported_model: Path
) -> None:
    from crlft.lineage.promotion import promote
    from crlft.lineage.versions import version_info

    cfg, uri = server_store
    name = unique_name()
    good, bad = (register_evaluated(exported_model, cfg, uri, name, a) for a in (0.9, 0.1))
    promote(name, good, cfg=cfg, tracking_uri=uri)
    forced = promote(name, bad, force=True, cfg=cfg, tracking_uri=uri)
    assert forced.forced and forced.is_champion
    assert champion_version(cfg, uri, name) == bad
    assert version_info(name, bad, cfg, tracking_uri=uri).tags["crlft.promotion.forced"] == "true"


def test_a_candidate_that_forgot_what_its_base_knew_is_refused_and_the_champion_keeps_its_alias(
    server_store: tuple[Config, str], exported_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from crlft.lineage.evaluation import record_evaluation
    from crlft.lineage.promotion import promote
    from crlft.lineage.tags import RETENTION_SUITE
    from crlft.lineage.versions import version_info
    from jobs.cli import main

    cfg, uri = server_store
    name = unique_name()
    champion, forgetful, unmeasured = (register_evaluated(exported_model, cfg, uri, name, a) for a in (0.5, 0.9, 0.6))
    promote(name, champion, cfg=cfg, tracking_uri=uri)
    record_evaluation(name, forgetful, {"retention": 0.42, "general_accuracy": 0.22, "base_general_accuracy": 0.52},
                      RETENTION_SUITE, cfg=cfg, tracking_uri=uri)  # fmt: skip

    common = ["--mlflow-uri", uri, "--set", f"state_dir={cfg.state_dir}"]
    assert main(["promote", name, "--version", forgetful, *common]) == 1
    out = capsys.readouterr().out
    assert ("retention 0.420 < registry.min_retention 0.90 (general accuracy 0.220 against its base model's 0.520)"
            in out)
    assert "--force" in out
    assert champion_version(cfg, uri, name) == champion
    info = version_info(name, forgetful, cfg, tracking_uri=uri)
    assert info.latest_suite == "suite-a"  # retention is recorded beside the suite, not instead of it
    assert (info.tags["crlft.promotion.retention"], info.tags["crlft.promotion.min_retention"]) == ("0.42", "0.9")
    assert main(["models", name, *common]) == 0
    assert "retention" in (table := capsys.readouterr().out) and "0.4200" in table

    assert main(["promote", name, "--version", forgetful, "--set", "registry.min_retention=0.4", *common]) == 0
    assert promote(name, unmeasured, cfg=cfg, tracking_uri=uri).decision == "refused"  # worse, not gated
    assert promote(name, unmeasured, force=True, cfg=cfg, tracking_uri=uri).decision == "forced"


def test_versions_are_compared_only_on_the_same_suite(server_store: tuple[Config, str], exported_model: Path) -> None:
    from crlft.lineage.promotion import promote

    cfg, uri = server_store
    name = unique_name()
    champion = register_evaluated(exported_model, cfg, uri, name, 0.2, suite="suite-a")
    other_suite = register_evaluated(exported_model, cfg, uri, name, 0.9, suite="suite-b")
    not_evaluated = register_evaluated(exported_model, cfg, uri, name, None)
    promote(name, champion, cfg=cfg, tracking_uri=uri)

    refused = promote(name, other_suite, cfg=cfg, tracking_uri=uri)
    assert refused.decision == "refused" and "cannot be compared" in refused.reason
    with pytest.raises(CrlftError, match="evaluate it first"):
        promote(name, not_evaluated, cfg=cfg, tracking_uri=uri)
    assert champion_version(cfg, uri, name) == champion


def test_concurrent_promotions_leave_exactly_one_champion_and_never_move_it_to_a_worse_version(
    store: tuple[Config, str], exported_model: Path
) -> None:
    from mlflow import MlflowClient

    from crlft.lineage.lock import LOCK_SUFFIX
    from crlft.lineage.promotion import PromotionDecision, promote

    cfg, uri = store
    name = unique_name()
    accuracies = [0.3, 0.9, 0.5, 0.8, 0.4, 0.7]
    versions = [register_evaluated(exported_model, cfg, uri, name, a) for a in accuracies]
    start = threading.Barrier(len(versions))
    decisions: list[PromotionDecision] = []
    errors: list[BaseException] = []

    def contend(version: str) -> None:
        start.wait()
        try:
            decisions.append(promote(name, version, cfg=cfg, tracking_uri=uri))
        except BaseException as exc:  # reported below, with the thread's own error
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(v,)) for v in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert champion_version(cfg, uri, name) == versions[accuracies.index(max(accuracies))]
    # In the order the decisions were taken, the champion's figure only ever went up.
    client = MlflowClient(uri, uri)
    experiment = client.get_experiment_by_name(cfg.registry.experiment)
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.`crlft.model_name` = '{name}' and tags.`crlft.kind` = 'promotion'",
        order_by=["attributes.start_time ASC"],
    )
    promoted = [float(r.data.tags["crlft.promotion.candidate_value"]) for r in runs
                if r.data.tags["crlft.promotion.decision"] == "promoted"]  # fmt: skip
    assert len(runs) == len(versions)
    assert promoted == sorted(promoted)
    assert all(d.decision != "promoted" or d.champion_value is None or d.candidate_value >= d.champion_value
               for d in decisions)  # fmt: skip
    with pytest.raises(Exception, match="not found|does not exist|RESOURCE_DOES_NOT_EXIST"):
        client.get_registered_model(name + LOCK_SUFFIX)  # released


def test_a_lock_left_by_a_crashed_promoter_expires_and_a_live_one_times_out(
    server_store: tuple[Config, str], exported_model: Path
) -> None:
    from crlft.lineage.lock import LOCK_SUFFIX, promotion_lock
    from crlft.lineage.promotion import promote
    from crlft.tracking import client_for

    cfg, uri = server_store
    name = unique_name()
    version = register_evaluated(exported_model, cfg, uri, name, 0.5)
    client, _ = client_for(cfg, uri)
    client.create_registered_model(name + LOCK_SUFFIX, tags={"crlft.lock.expires": repr(time.time() - 1)})
    assert promote(name, version, cfg=cfg, tracking_uri=uri).decision == "promoted"

    client.create_registered_model(name + LOCK_SUFFIX, tags={"crlft.lock.expires": repr(time.time() + 600)})
    with pytest.raises(CrlftError, match="holds the lock"), promotion_lock(client, name, timeout_s=0.3):
        pass


def test_a_model_uri_that_does_not_exist_is_one_line_that_says_what_to_do(
    server_store: tuple[Config, str], exported_model: Path
) -> None:
    from crlft.lineage.cache import resolve_model

    cfg, uri = server_store
    name = unique_name()
    register_evaluated(exported_model, cfg, uri, name, 0.5)
    cases = {
        "models:/no-such-model@champion": "no registered model 'no-such-model'",
        f"models:/{name}@champion": "has no alias 'champion'",
        f"models:/{name}/99": "has no version 99",
        "models:/": "not a registered model URI",
        str(exported_model.parent / "missing"): "no model directory",
    }
    for model_uri, message in cases.items():
        with pytest.raises(CrlftError, match=message) as raised:
            resolve_model(model_uri, cfg, tracking_uri=uri)
        assert "\n" not in str(raised.value)
    assert not (Path(cfg.state_dir) / "models" / "registry").exists() or not any(
        (Path(cfg.state_dir) / "models" / "registry").rglob("config.json"))  # fmt: skip


def test_an_unreachable_tracking_server_is_one_line_error_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exported_model: Path
) -> None:
    from crlft.lineage.cache import resolve_model
    from crlft.lineage.promotion import promote
    from crlft.lineage.registration import register_model
    from crlft.lineage.versions import list_versions

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config(state_dir=str(tmp_path / "state"))
    dead = f"http://127.0.0.1:{free_port()}"
    for call in (
        lambda: register_model(exported_model, cfg, tracking_uri=dead),
        lambda: promote("crlft-chat", "1", cfg=cfg, tracking_uri=dead),
        lambda: resolve_model("models:/crlft-chat@champion", cfg, tracking_uri=dead),
        lambda: list_versions("crlft-chat", cfg, tracking_uri=dead),
    ):
        with pytest.raises(CrlftError, match="unreachable") as raised:
            call()
        assert "\n" not in str(raised.value)
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").rglob("*.db"))


def test_models_and_promote_commands_print_the_versions_and_the_decision(
    server_store: tuple[Config, str], exported_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jobs.cli import main

    cfg, uri = server_store
    name = unique_name()
    v1, v2 = (register_evaluated(exported_model, cfg, uri, name, a) for a in (0.5, 0.25))
    common = ["--mlflow-uri", uri, "--set", f"state_dir={cfg.state_dir}"]
    assert main(["promote", name, "--version", v1, *common]) == 0
    assert main(["promote", name, "--version", v2, *common]) == 1  # refused: worse
    assert main(["models", name, *common]) == 0
    out = capsys.readouterr().out
    assert f"{name} v{v2}: refused (accuracy_expert 0.2500 < 0.5000 of v{v1})" in out
    assert "champion" in out and "0.5000" in out and "refused" in out
    assert main(["promote", name, "--version", "42", *common]) == 2
    assert "has no version 42" in capsys.readouterr().err


def test_an_evaluation_on_the_server_is_recorded_on_the_version_and_decides_the_promotion(
    server_store: tuple[Config, str], exported_model: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from crlft.lineage.evaluation import suite_id
    from crlft.lineage.promotion import promote
    from crlft.synth.suite import write_suite
    from jobs.evaluate import evaluate_model

    cfg, uri = server_store
    cfg.inference.engine = "transformers"  # what records the result is the subject; vLLM's decoding: test_evaluate.py
    files = write_suite(tmp_path / "suite", n_expert=6, ratio=1, n_eval=6, n_heldout=8)
    name = unique_name()
    report = evaluate_model(exported_model, files["eval"],
                            overridden(cfg, {"eval.max_per_class": 4, "eval.max_new_tokens": 2}),
                            heldout=files["heldout"], register_as=name, tracking_uri=uri)  # fmt: skip
    version = report["model_version"]["version"]
    logged = {Path(a.path).name for a in MlflowClient(uri, uri).list_artifacts(report["run_id"], "evaluation")}
    assert "embeddings.png" in logged
    decision = promote(name, version, cfg=cfg, tracking_uri=uri)
    assert decision.decision == "promoted" and decision.suite == suite_id(files["eval"])
    assert decision.candidate_value == pytest.approx(report["metrics"]["accuracy_expert"])


def test_the_champion_adapters_are_the_names_whose_champion_is_an_adapter_version_with_its_base(
    store: tuple[Config, str], exported_model: Path
) -> None:
    """What serve.adapters' `*` serves: a name counts while its champion is an adapter version (on the base asked
    for); a name with no champion, whose champion moved to a whole model, or that was deleted, does not."""
    from mlflow import MlflowClient

    from crlft.lineage.bases import ChampionAdapter, champion_adapters
    from crlft.lineage.registration import register_model
    from crlft.lineage.tags import ADAPTER_OF_TAG, BASE_FINGERPRINT_TAG

    cfg, uri = store
    client = MlflowClient(uri, uri)
    base, other_base = uuid.uuid4().hex[:16], uuid.uuid4().hex[:16]  # fingerprints no other test registers
    served, unpromoted, left, deleted, elsewhere = (unique_name() for _ in range(5))
    whole = client.get_model_version(left, register_model(exported_model, cfg, name=left, tracking_uri=uri))

    def register(name: str, fingerprint: str | None, champion: bool = True) -> str:
        """A version of `name` from the same files, tagged as an adapter on `fingerprint` (None: a whole model)."""
        tags = {ADAPTER_OF_TAG: f"models:/{cfg.registry.base_model_name}/1", BASE_FINGERPRINT_TAG: fingerprint}
        if name != left:
            client.create_registered_model(name)
        version = client.create_model_version(name, whole.source, run_id=whole.run_id,
                                              tags=tags if fingerprint else {}).version
        if champion:
            client.set_registered_model_alias(name, cfg.registry.alias, version)
        return str(version)

    version = register(served, base)
    register(unpromoted, base, champion=False)
    register(left, base)
    register(left, None)  # the champion moves to a whole model: off the base
    register(deleted, base)
    client.delete_registered_model(deleted)
    register(elsewhere, other_base)
    assert champion_adapters(cfg, uri, base) == [ChampionAdapter(served, version, base)]
    everywhere = [c for c in champion_adapters(cfg, uri) if c.base_fingerprint in (base, other_base)]
    assert [(c.name, c.base_fingerprint) for c in everywhere] == sorted([(served, base), (elsewhere, other_base)])
