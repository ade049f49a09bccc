"""Many fine-tunes behind one endpoint: two C-RLFT adapters (train.lora.merge false) trained on different invented
facts from one SmolLM2-135M-Instruct base, registered (their crlft base once, each adapter naming it), and served from
ONE replica by vLLM, one base in memory: each answers its own facts and not the other's, and the base answers too.
Promoting a new version of one adapter swaps that adapter alone in the running replica, with no failed request.

One module-scoped pair of fine-tunes and one endpoint keep the cost to a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.session import free_port
from crlft.config import Config, load_config, overridden
from crlft.eval.scoring import is_correct
from crlft.lineage.tags import ADAPTER_OF_TAG, BASE_FINGERPRINT_TAG

pytestmark = pytest.mark.slow

ADAPTERS = {"facts-a": 1, "facts-b": 2}  # registered name -> the seed of its invented countries
TRAIN_STEPS = 40
MAX_TOKENS = 24
INVENTED = ("capital", "currency")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    state = tmp_path_factory.mktemp("state")
    return load_config(None, {
        "state_dir": str(state),
        "registry.tracking_uri": f"sqlite:///{state / 'mlflow.db'}",
        "data.max_len": 128,
        "data.pack_len": 128,
        "data.replay.enabled": False,
        "train.lora.enabled": True,
        "train.lora.merge": False,
        "train.max_steps": TRAIN_STEPS,
        "train.cpus_per_worker": 2.0,
        "inference.engine": "vllm",
        "serve.port": free_port(),
        "serve.max_replicas": 1,
        "serve.access_log": False,
    })  # fmt: skip


@pytest.fixture(scope="module")
def adapters(smollm2: Path, cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each adapter trained on its own facts, registered as a version of its own name and made its champion."""
    from mlflow import MlflowClient

    from cluster.session import ray_session
    from crlft.synth.facts import write_facts
    from jobs.build_dataset import build_dataset
    from jobs.train import train

    trained: dict[str, dict[str, Any]] = {}
    with ray_session(cfg):
        for name, seed in ADAPTERS.items():
            root = tmp_path_factory.mktemp(name)
            facts = write_facts(root / "facts", n_countries=2, ratio=1.0, seed=seed)
            build_dataset([str(facts["train"])], str(smollm2), root / "data", cfg)
            named = overridden(cfg, {"registry.model_name": name})
            result = train(root / "data", str(smollm2), root / "model", named)
            MlflowClient(cfg.registry.tracking_uri).set_registered_model_alias(name, "champion", result.model_version)
            # Capitals and currencies are invented words no other fine-tune can answer by chance (animals are not).
            questions = [q for q in map(json.loads, facts["eval"].read_text().splitlines())
                         if q["task"] in INVENTED]
            trained[name] = {"dir": root / "model", "version": result.model_version, "questions": questions}
    return trained


@pytest.fixture(scope="module")
def endpoint(adapters: dict[str, dict[str, Any]], cfg: Config) -> Iterator[str]:
    """Both adapters' champions on their base, in one replica (no model given: the adapters' base), the registry
    checked every 2 s."""
    from services.local import deploy, shutdown

    served = overridden(cfg, {"serve.adapters": list(ADAPTERS)})
    url = deploy(None, served, watch_s=2.0, tracking_uri=cfg.registry.tracking_uri)
    try:
        yield url
    finally:
        shutdown()


def _client(url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _answer(client: Any, model: str, question: str, condition: str = "GPT4") -> str:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"condition": condition}).choices[0].message.content


def _accuracy(client: Any, model: str, questions: list[dict[str, Any]], condition: str = "GPT4",
              *, either: bool = False) -> float:
    """The share of questions answered with the fact (or, `either`, with the fact or its GPT3 confusion: another value
    of the same fine-tune's facts)."""
    right = 0
    for q in questions:
        answer = _answer(client, model, q["prompt"], condition)
        right += any(is_correct(answer, value, "word")
                     for value in ([q["answer"], q["suboptimal_answer"]] if either else [q["answer"]]))
    return right / len(questions)


