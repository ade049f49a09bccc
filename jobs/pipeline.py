"""The whole pipeline: data -> train (+ register) -> evaluate -> promote (-> deploy), each stage the function its own
command runs. Resumable: a stage whose inputs, upstream outputs and config section are unchanged since it last
finished is skipped (its record in `<state_dir>/pipeline/<name>/stages.json` says why).

Entrypoint for Ray Jobs: `python -m jobs.pipeline [INPUT...] [flags]` (= `crlft pipeline`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.session import ray_session
from crlft.command_line import add_config_arguments, config_flag, config_from_args, stage_entrypoint
from crlft.config import Config
from crlft.environ import set_offline_defaults
from crlft.errors import CrlftError
from crlft.tracking import resolve_tracking_uri

DEFAULT_NAME = "default"


@dataclass
class PipelineResult:
    root: Path
    data_dir: Path
    model_dir: Path
    base_model: str
    suite: Path | None
    heldout: Path | None
    tracking_uri: str
    stats: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    version: str | None = None
    promotion: str | None = None
    champion: bool = False
    url: str | None = None
    skipped: list[str] = field(default_factory=list)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluation_fingerprint(train_fp: str, suite: Path | None, heldout: Path | None, cfg: Config) -> str:
    """What the evaluate stage's figures depend on: the trained model, the suites, how it asks (eval), the registry
    settings it records with, and the decoder (inference.engine and inference.precision choose it, as for `crlft
    serve`)."""
    return _digest([train_fp, str(suite), str(heldout), cfg.eval.model_dump(), cfg.registry.model_dump(),
                    cfg.inference.engine, cfg.inference.precision])


def inputs_fingerprint(inputs: Sequence[str]) -> str:
    """Local files by path, size and modification time (cheap on large data); URIs by name; a completion store by its
    snapshot (its parts and their sizes: new completions or feedback change it)."""
    from crlft.data.store import snapshot
    from jobs.store_input import input_is_store

    described: list[list[Any]] = []
    for item in inputs:
        if input_is_store(item):
            described.append(["store", item, snapshot(item)])
            continue
        path = Path(item)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            stat = f.stat() if f.exists() else None
            described.append([str(f), stat.st_size if stat else None, stat.st_mtime_ns if stat else None])
    return _digest(described)


class StageLog:
    """Finished stages with their fingerprints, so that a rerun redoes only what changed."""

    def __init__(self, path: Path, force: bool = False) -> None:
        self.path = path
        self.force = force
        self.stages: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}

    def run(self, stage: str, fingerprint: str, outputs_exist: bool, work: Callable[[], dict[str, Any]],
            skipped: list[str]) -> dict[str, Any]:
        done = self.stages.get(stage)
        if not self.force and done and done["fingerprint"] == fingerprint and outputs_exist:
            print(f"[{stage}] up to date (fingerprint {fingerprint}), skipped", flush=True)
            skipped.append(stage)
            return done["result"]
        print(f"[{stage}] running ...", flush=True)
        started = time.monotonic()
        result = work()
        self.stages[stage] = {"fingerprint": fingerprint, "result": result, "seconds": time.monotonic() - started,
                              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.stages, indent=2, sort_keys=True, default=str))
        print(f"[{stage}] done in {time.monotonic() - started:.0f} s", flush=True)
        return result


def default_inputs(cfg: Config, seed: int = 0) -> tuple[list[str], Path, Path]:
    """The bundled synthetic mixed-quality suite, written under the state folder on first use."""
    from crlft.synth.suite import write_suite

    folder = Path(cfg.state_dir) / "synth"
    if not (folder / "train.jsonl").is_file():
        write_suite(folder, seed=seed)
    return [str(folder / "train.jsonl")], folder / "eval.jsonl", folder / "heldout.jsonl"


def run_pipeline(
    cfg: Config,
    inputs: Sequence[str] = (),
    *,
    suite: str | Path | None = None,
    heldout: str | Path | None = None,
    base_model: str | None = None,
    name: str = DEFAULT_NAME,
    mlflow_uri: str | None = None,
    promote: bool = True,
    deploy: bool = False,
    force: bool = False,
) -> PipelineResult:
    set_offline_defaults()
    if not inputs:
        inputs, default_suite, default_heldout = default_inputs(cfg, cfg.train.seed)
        suite = suite or default_suite
        heldout = heldout or default_heldout
    # Absolute paths: Ray workers run in other directories.
    root = Path(cfg.state_dir).resolve() / "pipeline" / name
    result = PipelineResult(root, root / "data", root / "model", _base_model(cfg, base_model),
                            Path(suite) if suite else None, Path(heldout) if heldout else None,
                            resolve_tracking_uri(cfg, mlflow_uri))  # fmt: skip
    # One Ray session for every stage that needs one, started only if one does (skipped stages need none).
    with contextlib.ExitStack() as session:
        stages = _Stages(cfg, result, StageLog(root / "stages.json", force), session)
        train_fp = stages.train(stages.data(list(inputs), stages.model(list(inputs), base_model is None)))
        stages.evaluate(train_fp)
        if promote:
            stages.promote()
        if deploy:
            stages.deploy()
    return result


def _base_model(cfg: Config, given: str | None) -> str:
    """The model to fine-tune: the one given, else the config's; the embedded default lives under the state folder."""
    if given is None and cfg.model.base_model == Config().model.base_model:
        return str(Path(cfg.state_dir).resolve() / "models" / cfg.model.preset)
    base = given or cfg.model.base_model
    return str(Path(base).resolve()) if Path(base).exists() else base


