"""`crlft train` / `python -m jobs.train`: C-RLFT on Ray Train, with checkpoints, resume, fault tolerance and MLflow.

    DATA/train/*.parquet (packed bins, jobs.build_dataset) --Ray Data, split per worker--> TorchTrainer workers
      each step: grad_accum bins per worker, loss over the global weight sum (crlft.train_loop.train_step)
      rank 0: per-step metrics to MLflow; every checkpoint_every steps and at the end: ray.train.report(checkpoint)
    driver: final checkpoint -> exported model in --out (crlft.export) -> logged to the MLflow run as artifacts

Runs live in `train.storage_path` (default `<state_dir>/ray_results`; Ray Train's RunConfig): one folder per run,
named after --out and the start time, with `crlft_run.json` saying which --out, data and MLflow run it belongs to.
`--resume` continues the newest run of the same --out from its latest checkpoint (Ray Train V2 restores a run's
checkpoints when a trainer is started again with the same name and storage path); a lost worker is replaced and the
run continues from its latest checkpoint on its own, up to `train.max_failures` times.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from crlft.cli import add_config_arguments, config_from_args, stage_entrypoint
from crlft.config import Config, Mode
from crlft.errors import CrlftError
from crlft.tracking import set_offline_defaults
from crlft.train_loop import (
    StepPlan,
    TrainingPosition,
    applied_rewards,
    auto_lr,
    plan_steps,
    reward_scale,
    supervised_tokens_per_step,
)
from jobs.session import ray_session

RUN_FILE = "crlft_run.json"
MODEL_ARTIFACT_PATH = "model"
SHUFFLE_BUFFER_TOKENS = 2**22  # bins held per worker for the per-epoch shuffle: ~4M tokens, ~128 MB
# Up to this many packed tokens the data is read once and kept in Ray's object store (~40 bytes a token, all columns):
# otherwise every epoch starts Ray Data's read tasks again, 2-3 s an epoch, which dominated small runs.
MATERIALIZE_MAX_TOKENS = 2**22
METRICS_FLUSH_S = 5.0

_FLAGS = {
    "base_model": "model.base_model",
    "mode": "train.mode",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "workers": "train.workers",
    "gpu": "train.use_gpu",
    "lora": "train.lora.enabled",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="output of `crlft data build`")
    parser.add_argument("--base-model", metavar="DIR|HF_ID", help="model to fine-tune (default: model.base_model)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the exported model goes")
    parser.add_argument("--mode", choices=[m.value for m in Mode], help="crlft | conditioned | weighted | sft")
    parser.add_argument("--epochs", type=int, metavar="N")
    parser.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimiser steps")
    parser.add_argument("--workers", type=int, metavar="N", help="Ray Train workers (one GPU each with --gpu)")
    parser.add_argument("--gpu", action="store_true", default=None, help="GPU workers (nccl, bf16)")
    parser.add_argument("--lora", action="store_true", default=None, help="train LoRA adapters (train.lora.*)")
    parser.add_argument("--resume", action="store_true", help="continue the latest run of --out from its checkpoint")
    parser.add_argument("--mlflow-uri", metavar="URI", help="MLflow tracking URI (default: config, env, local SQLite)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, _FLAGS)
    result = train(args.data, cfg.model.base_model, args.out, cfg, mlflow_uri=args.mlflow_uri, resume=args.resume)
    losses = ", ".join(f"{name} {value:.4f}" for name, value in result.final_loss_by_class.items())
    print(
        f"[train] {result.steps} steps, final loss {result.final_loss:.4f} ({losses}) -> {result.out_dir} "
        f"(MLflow run {result.mlflow_run_id})"
    )
    return 0


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path  # the exported model
    mlflow_run_id: str
    model_artifact_uri: str  # the exported folder logged in the MLflow run (register versions from it)
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
# The data description (stats.json) and its agreement with the config


@dataclass(frozen=True)
class DataDescription:
    root: str
    stats: dict[str, Any]
    conditions: list[str]
    reward_scale: dict[str, float]
    pack_len: int
    supervised_ratio: float
    fingerprint: str
    has_val: bool


def _is_uri(path: str) -> bool:
    return "://" in path


def _read_text(path: str) -> str | None:
    if not _is_uri(path):
        return Path(path).read_text() if Path(path).is_file() else None
    from pyarrow import fs

    filesystem, inner = fs.FileSystem.from_uri(path)
    if filesystem.get_file_info(inner).type == fs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(inner) as stream:
        return stream.read().decode()


def _has_parquet(directory: str) -> bool:
    if not _is_uri(directory):
        return any(Path(directory).glob("*.parquet"))
    from pyarrow import fs

    filesystem, inner = fs.FileSystem.from_uri(directory)
    selector = fs.FileSelector(inner, allow_not_found=True, recursive=True)
    return any(info.path.endswith(".parquet") for info in filesystem.get_file_info(selector))


def describe_data(data_dir: str | Path, cfg: Config) -> DataDescription:
    """Read DATA/stats.json and check that the data can train `cfg.train.mode`; errors say what to rebuild."""
    root = str(data_dir).rstrip("/") if _is_uri(str(data_dir)) else str(Path(data_dir).resolve())
    stats_path = f"{root}/stats.json"
    text = _read_text(stats_path)
    if text is None:
        raise CrlftError(f"{stats_path} does not exist: build the data first (`crlft data build --out {root}`)")
    try:
        stats = json.loads(text)
        data_mode = Mode(stats["mode"])
        conditions = [str(c) for c in stats["conditions"]]
        rewards = {str(k): float(v) for k, v in stats["rewards"].items()}
        pack_len = int(stats["pack_len"])
        per_class = stats["per_class"]
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as error:
        raise CrlftError(f"{stats_path}: not a crlft data description ({error!r}); rebuild the data") from None
    mode = cfg.train.mode
    if data_mode.uses_condition != mode.uses_condition:
        def has(m: Mode) -> str:
            return "with" if m.uses_condition else "without"

        raise CrlftError(
            f"{stats_path}: the data was built for mode {data_mode.value} ({has(data_mode)} the condition in the "
            f"prompt) but training mode {mode.value} trains {has(mode)} it: rebuild the data with --mode {mode.value}"
        )
    unknown = sorted(set(conditions) - set(cfg.classes))
    if unknown:
        raise CrlftError(f"{stats_path}: classes {unknown} are not in the configuration (classes: {list(cfg.classes)})")
    train_rewards = {name: cfg.reward(name) for name in cfg.classes}
    scale = reward_scale(applied_rewards(data_mode.uses_reward, {c: rewards.get(c, 1.0) for c in conditions}),
                         train_rewards)
    tokens = sum(int(c.get("tokens", 0)) for c in per_class.values())
    supervised = sum(int(c.get("supervised_tokens", 0)) for c in per_class.values())
    if not _has_parquet(f"{root}/train"):
        raise CrlftError(f"{root}/train holds no .parquet shards: rebuild the data (`crlft data build`)")
    fingerprints = stats.get("fingerprints", {})
    fingerprint = hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()[:16]
    return DataDescription(
        root=root,
        stats=stats,
        conditions=conditions,
        reward_scale=scale,
        pack_len=pack_len,
        supervised_ratio=supervised / tokens if tokens else 0.0,
        fingerprint=fingerprint,
        has_val=_has_parquet(f"{root}/val"),
    )


def check_tokenizer(data: DataDescription, base_model: str, cfg: Config) -> None:
    """The base model's tokenizer + template must be the ones the data was tokenized with (same ids, same prompt)."""
    from crlft.model import load_tokenizer
    from crlft.template import Template, TemplateTokenizer

    expected = data.stats.get("fingerprints", {}).get("tokenizer_template")
    if not expected:
        return
    tokenizer = load_tokenizer(base_model, cfg.template.end_of_turn, cfg.model.trust_remote_code)
    actual = TemplateTokenizer(Template.from_config(cfg), tokenizer).fingerprint()
    if actual != expected:
        raise CrlftError(
            f"{data.root}/stats.json: the data was tokenized with tokenizer {data.stats.get('tokenizer')!r} and its "
            f"template (fingerprint {expected}), but {base_model} with this config's template gives {actual}: "
            "rebuild the data with this model's tokenizer, or train the model the data was built for"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Runs in storage: naming, finding the one to resume


@dataclass(frozen=True)
class RunRecord:
    """crlft_run.json in a Ray Train run folder."""

    out: str
    data: str
    base_model: str
    mlflow_run_id: str
    plan: dict[str, int]
    lr: float
    created: float = field(default_factory=time.time)


def _storage_root(cfg: Config) -> str:
    path = cfg.train.storage_path or str(Path(cfg.state_dir) / "ray_results")
    return path if _is_uri(path) else str(Path(path).resolve())


def _run_name(out: Path) -> str:
    slug = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in out.name)[:40] or "model"
    return f"crlft-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000:04d}"