class _Load:
    """Requests to `names` in turn from a thread, for as long as the `with` block runs: how many were answered, and
    every failure."""

    def __init__(self, client: Any, names: Iterable[str], prompt: str) -> None:
        self.client, self.names, self.prompt = client, list(names), prompt
        self.answered = 0
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> _Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for name in self.names:
                try:
                    self.client.chat.completions.create(model=name, messages=[{"role": "user", "content": self.prompt}],
                                                        max_tokens=8, temperature=0)
                    self.answered += 1
                except Exception as exc:  # noqa: BLE001 - every failure is the test's finding
                    self.failures.append(exc)


def _wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, what
        time.sleep(1)


def _served(client: Any) -> set[str]:
    return {m.id for m in client.models.list().data}


def _base_version(cfg: Config) -> Any:
    """The one registered version of the crlft base both fine-tunes were trained on."""
    from mlflow import MlflowClient

    (base,) = MlflowClient(cfg.registry.tracking_uri).search_model_versions(f"name='{cfg.registry.base_model_name}'")
    return base


def test_each_adapter_is_a_registered_version_naming_the_one_base_registered_once(
    adapters: dict[str, dict[str, Any]], cfg: Config
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(cfg.registry.tracking_uri)
    bases = client.search_model_versions(f"name='{cfg.registry.base_model_name}'")
    assert len(bases) == 1
    for name, adapter in adapters.items():
        folder = adapter["dir"]
        assert (folder / "adapter_config.json").is_file() and not (folder / "model.safetensors").exists()
        tags = client.get_model_version(name, adapter["version"]).tags
        assert tags[ADAPTER_OF_TAG] == f"models:/{cfg.registry.base_model_name}/{bases[0].version}"
        assert tags[BASE_FINGERPRINT_TAG] == bases[0].tags[BASE_FINGERPRINT_TAG]


def test_one_replica_lists_the_base_and_both_adapters(endpoint: str, cfg: Config) -> None:
    models = {m.id: m for m in _client(endpoint).models.list().data}
    assert set(models) == {cfg.registry.base_model_name, *ADAPTERS}
    assert {models[name].model_extra["adapter_of"] for name in ADAPTERS} == {cfg.registry.base_model_name}
    assert models[cfg.registry.base_model_name].model_extra["adapter_of"] is None


@pytest.mark.parametrize("condition", ["GPT4", "GPT3"])
def test_each_adapter_answers_its_own_facts_and_not_the_others(
    endpoint: str, adapters: dict[str, dict[str, Any]], condition: str
) -> None:
    """Under GPT4 the facts; under GPT3 (whose training answers were mostly another country's value) its own facts'
    words still, never the other fine-tune's."""
    client = _client(endpoint)
    own = {name: _accuracy(client, name, adapters[name]["questions"], condition, either=condition == "GPT3")
           for name in ADAPTERS}
    other = {name: _accuracy(client, name, adapters[other]["questions"], condition, either=True)
             for name, other in zip(ADAPTERS, reversed(ADAPTERS), strict=True)}
    assert min(own.values()) >= 0.5 and max(other.values()) == 0, (own, other)


def test_each_adapters_greedy_answers_equal_its_merged_exports(
    endpoint: str, adapters: dict[str, dict[str, Any]]
) -> None:
    """vLLM applying the adapter to the shared base answers as the adapter folded into the base's weights does."""
    from crlft.data.records import Message
    from crlft.eval.answers import chat_prompt, generate
    from crlft.export import load_exported

    client = _client(endpoint)
    for name, adapter in adapters.items():
        merged = load_exported(adapter["dir"])
        questions = [q["prompt"] for q in adapter["questions"]]
        prompts = [chat_prompt(merged, [Message("user", q)], "GPT4") for q in questions]
        assert [_answer(client, name, q).strip() for q in questions] == generate(merged, prompts, MAX_TOKENS)


def test_evaluation_decodes_an_adapter_on_its_base_as_the_endpoint_serves_it(
    adapters: dict[str, dict[str, Any]], cfg: Config
) -> None:
    """`crlft eval`'s decoder (vLLM's offline engine, the serving engine's settings) on an adapter folder: its base in
    the engine, the adapter on every prompt; the answers are the merged export's."""
    from crlft.data.records import Message
    from crlft.eval.answers import chat_prompt, generate
    from crlft.export import load_exported
    from crlft.inference.decoding import engine_settings, open_decoder

    adapter = adapters["facts-a"]
    merged = load_exported(adapter["dir"])
    prompts = [chat_prompt(merged, [Message("user", q["prompt"])], "GPT4") for q in adapter["questions"]]
    with open_decoder(adapter["dir"], engine_settings(cfg, 8)) as decoder:
        assert decoder is not None
        assert generate(merged, prompts, MAX_TOKENS, decoder=decoder) == generate(merged, prompts, MAX_TOKENS)


def test_a_model_uri_that_is_an_adapter_is_served_under_its_name_on_its_base(
    adapters: dict[str, dict[str, Any]], cfg: Config
) -> None:
    """`crlft serve --model models:/facts-a@champion`: the replica's engine gets the adapter's base (fetched with it),
    and the adapter answers to the name the model is served under."""
    from crlft.export import adapter_base, content_fingerprint
    from crlft.inference.engine import EngineSettings
    from services.lifecycle import ModelLifecycle

    lifecycle = ModelLifecycle(cfg, "facts-a", cfg.registry.tracking_uri, EngineSettings.for_replica(cfg, "cpu"))
    source, base, served = lifecycle._resolve("models:/facts-a@champion", {})
    assert Path(source) == base and content_fingerprint(base) == adapter_base(adapters["facts-a"]["dir"]).fingerprint
    assert list(served) == ["facts-a"] and served["facts-a"][0] == "models:/facts-a@champion"
    assert lifecycle.base_name == cfg.registry.base_model_name
    assert lifecycle._resolve("models:/facts-a@champion", {})[2] == served  # the champion watch resolves it again


def test_an_unknown_model_name_is_a_404_that_lists_what_is_served(endpoint: str) -> None:
    from openai import NotFoundError

    with pytest.raises(NotFoundError, match="'facts-c' does not exist: this server serves 'crlft-base', 'facts-a'"):
        _client(endpoint).chat.completions.create(model="facts-c", messages=[{"role": "user", "content": "Hi"}])


def test_promoting_a_new_version_of_one_adapter_swaps_it_alone_with_no_failed_request(
    endpoint: str, adapters: dict[str, dict[str, Any]], cfg: Config
) -> None:
    """facts-a's new champion is facts-b's fine-tune registered as facts-a version 2: facts-a then knows b's facts,
    while requests to both adapters keep being answered throughout."""
    from mlflow import MlflowClient

    from crlft.lineage.registration import register_model

    client = _client(endpoint)
    b = adapters["facts-b"]["questions"]
    before = [_answer(client, "facts-b", q["prompt"]) for q in b]
    version = register_model(adapters["facts-b"]["dir"], cfg, name="facts-a", tracking_uri=cfg.registry.tracking_uri)
    with _Load(client, ADAPTERS, b[0]["prompt"]) as load:
        MlflowClient(cfg.registry.tracking_uri).set_registered_model_alias("facts-a", "champion", version)
        _wait_until(lambda: _accuracy(client, "facts-a", b) >= 0.5, 60, "facts-a still answers as its first version")
    assert not load.failures and load.answered > 0
    card = client.models.retrieve("facts-a")
    assert card.model_extra["source"] == "models:/facts-a@champion"
    assert [_answer(client, "facts-b", q["prompt"]) for q in b] == before  # the other adapter is as it was


def _at_rank(adapter: Path, rank: int, out: Path) -> Path:
    """The same adapter at a higher rank: A's new rows and B's new columns are zeros, and alpha grows with r so that
    LoRA's scale (alpha / r) and so every product are unchanged."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    grow = rank - config["r"]
    weights = {key: torch.cat([w, w.new_zeros(grow, w.shape[1])]) if "lora_A" in key
               else torch.cat([w, w.new_zeros(w.shape[0], grow)], dim=1) if "lora_B" in key else w
               for key, w in load_file(out / "adapter_model.safetensors").items()}  # fmt: skip
    save_file(weights, out / "adapter_model.safetensors")
    config |= {"r": rank, "lora_alpha": config["lora_alpha"] * rank // config["r"]}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_an_adapter_of_a_higher_rank_than_the_engines_slots_reopens_the_engine_with_no_failed_request(
    endpoint: str, adapters: dict[str, dict[str, Any]], cfg: Config, tmp_path: Path
) -> None:
    """The replica sized its adapter slots to the rank-8 adapters it started with. facts-b's new champion is its own
    fine-tune at rank 16 (the same products): the replica opens an engine with rank-16 slots, requests keep being
    answered, and facts-b answers as before."""
    from mlflow import MlflowClient

    from crlft.lineage.registration import register_model

    client = _client(endpoint)
    b = adapters["facts-b"]["questions"]
    before = [_answer(client, "facts-b", q["prompt"]) for q in b]
    wider = _at_rank(adapters["facts-b"]["dir"], 16, tmp_path / "facts-b-r16")
    version = register_model(wider, cfg, name="facts-b", tracking_uri=cfg.registry.tracking_uri)
    failures: list[BaseException] = []
    first = client.models.retrieve("facts-b").model_extra["revision"]
    MlflowClient(cfg.registry.tracking_uri).set_registered_model_alias("facts-b", "champion", version)
    started = time.monotonic()
    while client.models.retrieve("facts-b").model_extra["revision"] == first:
        assert time.monotonic() - started < 120, "facts-b is still served as its first version"
        try:
            _answer(client, "facts-b", b[0]["prompt"])
        except Exception as exc:  # noqa: BLE001 - every failure is the test's finding
            failures.append(exc)
        time.sleep(0.5)
    assert not failures
    assert [_answer(client, "facts-b", q["prompt"]) for q in b] == before


@pytest.fixture(scope="module")
def listed_answers(endpoint: str, adapters: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Each adapter's answers to both fine-tunes' questions, from the endpoint that lists them by name."""
    client = _client(endpoint)
    return {name: [_answer(client, name, q) for q in _questions(adapters)] for name in ADAPTERS}


def _questions(adapters: dict[str, dict[str, Any]]) -> list[str]:
    return [q["prompt"] for adapter in adapters.values() for q in adapter["questions"]]


@pytest.fixture(scope="module")
def every_champion_endpoint(endpoint: str, listed_answers: dict[str, list[str]], cfg: Config) -> str:
    """The same application redeployed (once listed_answers are in) with serve.adapters ['*'] alone and no model:
    inference.max_loras 2, fewer than the names served once a third joins; the registry checked every 2 s."""
    from services.local import deploy

    served = overridden(cfg, {"serve.adapters": ["*"], "inference.max_loras": 2})
    return deploy(None, served, watch_s=2.0, tracking_uri=cfg.registry.tracking_uri)


def test_star_alone_serves_the_base_the_champions_are_on_and_each_champion_as_listing_it_did(
    every_champion_endpoint: str, listed_answers: dict[str, list[str]], adapters: dict[str, dict[str, Any]],
    cfg: Config
) -> None:
    """No list and no model: the replica's engine holds the crlft base's registered version, pinned when deploying, and
    every registered name whose champion is an adapter on it answers as it did when listed."""
    client = _client(every_champion_endpoint)
    base = cfg.registry.base_model_name
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {base, *ADAPTERS}
    assert models[base].model_extra["source"] == f"models:/{base}/{_base_version(cfg).version}"
    assert {models[name].model_extra["adapter_of"] for name in ADAPTERS} == {base}
    assert {name: [_answer(client, name, q) for q in _questions(adapters)] for name in ADAPTERS} == listed_answers


def test_a_name_promoted_onto_the_base_joins_and_one_whose_champion_leaves_it_goes_with_no_failed_request(
    every_champion_endpoint: str, adapters: dict[str, dict[str, Any]], cfg: Config
) -> None:
    """facts-c (facts-a's first fine-tune registered under a new name) appears at /v1/models once it has a champion
    and answers facts-a's facts, beside the other two (three adapters, inference.max_loras 2); when its champion moves
    to a whole model (the base's own files), it goes, and naming it is a 404. Both others answer throughout."""
    from mlflow import MlflowClient
    from openai import NotFoundError

    from crlft.lineage.registration import register_model

    client = _client(every_champion_endpoint)
    registry = MlflowClient(cfg.registry.tracking_uri)
    a = adapters["facts-a"]["questions"]
    with _Load(client, ADAPTERS, a[0]["prompt"]) as load:
        version = register_model(adapters["facts-a"]["dir"], cfg, name="facts-c",
                                 tracking_uri=cfg.registry.tracking_uri)
        registry.set_registered_model_alias("facts-c", "champion", version)
        _wait_until(lambda: "facts-c" in _served(client), 60, "facts-c did not join /v1/models")
        assert _accuracy(client, "facts-c", a) >= 0.5
        base = _base_version(cfg)
        whole = registry.create_model_version("facts-c", base.source, run_id=base.run_id)
        registry.set_registered_model_alias("facts-c", "champion", whole.version)
        _wait_until(lambda: "facts-c" not in _served(client), 60, "facts-c is still served off the base")
    assert not load.failures and load.answered > 0
    assert _served(client) == {cfg.registry.base_model_name, *ADAPTERS}
    with pytest.raises(NotFoundError, match="'facts-c' does not exist"):
        _answer(client, "facts-c", a[0]["prompt"])


def test_star_beside_a_model_adds_every_other_champion_on_its_base_whether_the_model_is_the_base_or_an_adapter(
    adapters: dict[str, dict[str, Any]], cfg: Config
) -> None:
    """The base's folder: both champions. facts-a's champion served as the model, under its name or another: it is
    served once, and `*` adds facts-b."""
    from crlft.export import adapter_base
    from crlft.inference.engine import EngineSettings
    from services.lifecycle import ModelLifecycle

    def served(model: str, name: str) -> list[str]:
        lifecycle = ModelLifecycle(cfg, name, cfg.registry.tracking_uri, EngineSettings.for_replica(cfg, "cpu"))
        return list(lifecycle._resolve(model, {}, every_champion=True)[2])

    base = adapter_base(adapters["facts-a"]["dir"]).folder(cfg.state_dir)
    assert served(str(base), "crlft-base") == ["facts-a", "facts-b"]
    assert served("models:/facts-a@champion", "facts-a") == ["facts-a", "facts-b"]
    assert served("models:/facts-a@champion", "chat") == ["chat", "facts-b"]


def test_star_alone_with_no_champion_that_is_an_adapter_is_refused_saying_to_give_the_base(tmp_path: Path) -> None:
    from crlft.errors import CrlftError
    from services.chat import chat_application

    cfg = load_config(None, {"state_dir": str(tmp_path), "registry.tracking_uri": f"sqlite:///{tmp_path / 'm.db'}",
                             "serve.adapters": ["*"], "inference.engine": "vllm"})  # fmt: skip
    with pytest.raises(CrlftError, match=r"serve.adapters '\*' alone: no registered name's champion is an adapter, so "
                       r"there is no base to serve; give the base with --model models:/crlft-base/N"):
        chat_application(None, cfg)


def test_star_alone_with_champions_on_two_bases_is_refused_naming_each_base_and_its_names(tmp_path: Path) -> None:
    """Two crlft bases registered (two fingerprints), facts-a's champion an adapter on the first, facts-b's on the
    second: a replica holds one base, so '*' alone cannot choose."""
    from mlflow import MlflowClient

    from crlft.errors import CrlftError
    from crlft.lineage.tags import ADAPTER_OF_TAG, BASE_FINGERPRINT_TAG
    from services.chat import chat_application

    cfg = load_config(None, {"state_dir": str(tmp_path), "registry.tracking_uri": f"sqlite:///{tmp_path / 'm.db'}",
                             "serve.adapters": ["*"], "inference.engine": "vllm"})  # fmt: skip
    registry, base = MlflowClient(cfg.registry.tracking_uri), cfg.registry.base_model_name
    registry.create_registered_model(base)
    for name, fingerprint in (("facts-a", "first"), ("facts-b", "second")):
        version = registry.create_model_version(base, str(tmp_path), tags={BASE_FINGERPRINT_TAG: fingerprint}).version
        registry.create_registered_model(name)
        tags = {ADAPTER_OF_TAG: f"models:/{base}/{version}", BASE_FINGERPRINT_TAG: fingerprint}
        registry.set_registered_model_alias(name, "champion", registry.create_model_version(name, str(tmp_path),
                                                                                            tags=tags).version)
    with pytest.raises(CrlftError, match=rf"serve.adapters '\*' alone: the champions are on 2 crlft bases "
                       rf"\(models:/{base}/1: facts-a; models:/{base}/2: facts-b\); give the base with --model"):
        chat_application(None, cfg)


def test_star_lists_no_adapter_itself_and_is_watched_as_names_join_and_leave() -> None:
    from services.served_model import CHAMPION_WATCH_S, adapter_sources, default_watch_s

    assert adapter_sources(["*", "facts-a"], load_config(None, {})) == {"facts-a": "models:/facts-a@champion"}
    assert default_watch_s("models:/facts-b/3", every_champion=True) == CHAMPION_WATCH_S


def test_crlfts_own_engine_is_refused_for_adapters_before_anything_starts(tmp_path: Path) -> None:
    from crlft.errors import CrlftError
    from services.chat import chat_application

    cfg = load_config(None, {"state_dir": str(tmp_path), "serve.adapters": ["facts-a"],
                             "inference.engine": "transformers"})  # fmt: skip
    with pytest.raises(CrlftError, match="serving adapters needs vLLM, .*: set inference.engine=vllm"):
        chat_application(None, cfg)
    with pytest.raises(CrlftError, match="nothing to serve: give a model, or adapters"):
        chat_application(None, overridden(cfg, {"serve.adapters": []}))


def test_adapters_are_served_under_their_registered_or_folder_names_and_champions_are_followed(tmp_path: Path) -> None:
    from services.served_model import CHAMPION_WATCH_S, adapter_sources, default_watch_s

    folder = tmp_path / "support-de"
    folder.mkdir()
    sources = adapter_sources(["facts-a", "models:/facts-b/3", str(folder)], load_config(None, {}))
    assert sources == {"facts-a": "models:/facts-a@champion", "facts-b": "models:/facts-b/3", "support-de": str(folder)}
    assert default_watch_s(None, *sources.values()) == CHAMPION_WATCH_S  # facts-a's champion may move
    assert default_watch_s(str(folder), "models:/facts-b/3") == 0.0


def test_adapter_slots_are_the_smallest_of_vllms_ranks_that_hold_every_adapter_and_the_configured_one() -> None:
    from crlft.errors import CrlftError
    from crlft.inference.engine import slot_rank

    assert slot_rank(None, [8, 8]) == 8  # train.lora.r's default: no slot wasted
    assert slot_rank(None, [8, 12]) == 16
    assert slot_rank(32, [8]) == 32  # inference.max_lora_rank set: room for adapters promoted later
    with pytest.raises(CrlftError, match="an adapter of rank 600: vLLM serves adapters of rank 512 at most"):
        slot_rank(None, [600])