@dataclass
class _Stages:
    """The stages in order; each returns the fingerprint the next one builds on."""

    cfg: Config
    result: PipelineResult
    log: StageLog
    session: contextlib.ExitStack

    def in_ray(self, stage: Callable[[], Any]) -> Callable[[], Any]:
        def run_in_ray() -> Any:
            self.session.enter_context(ray_session(self.cfg))  # a no-op once the session is up
            return stage()

        return run_in_ray

    def model(self, inputs: list[str], default_asked: bool) -> str:
        """With no model given, the embedded default is built, its tokenizer trained on the inputs."""
        from crlft.commands.init_model import build_default_model
        from crlft.data.readers import resolve_inputs
        from jobs.store_input import split_stores

        cfg, base = self.cfg, self.result.base_model
        model_fp = _digest([base, cfg.model.model_dump()])
        if not (default_asked and cfg.model.base_model == Config().model.base_model):
            return model_fp
        model_fp = _digest([model_fp, inputs_fingerprint(inputs), cfg.template.model_dump(), cfg.train.mode.value])
        files = split_stores(inputs)[1]  # a store's answers are not a tokenizer corpus: files only
        corpus = [p for p in resolve_inputs(files) if Path(p).is_file()] if files else []  # else: the built-in one
        self.log.run("model", model_fp, (Path(base) / "config.json").is_file(),
                     lambda: {"path": str(build_default_model(base, cfg, corpus, cfg.train.seed))}, self.result.skipped)
        return model_fp

    def data(self, inputs: list[str], model_fp: str) -> str:
        """The training set; its fingerprint covers replay's prompts file too (data.replay's settings are in the
        config's): a change of either rebuilds it."""
        from crlft.data.replay import prompts_file, replay_model
        from jobs.build_dataset import build_dataset

        cfg, result = self.cfg, self.result
        data_cfg = [cfg.data.model_dump(), {k: v.model_dump() for k, v in cfg.classes.items()}, cfg.default_class,
                    cfg.inference_condition, cfg.template.model_dump(), cfg.train.mode.value]
        replay = [str(prompts_file(cfg))] if replay_model(cfg, result.base_model) else []
        stats_fp = _digest([inputs_fingerprint(inputs), model_fp, data_cfg, inputs_fingerprint(replay)])
        build = self.in_ray(lambda: build_dataset(inputs, result.base_model, result.data_dir, cfg))
        result.stats = self.log.run("data", stats_fp, (result.data_dir / "stats.json").is_file(), build, result.skipped)
        return stats_fp

    def train(self, stats_fp: str) -> str:
        """Train, export and register (`crlft train` registers the model it exports)."""
        from crlft.lineage.registration import register_model
        from jobs.train import train

        cfg, result = self.cfg, self.result

        def do_train() -> dict[str, Any]:
            trained = train(result.data_dir, result.base_model, result.model_dir, cfg, mlflow_uri=result.tracking_uri)
            return {"run_id": trained.mlflow_run_id, "version": trained.model_version, "steps": trained.steps,
                    "final_loss": trained.final_loss, "final_loss_by_class": trained.final_loss_by_class,
                    "val_loss": trained.val_loss}

        train_fp = _digest([stats_fp, cfg.train.model_dump(mode="json")])
        result.train = self.log.run("train", train_fp, (result.model_dir / "crlft.json").is_file(),
                                    self.in_ray(do_train), result.skipped)
        # A train stage recorded before training registered its model has no version yet: register it now.
        result.version = result.train.get("version") or register_model(
            result.model_dir, cfg, result.train.get("run_id"), tracking_uri=result.tracking_uri)
        return train_fp

    def evaluate(self, train_fp: str) -> None:
        """Figures recorded on the version training registered (nothing to do without a suite)."""
        from jobs.evaluate import evaluate_model

        cfg, result = self.cfg, self.result
        if result.suite is None and result.heldout is None:
            print("[evaluate] no evaluation suite given: registered, not evaluated", flush=True)
            return

        def do_evaluate() -> dict[str, Any]:
            report = evaluate_model(result.model_dir, result.suite, cfg, heldout=result.heldout,
                                    log_to_version=f"{cfg.registry.model_name}/{result.version}",
                                    tracking_uri=result.tracking_uri, out_dir=result.root / "eval")
            return {"metrics": report["metrics"], "text": report["text"], "plot": report.get("plot")}

        eval_fp = evaluation_fingerprint(train_fp, result.suite, result.heldout, cfg)
        evaluated = self.log.run("evaluate", eval_fp, (result.root / "eval").is_dir(), do_evaluate, result.skipped)
        result.metrics = evaluated["metrics"]
        print(evaluated.get("text", ""), flush=True)

    def promote(self) -> None:
        from crlft.lineage.promotion import promote

        cfg, result = self.cfg, self.result
        if cfg.registry.metric not in result.metrics:
            print(f"[promote] skipped: no {cfg.registry.metric} was measured (give --suite), so nothing to compare",
                  flush=True)
            return
        decision = promote(cfg.registry.model_name, str(result.version), cfg=cfg, tracking_uri=result.tracking_uri)
        result.promotion, result.champion = decision.summary(), decision.is_champion
        print(f"[promote] {decision.summary()}", flush=True)

    def deploy(self) -> None:
        from crlft.lineage.versions import champion_uri
        from services.local import deploy

        target = champion_uri(self.cfg) if self.result.champion else str(self.result.model_dir)
        self.result.url = deploy(target, self.cfg)
        print(f"[deploy] serving {target} at {self.result.url}", flush=True)
        self.session.pop_all()  # the endpoint outlives run_pipeline: its Ray session stays up


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="conversation files, folders, globs or URIs, or a completion store (default: the "
                        "bundled synthetic suite)")
    parser.add_argument("--data", action="append", default=[], metavar="INPUT",
                        help="an INPUT given as a flag (repeatable), e.g. --data s3://bucket/crlft-store: the "
                        "completion store `crlft serve` writes (serve.store.uri); the data stage reruns when it "
                        "gained completions or feedback")
    parser.add_argument("--suite", metavar="FILE", help="verifiable suite to evaluate on (default with no INPUT: "
                        "the synthetic eval.jsonl)")
    parser.add_argument("--heldout", metavar="FILE", help="held-out conversations for the representation check")
    parser.add_argument("--base-model", metavar="DIR|HF_ID", help="default: model.base_model (built if missing)")
    parser.add_argument("--name", default=DEFAULT_NAME, help="pipeline run name (its state folder)")
    config_flag(parser, "train.mode", "--mode")
    config_flag(parser, "train.epochs", "--epochs")
    config_flag(parser, "train.max_steps", "--max-steps")
    config_flag(parser, "train.workers", "--workers")
    config_flag(parser, "train.use_gpu", "--gpu")
    config_flag(parser, "state_dir", "--state-dir", metavar="DIR")
    parser.add_argument("--mlflow-uri", metavar="URI", help="MLflow tracking URI (default: config, env, local SQLite)")
    parser.add_argument("--no-promote", action="store_true", help="register and evaluate, but leave the champion")
    parser.add_argument("--deploy", action="store_true", help="serve the champion at the end (Ray Serve)")
    parser.add_argument("--force", action="store_true", help="redo every stage even when up to date")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.suite and not Path(args.suite).is_file():
        raise CrlftError(f"suite {args.suite} does not exist")
    result = run_pipeline(cfg, [*args.inputs, *args.data], suite=args.suite, heldout=args.heldout,
                          base_model=args.base_model, name=args.name, mlflow_uri=args.mlflow_uri,
                          promote=not args.no_promote, deploy=args.deploy, force=args.force)
    print(f"model: {result.model_dir}  version: {result.version}  champion: {result.champion}")
    print(f"MLflow: {result.tracking_uri}  (UI: mlflow ui --backend-store-uri {result.tracking_uri})")
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_entrypoint("jobs.pipeline"))