def _write_run_record(storage: str, name: str, record: RunRecord) -> None:
    if _is_uri(storage):
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(f"{storage}/{name}")
        filesystem.create_dir(inner, recursive=True)
        with filesystem.open_output_stream(f"{inner}/{RUN_FILE}") as stream:
            stream.write(json.dumps(asdict(record), indent=2).encode())
        return
    folder = Path(storage) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_FILE).write_text(json.dumps(asdict(record), indent=2))


def find_run_to_resume(storage: str, out: Path) -> tuple[str, RunRecord]:
    """The newest run folder in `storage` whose record names `out`."""
    if _is_uri(storage):
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(storage)
        folders = [info.base_name for info in filesystem.get_file_info(fs.FileSelector(inner, allow_not_found=True))
                   if info.type == fs.FileType.Directory]
    else:
        folders = [p.name for p in Path(storage).iterdir() if p.is_dir()] if Path(storage).is_dir() else []
    candidates = []
    for name in folders:
        text = _read_text(f"{storage}/{name}/{RUN_FILE}")
        if text is None:
            continue
        record = RunRecord(**json.loads(text))
        if record.out == str(out):
            candidates.append((record.created, name, record))
    if not candidates:
        raise CrlftError(f"nothing to resume: no run for --out {out} in {storage}; start one without --resume")
    _, name, record = max(candidates)
    return name, record


