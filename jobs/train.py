"""`crlft train` / `python -m jobs.train`: C-RLFT on Ray Train, with checkpoints, resume, fault tolerance and MLflow.

    DATA/train/*.parquet (packed bins, jobs.build_dataset) --Ray Data, split per worker--> TorchTrainer workers
      each step: grad_accum bins per worker, loss over the global weight sum (crlft.train.step.train_step)
      rank 0: per-step metrics to MLflow from a background thread (held while the server is away, and carried in
              every checkpoint until sent); every checkpoint_every steps and at the end: ray.train.report(checkpoint)
    driver: final checkpoint -> exported model in --out (crlft.export) -> held metrics and the export logged to the
            MLflow run -> registered as a new version of registry.model_name (lineage tags; `crlft eval` records
            onto it). A server that stays away past MLflow's retries: the export stays in --out and the error says
            to register it with --resume once the server answers.

This file is the command and the driver; the pieces are in jobs/training/: `data` (stats.json checked against the
config and the tokenizer), `runs` (run folders, resume), `mlflow_run` (the MLflow run, the metrics logger), `plan` (what
the driver tells every worker), `worker` (`run_worker`, the recipe every worker runs); `crlft.export.export_checkpoint`
turns the final checkpoint into the exported model.

Runs live in `train.storage_path` (default `<state_dir>/ray_results`; Ray Train's RunConfig): one folder per run.
`--resume` continues the newest run of the same --out from its latest checkpoint (Ray Train V2 restores a run's
checkpoints when a trainer is started again with the same name and storage path); a lost worker is replaced and the
run continues from its latest checkpoint on its own, up to `train.max_failures` times.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cluster.session import ray_session
from crlft.command_line import add_config_arguments, config_flag, config_from_args, stage_entrypoint
from crlft.config import Config, flatten
from crlft.environ import set_offline_defaults
from crlft.errors import CrlftError, first_line
from crlft.export import export_checkpoint
from crlft.lineage.registration import MODEL_ARTIFACT_PATH, register_model
from crlft.lineage.versions import ModelRef
from crlft.tracking import mark_failed, mlflow_patience_s, wait_reachable
from crlft.train.lr import LrChoice, choose_lr, supervised_tokens_per_step
from crlft.train.schedule import StepPlan, plan_steps
from jobs.training.data import DataDescription, check_tokenizer, describe_data
from jobs.training.mlflow_run import data_params, read_unsent, send_metrics, start_run
from jobs.training.plan import WorkerPlan
from jobs.training.runs import RunRecord, check_same_plan, find_run_to_resume, run_name, storage_root, write_run_record
from jobs.training.worker import run_worker

SHUFFLE_BUFFER_TOKENS = 2**22  # bins held per worker for the per-epoch shuffle: ~4M tokens, ~128 MB
# Up to this many packed tokens the data is read once and kept in Ray's object store (~40 bytes a token, all columns):
# otherwise every epoch starts Ray Data's read tasks again, which dominates small runs (benchmarks/RESULTS.md,
# "Ablation").
MATERIALIZE_MAX_TOKENS = 2**22

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="output of `crlft data build`")
    config_flag(parser, "model.base_model", "--base-model", metavar="DIR|HF_ID", help="model to fine-tune")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the exported model goes")
    config_flag(parser, "train.mode", "--mode")
    config_flag(parser, "train.epochs", "--epochs")
    config_flag(parser, "train.max_steps", "--max-steps")
    config_flag(parser, "train.workers", "--workers")
    config_flag(parser, "train.use_gpu", "--gpu")
    config_flag(parser, "train.lora.enabled", "--lora")
    parser.add_argument("--resume", action="store_true", help="continue the latest run of --out from its checkpoint")
    parser.add_argument("--mlflow-uri", metavar="URI", help="MLflow tracking URI (default: config, env, local SQLite)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    result = train(args.data, cfg.model.base_model, args.out, cfg, mlflow_uri=args.mlflow_uri, resume=args.resume)
    losses = ", ".join(f"{name} {value:.4f}" for name, value in result.final_loss_by_class.items())
    registered = ModelRef(cfg.registry.model_name, result.model_version).uri
    print(
        f"[train] {result.steps} steps, final loss {result.final_loss:.4f} ({losses}) -> {result.out_dir} "
        f"(MLflow run {result.mlflow_run_id}; registered as {registered})"
    )
    return 0


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path  # the exported model
    mlflow_run_id: str
    model_artifact_uri: str  # the exported folder logged in the MLflow run (the registered version's source)
    model_version: str  # the version of registry.model_name the exported model was registered as
    steps: int
    final_loss: float  # loss of the last step (C-RLFT weighted, global batch)
    final_loss_by_class: dict[str, float]  # mean CE per class over the last step's supervised tokens
    val_loss: float | None
    val_loss_by_class: dict[str, float]
    run_name: str  # Ray Train run folder under train.storage_path
    checkpoint_path: str
    # The checkpoint step the last worker group started from (after --resume or a lost worker); None when the run
    # went straight through.
    restored_from_step: int | None


# ---------------------------------------------------------------------------------------------------------------------
# The driver


def train(
    data_dir: str | Path,
    base_model: str,
    out_dir: str | Path,
    cfg: Config,
    mlflow_uri: str | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train `base_model` on the packed data in `data_dir` as `cfg` says; export the model into `out_dir`.

    Uses the running Ray session if there is one, else starts a local one for the duration.
    """
    from mlflow.tracking import MlflowClient

    from crlft.tracking import setup_mlflow

    set_offline_defaults()
    local_model = Path(base_model).expanduser()
    if local_model.exists():  # workers run in other folders (and on other nodes): give them an absolute path
        base_model = str(local_model.resolve())
    data = describe_data(data_dir, cfg)
    check_tokenizer(data, base_model, cfg)
    out = Path(out_dir).resolve()
    to_resume = find_run_to_resume(storage_root(cfg), out) if resume else None
    tracking_uri = setup_mlflow(cfg, mlflow_uri)
    client = MlflowClient(tracking_uri)
    with ray_session(cfg):
        datasets, plan = _datasets(data, cfg)
        lr = _lr(cfg, data, base_model)
        print(f"[train] learning rate {lr.lr:.3g}: {lr.reason}", flush=True)
        run = _open_run(client, cfg, data, base_model, out, plan, lr.lr, to_resume, tracking_uri)
        worker_plan = WorkerPlan(
            config=cfg.dump(),
            base_model=base_model,
            conditions=data.conditions,
            reward_scale=data.reward_scale,
            steps=plan,
            lr=lr,
            tracking_uri=tracking_uri,
            run_id=run.run_id,
            run_dir=f"{run.root}/{run.name}",
            has_val=data.has_val,
            shuffle_buffer=max(1, SHUFFLE_BUFFER_TOKENS // data.pack_len),
            replay_kl=_replay_kl(cfg, data),
        )
        result = _fit(_trainer(cfg, worker_plan, datasets, run), client, run, cfg.train.max_failures)
    return _export(result, client, run, data, base_model, out, cfg, plan)


@dataclass(frozen=True)
class _Run:
    """A training run: its Ray Train folder `root/name` and its MLflow run."""

    root: str
    name: str
    run_id: str
    tracking_uri: str
    artifact_uri: str  # the MLflow run's, known from the start: exporting needs no server


def _replay_kl(cfg: Config, data: DataDescription) -> float:
    """The weight of the replay answers' KL term (crlft.train.distill): train.replay_kl where the data has answers to
    distil and LoRA leaves a base model to ask (said, and warned where it does not), else 0 (no teacher forwards)."""
    distilled = (data.stats.replay or {}).get("distilled", 0)
    if not distilled or not cfg.train.replay_kl:
        return 0.0
    if not cfg.train.lora.enabled:
        print(f"warning: the {distilled} replay answers train by cross-entropy alone: train.replay_kl needs LoRA (the "
              "base model is the model with its adapters off); set train.lora.enabled=true, or train.replay_kl=0 to "
              "silence this", file=sys.stderr, flush=True)
        return 0.0
    print(f"[train] {distilled} replay answers held to the base model's distribution (train.replay_kl "
          f"{cfg.train.replay_kl:g})", flush=True)
    return cfg.train.replay_kl


def _open_run(client: Any, cfg: Config, data: DataDescription, base_model: str, out: Path, plan: StepPlan,
              lr: float, to_resume: tuple[str, RunRecord] | None, tracking_uri: str) -> _Run:
    """The run to resume (same plan, its MLflow run RUNNING again) or a new one, recorded in its folder."""
    root = storage_root(cfg)
    if to_resume is not None:
        name, record = to_resume
        check_same_plan(record, plan, lr, name)
        client.update_run(record.mlflow_run_id, status="RUNNING")
        artifact_uri = client.get_run(record.mlflow_run_id).info.artifact_uri
        return _Run(root, name, record.mlflow_run_id, tracking_uri, artifact_uri)
    name = run_name(out)
    params = {**flatten(cfg.dump()), **data_params(data), "train.lr_resolved": f"{lr:.6g}",
              "train.total_steps": str(plan.total_steps), "base_model": base_model}
    run_id = start_run(client, cfg.registry.experiment, name, params, data)
    write_run_record(root, name, RunRecord(str(out), data.root, base_model, run_id, asdict(plan), lr))
    return _Run(root, name, run_id, tracking_uri, client.get_run(run_id).info.artifact_uri)


def _datasets(data: DataDescription, cfg: Config) -> tuple[dict[str, Any], StepPlan]:
    """The train (and val) datasets, read once into the object store when small, and the plan of steps."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    datasets = {"train": ray.data.read_parquet(f"{data.root}/train", file_extensions=["parquet"])}
    if data.has_val:
        datasets["val"] = ray.data.read_parquet(f"{data.root}/val", file_extensions=["parquet"])
    bins = datasets["train"].count()  # from the Parquet metadata, before anything reads the rows
    plan = plan_steps(bins, cfg.train.workers, cfg.train.grad_accum, cfg.train.epochs, cfg.train.max_steps)
    # Shards arrive in a seeded random order (fixed for the run); bins are shuffled again per epoch in the workers.
    datasets["train"] = datasets["train"].randomize_block_order(seed=cfg.train.seed)
    if bins * data.pack_len <= MATERIALIZE_MAX_TOKENS:
        datasets = {split: dataset.materialize() for split, dataset in datasets.items()}
    return datasets, plan


def _lr(cfg: Config, data: DataDescription, base_model: str) -> LrChoice:
    from crlft.model import parameter_count

    tokens = supervised_tokens_per_step(data.pack_len, cfg.train.workers, cfg.train.grad_accum, data.supervised_ratio)
    return choose_lr(cfg.train, tokens, parameter_count(base_model, cfg.model.trust_remote_code))


def _trainer(cfg: Config, worker_plan: WorkerPlan, datasets: dict[str, Any], run: _Run) -> Any:
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the same bins in the same steps on every run: resume continues exactly
    resources = {"CPU": cfg.train.cpus_per_worker}
    return TorchTrainer(
        run_worker,
        train_loop_config=worker_plan.to_ray(),
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run.name,
            storage_path=run.root,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=LoggingConfig(log_level="INFO" if os.environ.get("CRLFT_DEBUG") else "WARNING"),
        ),
        datasets=datasets,
        dataset_config=DataConfig(execution_options=ingest),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
    )


def _fit(trainer: Any, client: Any, run: _Run, max_failures: int) -> Any:
    """The trainer's result with a checkpoint; a failed run is marked FAILED in MLflow and says how to resume."""
    from ray.train import TrainingFailedError

    try:
        result = trainer.fit()
    except Exception as error:
        mark_failed(client, run.tracking_uri, run.run_id)
        if isinstance(error, TrainingFailedError):
            raise CrlftError(
                f"training failed after {max_failures} retries: {failure_summary(error)}; fix the "
                f"cause and continue with --resume (run {run.name} in {run.root})"
            ) from error
        raise
    if result.checkpoint is None:
        mark_failed(client, run.tracking_uri, run.run_id)
        raise CrlftError(f"run {run.name} ended without a checkpoint; see the Ray Train logs in {run.root}/{run.name}")
    return result


def _export(result: Any, client: Any, run: _Run, data: DataDescription, base_model: str, out: Path, cfg: Config,
            plan: StepPlan) -> TrainResult:
    """The final checkpoint exported into `out`, then recorded in MLflow (`_record`)."""
    metrics, run_id = dict(result.metrics or {}), run.run_id
    artifact_uri = f"{run.artifact_uri}/{MODEL_ARTIFACT_PATH}"
    steps = int(metrics.get("step", plan.total_steps))
    with result.checkpoint.as_directory() as directory:
        export_checkpoint(directory, base_model, out, cfg, {
            "base_model": base_model, "data_fingerprint": data.fingerprint, "steps": steps,
            "mlflow_run_id": run_id, "mlflow_artifact_uri": artifact_uri,
        })
        held = read_unsent(directory)
    version = _record(client, run, out, held, cfg, data)
    return TrainResult(
        out_dir=out,
        mlflow_run_id=run_id,
        model_artifact_uri=artifact_uri,
        model_version=version,
        steps=steps,
        final_loss=float(metrics.get("loss", float("nan"))),
        final_loss_by_class=_by_class(metrics, "loss_"),
        val_loss=float(metrics["val_loss"]) if "val_loss" in metrics else None,
        val_loss_by_class=_by_class(metrics, "val_loss_"),
        run_name=run.name,
        checkpoint_path=result.checkpoint.path,
        restored_from_step=int(metrics["start_step"]) if metrics.get("start_step") else None,
    )


def _record(client: Any, run: _Run, out: Path, held: list[Any], cfg: Config, data: DataDescription) -> str:
    """The metrics the workers could not send, the exported model logged into the run and registered, the run
    FINISHED; returns the version. Each step rides out an outage of the tracking server for as long as MLflow's client
    retries a request (`mlflow_patience_s`). When it does not answer in that time, the model is not registered, the run
    does not end FINISHED, and the error says how to register the model once the server is back."""
    from mlflow.exceptions import MlflowException

    unlogged = f", and the {len(held)} metrics the workers held are not logged" if held else ""
    version = None
    try:
        send_metrics(client, run.run_id, held)
        unlogged = ""
        client.log_artifacts(run.run_id, str(out), MODEL_ARTIFACT_PATH)
        wait_reachable(run.tracking_uri, mlflow_patience_s())  # registering asks the server once, without retries
        version = register_model(out, cfg, run.run_id, tracking_uri=run.tracking_uri)
        client.set_terminated(run.run_id, "FINISHED")
    except (MlflowException, OSError, CrlftError) as error:
        cause = first_line(error)
        if version is not None:  # registered: only the run's status is missing
            print(f"[train] registered as version {version}, but the MLflow run {run.run_id} could not be marked "
                  f"FINISHED: {cause}", file=sys.stderr, flush=True)
            return version
        failed = mark_failed(client, run.tracking_uri, run.run_id)
        raise CrlftError(
            f"the model is exported to {out} but not registered{unlogged}: MLflow at {run.tracking_uri} failed: "
            f"{cause}. The MLflow run {run.run_id} is left {'FAILED' if failed else 'RUNNING, not FINISHED'}. Once "
            f"the server answers, `crlft train --data {data.root} --out {out} --resume` (same configuration) "
            f"continues run {run.name} from its final checkpoint, logs the metrics and registers the model"
        ) from None
    return version


def _by_class(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def failure_summary(error: BaseException) -> str:
    """One line per failed worker: its user-facing CrlftError message when it raised one, else the innermost cause."""
    failures = getattr(error, "worker_failures", None) or {"-": getattr(error, "controller_failure", error)}
    lines = []
    for rank, failure in sorted(failures.items(), key=lambda item: str(item[0])):
        chain = [failure]
        while chain[-1].__cause__ is not None and len(chain) < 20:
            chain.append(chain[-1].__cause__)
        user_error = next((e for e in chain if isinstance(e, CrlftError)), None)
        root = user_error or chain[-1]
        text = str(root).strip().splitlines()
        lines.append(f"rank {rank}: {text[0] if text else type(root).__name__}")
    return "; ".join(dict.fromkeys(lines))


if __name__ == "__main__":
    raise SystemExit(stage_entrypoint("jobs.train"))