# ---------------------------------------------------------------------------------------------------------------------
# MLflow from the driver: the run, its parameters, the exported model


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if not isinstance(value, str) else value
    return flat


def _data_params(data: DataDescription) -> dict[str, str]:
    keep = ("records_in", "accepted", "rejected", "filtered", "bins", "packing_efficiency", "pack_len", "max_len",
            "mode", "tokenizer")
    params = {f"data.{key}": str(data.stats[key]) for key in keep if key in data.stats}
    for name, counts in data.stats.get("per_class", {}).items():
        for key, value in counts.items():
            params[f"data.per_class.{name}.{key}"] = str(value)
    params["data.path"] = data.root
    params["data.fingerprint"] = data.fingerprint
    return params


def _start_mlflow_run(client: Any, experiment: str, run_name: str, params: Mapping[str, str],
                      data: DataDescription) -> str:
    from mlflow.entities import Param

    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    tags = {"crlft.stage": "train", "crlft.data_fingerprint": data.fingerprint}
    tags.update({f"crlft.data.{k}": str(v) for k, v in data.stats.get("fingerprints", {}).items()})
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    items = [Param(key[:250], value[:6000]) for key, value in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])
    client.log_dict(run_id, data.stats, "data/stats.json")
    return run_id


class MetricsLogger:
    """Rank 0's metrics, sent to MLflow in batches (a write per step would slow small steps down)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, flush_every_s: float = METRICS_FLUSH_S) -> None:
        self._client = None
        if tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri)
        self._run_id = run_id
        self._pending: list[Any] = []
        self._flush_every_s = flush_every_s
        self._last_flush = time.monotonic()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
        if time.monotonic() - self._last_flush >= self._flush_every_s:
            self.flush()

    def flush(self) -> None:
        if self._client is None or not self._pending:
            return
        for start in range(0, len(self._pending), 1000):
            self._client.log_batch(self._run_id, metrics=self._pending[start : start + 1000])
        self._pending = []
        self._last_flush = time.monotonic()


# ---------------------------------------------------------------------------------------------------------------------
# The worker loop (runs in every Ray Train worker)


def _threads(cpus_per_worker: float) -> int:
    return max(1, math.floor(cpus_per_worker))


def _class_metrics(prefix: str, sums: Any, conditions: list[str]) -> dict[str, float]:
    from crlft.loss import mean_ce_by_class

    return {f"{prefix}_{name}": value for name, value in mean_ce_by_class(sums, conditions).items()}


def _attn_implementation(model: Any, use_gpu: bool) -> str:
    """Varlen flash attention on GPU when installed (packed rows need no mask there); else the model's own."""
    if use_gpu:
        try:
            import flash_attn  # noqa: F401

            model.set_attn_implementation("flash_attention_2")
        except (ImportError, ValueError):
            pass
    return model.config._attn_implementation


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from crlft import train_loop as tl
    from crlft.model import load_model_and_tokenizer

    set_offline_defaults()
    cfg = Config.model_validate(loop["config"])
    train_cfg = cfg.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(_threads(train_cfg.cpus_per_worker))
    device = ray.train.torch.get_device()
    plan = StepPlan(**loop["plan"])
    conditions: list[str] = loop["conditions"]

    tl.seed_everything(train_cfg.seed)  # identical initialisation (LoRA adapters) on every rank
    model, tokenizer = load_model_and_tokenizer(loop["base_model"], cfg.template.end_of_turn,
                                                cfg.model.trust_remote_code)
    attn = _attn_implementation(model, train_cfg.use_gpu)
    if train_cfg.gradient_checkpointing:
        tl.enable_gradient_checkpointing(model)
    if train_cfg.lora.enabled:
        model = tl.wrap_lora(model, train_cfg.lora)
    bf16 = torch.bfloat16 if train_cfg.use_gpu else None
    if train_cfg.strategy == "fsdp":
        model = tl.shard_fsdp(model.to(device), param_dtype=bf16)
        autocast = None  # FSDP's mixed-precision policy casts the parameters itself
    else:
        model = ray.train.torch.prepare_model(model)
        autocast = bf16
    optimizer = tl.build_optimizer(model, train_cfg, loop["lr"])
    scheduler = tl.build_scheduler(optimizer, plan.total_steps, train_cfg)

    position = TrainingPosition()
    summary: dict[str, float] = {"step": 0.0, "epoch": 0.0}  # the latest step's metrics, kept in every checkpoint
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            loaded = tl.load_training_state(directory, model, optimizer, scheduler)
        position = loaded.position
        summary = loaded.extra.get("summary") or {"step": float(position.global_step), "epoch": float(position.epoch)}
        if len(loaded.rng_states) == world_size:
            tl.restore_rng_state(loaded.rng_states[rank])
    else:
        tl.seed_everything(train_cfg.seed + rank)

    metrics = MetricsLogger(loop["tracking_uri"], loop["run_id"]) if rank == 0 else MetricsLogger(None, None)
    scale: dict[str, float] = loop["reward_scale"]
    pad_id = tokenizer.pad_token_id

    def batches(shard: Any, shuffle_seed: int | None, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        rows = shard.iter_batches(
            batch_size=1,
            batch_format="numpy",
            local_shuffle_buffer_size=loop["shuffle_buffer"] if shuffle_seed is not None else None,
            local_shuffle_seed=shuffle_seed,
        )
        for index, record in enumerate(rows):
            if index < skip:
                continue
            row = tl.rescale_row(tl.as_packed_row({k: v[0] for k, v in record.items()}), scale)
            yield tl.collate_micro_batch(row, pad_id, conditions, attn, device)

    def report(summary: dict[str, float]) -> None:
        """Checkpoint with `summary` as the metrics (every rank calls it: the state dicts are gathered)."""
        metrics.flush()
        with tempfile.TemporaryDirectory() as directory:
            tl.save_training_state(directory, model, optimizer, scheduler, position, {"summary": summary})
            saved = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
            ray.train.report(summary, checkpoint=saved)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if loop["has_val"] else None
    start_step = float(position.global_step)  # reported: shows whether this worker group restored a checkpoint
    stopwatch = tl.Stopwatch()
    for epoch in range(position.epoch, plan.epochs):
        if position.global_step >= plan.total_steps:
            break
        skip = position.step_in_epoch * train_cfg.grad_accum if epoch == position.epoch else 0
        micro_batches = batches(train_shard, train_cfg.seed + epoch, skip)
        position = TrainingPosition(position.global_step, epoch, position.step_in_epoch if skip else 0)
        stopwatch.lap()
        for group in tl.chunked(micro_batches, train_cfg.grad_accum):
            stats = tl.train_step(
                model, group, optimizer, scheduler,
                n_classes=len(conditions), grad_clip=train_cfg.grad_clip, world_size=world_size,
                attn_implementation=attn, autocast_dtype=autocast,
            )  # fmt: skip
            seconds, cpu_seconds = stopwatch.lap()
            position = TrainingPosition(position.global_step + 1, epoch, position.step_in_epoch + 1)
            summary = {
                "step": float(position.global_step),
                "epoch": float(epoch),
                "loss": stats.loss,
                "lr": stats.lr,
                "grad_norm": stats.grad_norm,
                "supervised_tokens": float(stats.supervised_tokens),
                "supervised_tokens_per_s": stats.supervised_tokens / seconds,
                "tokens_per_s": stats.tokens / seconds,
                "step_s": seconds,
                "step_cpu_s": cpu_seconds,  # well below step_s: the worker waits (data, other ranks, a busy host)
                **_class_metrics("loss", stats.class_sums, conditions),
            }
            metrics.log(summary, position.global_step)
            if position.global_step >= plan.total_steps:
                break
            if train_cfg.checkpoint_every and position.global_step % train_cfg.checkpoint_every == 0:
                report(summary)
                stopwatch.lap()
        epoch_done = position.step_in_epoch >= plan.steps_per_epoch
        if val_shard is not None:
            val = tl.evaluate(model, batches(val_shard, None), n_classes=len(conditions), device=device,
                              attn_implementation=attn, autocast_dtype=autocast)
            val_metrics = {"val_loss": val.loss, **_class_metrics("val_loss", val.class_sums, conditions)}
            metrics.log(val_metrics, position.global_step)
            summary.update(val_metrics)
            stopwatch.lap()
        if epoch_done:
            position = TrainingPosition(position.global_step, epoch + 1, 0)
    summary = {**summary, "start_step": start_step, "final": 1.0}
    report(summary)


# ---------------------------------------------------------------------------------------------------------------------
# The driver


def _datasets(data: DataDescription) -> dict[str, Any]:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    datasets = {"train": ray.data.read_parquet(f"{data.root}/train", file_extensions=["parquet"])}
    if data.has_val:
        datasets["val"] = ray.data.read_parquet(f"{data.root}/val", file_extensions=["parquet"])
    return datasets


def _lr(cfg: Config, data: DataDescription) -> float:
    if cfg.train.lr is not None:
        return cfg.train.lr
    return auto_lr(supervised_tokens_per_step(data.pack_len, cfg.train.workers, cfg.train.grad_accum,
                                              data.supervised_ratio))


def _check_same_plan(record: RunRecord, plan: StepPlan, lr: float, name: str) -> None:
    if record.plan != asdict(plan) or not math.isclose(record.lr, lr):
        raise CrlftError(
            f"cannot resume run {name}: it planned {record.plan} at lr {record.lr:g}, this configuration plans "
            f"{asdict(plan)} at lr {lr:g}; resume with the same data, epochs, max_steps, workers, grad_accum and lr"
        )


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
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from crlft.tracking import setup_mlflow

    set_offline_defaults()
    local_model = Path(base_model).expanduser()
    if local_model.exists():  # workers run in other folders (and on other nodes): give them an absolute path
        base_model = str(local_model.resolve())
    data = describe_data(data_dir, cfg)
    check_tokenizer(data, base_model, cfg)
    out = Path(out_dir).resolve()
    storage = _storage_root(cfg)
    to_resume = find_run_to_resume(storage, out) if resume else None
    tracking_uri = setup_mlflow(cfg, mlflow_uri)
    client = MlflowClient(tracking_uri)
    with ray_session(cfg):
        datasets = _datasets(data)
        bins = datasets["train"].count()  # from the Parquet metadata, before anything reads the rows
        plan = plan_steps(bins, cfg.train.workers, cfg.train.grad_accum, cfg.train.epochs, cfg.train.max_steps)
        # Shards arrive in a seeded random order (fixed for the run); bins are shuffled again per epoch in the workers.
        datasets["train"] = datasets["train"].randomize_block_order(seed=cfg.train.seed)
        if bins * data.pack_len <= MATERIALIZE_MAX_TOKENS:
            datasets = {split: dataset.materialize() for split, dataset in datasets.items()}
        lr = _lr(cfg, data)
        if to_resume is not None:
            name, record = to_resume
            _check_same_plan(record, plan, lr, name)
            run_id = record.mlflow_run_id
            client.update_run(run_id, status="RUNNING")
        else:
            name = _run_name(out)
            params = {**_flatten(cfg.dump()), **_data_params(data), "train.lr_resolved": f"{lr:.6g}",
                      "train.total_steps": str(plan.total_steps), "base_model": base_model}
            run_id = _start_mlflow_run(client, cfg.registry.experiment, name, params, data)
            _write_run_record(storage, name, RunRecord(str(out), data.root, base_model, run_id, asdict(plan), lr))
        ingest = DataConfig.default_ingest_options()
        ingest.preserve_order = True  # the same bins in the same steps on every run: resume continues exactly
        loop = {
            "config": cfg.dump(),
            "base_model": base_model,
            "conditions": data.conditions,
            "reward_scale": data.reward_scale,
            "plan": asdict(plan),
            "lr": lr,
            "tracking_uri": tracking_uri,
            "run_id": run_id,
            "has_val": data.has_val,
            "shuffle_buffer": max(1, SHUFFLE_BUFFER_TOKENS // data.pack_len),
        }
        resources = {"CPU": cfg.train.cpus_per_worker}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop,
            scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(
                name=name,
                storage_path=storage,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                logging_config=LoggingConfig(log_level="INFO" if os.environ.get("CRLFT_DEBUG") else "WARNING"),
            ),
            datasets=datasets,
            dataset_config=DataConfig(execution_options=ingest),
            torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        )
        try:
            result = trainer.fit()
        except Exception as error:
            client.set_terminated(run_id, "FAILED")
            from ray.train import TrainingFailedError

            if isinstance(error, TrainingFailedError):
                raise CrlftError(
                    f"training failed after {cfg.train.max_failures} retries: {failure_summary(error)}; fix the "
                    f"cause and continue with --resume (run {name} in {storage})"
                ) from error
            raise
    if result.checkpoint is None:
        client.set_terminated(run_id, "FAILED")
        raise CrlftError(f"run {name} ended without a checkpoint; see the Ray Train logs in {storage}/{name}")
    metrics = dict(result.metrics or {})
    artifact_uri = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT_PATH}"
    steps = int(metrics.get("step", plan.total_steps))
    with result.checkpoint.as_directory() as directory:
        export_checkpoint(directory, base_model, out, cfg, {
            "base_model": base_model, "data_fingerprint": data.fingerprint, "steps": steps,
            "mlflow_run_id": run_id, "mlflow_artifact_uri": artifact_uri,
        })
    client.log_artifacts(run_id, str(out), MODEL_ARTIFACT_PATH)
    client.set_terminated(run_id, "FINISHED")
    prefix = "loss_"
    return TrainResult(
        out_dir=out,
        mlflow_run_id=run_id,
        model_artifact_uri=artifact_uri,
        steps=steps,
        final_loss=float(metrics.get("loss", float("nan"))),
        final_loss_by_class={k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix)},
        val_loss=float(metrics["val_loss"]) if "val_loss" in metrics else None,
        val_loss_by_class={k[len("val_loss_"):]: float(v) for k, v in metrics.items() if k.startswith("val_loss_")},
        run_name=name,
        checkpoint_path=result.checkpoint.path,
        restored_from_step=int(metrics["start_step"]) if metrics.get("start_step") else None,
    )


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


def export_checkpoint(checkpoint_dir: str | Path, base_model: str, out_dir: str | Path, cfg: Config,
                      meta_extra: Mapping[str, Any] | None = None) -> Path:
    """The model of a training checkpoint as an exported model folder: the base model, LoRA applied if the run used
    it (merged or kept as an adapter, as train.lora.merge says), the trained weights loaded."""
    from crlft import train_loop as tl
    from crlft.export import ModelMeta, save_exported
    from crlft.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(base_model, cfg.template.end_of_turn, cfg.model.trust_remote_code)
    if cfg.train.lora.enabled:
        model = tl.wrap_lora(model, cfg.train.lora)
    tl.load_model_weights(checkpoint_dir, model)
    if cfg.train.lora.enabled and cfg.train.lora.merge:
        model = tl.merge_lora(model)
    return save_exported(model, tokenizer, out_dir, ModelMeta.from_config(cfg, **dict(meta_extra or {})))


if __name__ == "__main__":
    raise SystemExit(stage_entrypoint("jobs.train"))
