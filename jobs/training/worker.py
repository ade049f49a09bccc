"""The recipe every Ray Train worker runs (`run_worker`), top to bottom:

1. Setup: the model, initialised alike on every rank (attention and precision for the device, gradient
   checkpointing, LoRA, then FSDP2 or DDP), AdamW and its schedule, and the latest checkpoint restored if there is one.
2. Loop: per epoch, `grad_accum` packed bins a step from this worker's Ray Data shard (crlft.train.step.train_step;
   with LoRA, the replay answers held to the base model: crlft.train.distill),
   rank 0's metrics to MLflow, a warning when the first epoch's loss has not moved, and the validation loss per class
   after each epoch.
3. Checkpoint: every `train.checkpoint_every` steps and at the end, with the metrics MLflow has not taken yet (every
   rank takes part: the state dicts are gathered).
4. Export: after the last checkpoint the driver turns it into the exported model (jobs.train,
   crlft.export.export_checkpoint).

What the driver decided (the model, the classes, the plan of steps, the learning rate, the MLflow run) comes in one
WorkerPlan (jobs.training.plan)."""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from crlft.config import Config
from crlft.data.readers import chunked
from crlft.environ import set_offline_defaults
from crlft.errors import CrlftError
from crlft.train.attention import set_attention
from crlft.train.batches import as_packed_row, collate_micro_batch, rescale_row
from crlft.train.checkpoint import TrainingPosition, load_training_state, save_training_state
from crlft.train.loss import ClassLossSums, mean_ce_by_class
from crlft.train.lr import stalled_loss_warning
from crlft.train.precision import compute_dtype
from crlft.train.rng import restore_rng_state, seed_everything
from crlft.train.schedule import build_optimizer, build_scheduler
from crlft.train.step import StepStats, Stopwatch, evaluate, train_step
from crlft.train.wrap import enable_gradient_checkpointing, shard_fsdp, wrap_lora
from jobs.training.mlflow_run import MetricsLogger, read_unsent
from jobs.training.plan import WorkerPlan


def run_worker(fields: dict[str, Any]) -> None:
    """Ray Train's entry point: `fields` is the driver's WorkerPlan as Ray hands it over (jobs.train.train)."""
    import ray.train

    set_offline_defaults()
    context = ray.train.get_context()
    worker = Worker(WorkerPlan.from_ray(fields), context.get_world_rank(), context.get_world_size())
    worker.run()


class Worker:
    """One rank's training: the model, optimiser and schedule, where it is in the plan, and its latest metrics."""

    # -----------------------------------------------------------------------------------------------------------------
    # 1. Setup

    def __init__(self, plan: WorkerPlan, rank: int, world_size: int) -> None:
        import ray.train.torch

        self.plan, self.rank, self.world_size = plan, rank, world_size
        self.cfg = Config.model_validate(plan.config)
        torch.set_num_threads(_threads(self.cfg.train.cpus_per_worker))
        self.device = ray.train.torch.get_device()
        self._build_model()
        self.optimizer = build_optimizer(self.model, self.cfg.train, plan.lr.lr)
        self.scheduler = build_scheduler(self.optimizer, plan.steps.total_steps, self.cfg.train)
        self._restore()
        self.metrics = (MetricsLogger(plan.tracking_uri, plan.run_id, held=self.held_metrics) if rank == 0
                        else MetricsLogger(None, None))
        self.stopwatch = Stopwatch()

    def _build_model(self) -> None:
        """The same initialisation on every rank (LoRA adapters are random), wrapped for DDP or FSDP."""
        import ray.train.torch

        from crlft.model import load_model_and_tokenizer

        train_cfg = self.cfg.train
        seed_everything(train_cfg.seed)
        model, self.tokenizer = load_model_and_tokenizer(self.plan.base_model, self.cfg.template.end_of_turn,
                                                         self.cfg.model.trust_remote_code)
        self.attn = set_attention(model, train_cfg.attention, self.device)
        dtype = compute_dtype(train_cfg.precision, self.device, model.config.hidden_size)
        if train_cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if train_cfg.lora.enabled:
            end_of_turn = self.tokenizer.convert_tokens_to_ids(self.cfg.template.end_of_turn)
            model = wrap_lora(model, train_cfg.lora, [end_of_turn])
        if train_cfg.strategy == "fsdp":
            self.model = shard_fsdp(model.to(self.device), param_dtype=dtype)
            self.autocast = None  # FSDP's mixed-precision policy casts the parameters itself
        else:
            self.model = ray.train.torch.prepare_model(model)
            self.autocast = dtype

    def _restore(self) -> None:
        """Position, metrics and random state from the latest checkpoint; a fresh start is seeded per rank."""
        import ray.train

        self.position = TrainingPosition()
        self.summary: dict[str, float] = {"step": 0.0, "epoch": 0.0}  # the latest step's metrics, in every checkpoint
        self.held_metrics: list[Any] = []  # metrics MLflow had not taken when the checkpoint was written
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            seed_everything(self.cfg.train.seed + self.rank)
            return
        with checkpoint.as_directory() as directory:
            loaded = load_training_state(directory, self.model, self.optimizer, self.scheduler)
            self.held_metrics = read_unsent(directory)
        self.position = loaded.position
        self.summary = loaded.extra.get("summary") or {"step": float(self.position.global_step),
                                                       "epoch": float(self.position.epoch)}
        if len(loaded.rng_states) == self.world_size:
            restore_rng_state(loaded.rng_states[self.rank])

    # -----------------------------------------------------------------------------------------------------------------
    # 2. Loop

    def run(self) -> None:
        import ray.train

        steps = self.plan.steps
        train_shard = ray.train.get_dataset_shard("train")
        val_shard = ray.train.get_dataset_shard("val") if self.plan.has_val else None
        start_step = float(self.position.global_step)  # reported: shows whether this worker group restored
        for epoch in range(self.position.epoch, steps.epochs):
            if self.position.global_step >= steps.total_steps:
                break
            self._train_epoch(epoch, train_shard)
            epoch_done = self.position.step_in_epoch >= steps.steps_per_epoch
            if epoch == 0 and epoch_done:
                self._warn_if_not_learning()
            if val_shard is not None:
                self._validate(val_shard)
            if epoch_done:
                self.position = TrainingPosition(self.position.global_step, epoch + 1, 0)
        self.report({**self.summary, "start_step": start_step, "final": 1.0})
        self.metrics.close()

    def _train_epoch(self, epoch: int, shard: Any) -> None:
        """Steps of `epoch` until it ends, the plan ends or (resumed mid-epoch) the rest of it is done."""
        train_cfg = self.cfg.train
        position = self.position
        skip = position.step_in_epoch * train_cfg.grad_accum if epoch == position.epoch else 0
        micro_batches = self.batches(shard, train_cfg.seed + epoch, skip, with_teacher=bool(self.plan.replay_kl))
        self.position = TrainingPosition(position.global_step, epoch, position.step_in_epoch if skip else 0)
        self.stopwatch.lap()
        self.epoch_losses: list[float] = []
        for group in chunked(micro_batches, train_cfg.grad_accum):
            stats = train_step(
                self.model, group, self.optimizer, self.scheduler,
                n_classes=len(self.plan.conditions), grad_clip=train_cfg.grad_clip, world_size=self.world_size,
                attn_implementation=self.attn, autocast_dtype=self.autocast, replay_kl=self.plan.replay_kl,
            )  # fmt: skip
            seconds, cpu_seconds = self.stopwatch.lap()
            self.position = TrainingPosition(self.position.global_step + 1, epoch, self.position.step_in_epoch + 1)
            self.summary = self._step_metrics(stats, epoch, seconds, cpu_seconds)
            self.epoch_losses.append(stats.loss)
            self.metrics.log(self.summary, self.position.global_step)
            if self.position.global_step >= self.plan.steps.total_steps:
                break
            if train_cfg.checkpoint_every and self.position.global_step % train_cfg.checkpoint_every == 0:
                self.report(self.summary)
                self.stopwatch.lap()

    def batches(self, shard: Any, shuffle_seed: int | None, skip: int = 0,
                with_teacher: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches of one packed bin each, rescaled to the training mode's rewards; `skip` bins dropped;
        `with_teacher`: with their replay answers' teacher inputs (crlft.train.batches.teacher_inputs)."""
        rows = shard.iter_batches(
            batch_size=1,
            batch_format="numpy",
            local_shuffle_buffer_size=self.plan.shuffle_buffer if shuffle_seed is not None else None,
            local_shuffle_seed=shuffle_seed,
        )
        for index, record in enumerate(rows):
            if index < skip:
                continue
            row = rescale_row(as_packed_row({k: v[0] for k, v in record.items()}), self.plan.reward_scale)
            yield collate_micro_batch(row, self.tokenizer.pad_token_id, self.plan.conditions, self.attn, self.device,
                                      with_teacher)

    def _step_metrics(self, stats: StepStats, epoch: int, seconds: float, cpu_seconds: float) -> dict[str, float]:
        return {
            "step": float(self.position.global_step),
            "epoch": float(epoch),
            "loss": stats.loss,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "supervised_tokens": float(stats.supervised_tokens),
            "supervised_tokens_per_s": stats.supervised_tokens / seconds,
            "tokens_per_s": stats.tokens / seconds,
            "step_s": seconds,
            "step_cpu_s": cpu_seconds,  # well below step_s: the worker waits (data, other ranks, a busy host)
            **_class_metrics("loss", stats.class_sums, self.plan.conditions),
            **({"replay_kl": stats.replay_kl} if stats.replay_kl is not None else {}),
        }

    def _warn_if_not_learning(self) -> None:
        """Say plainly when the first epoch's loss has not moved (rank 0: the loss is the global batch's)."""
        warning = stalled_loss_warning(self.epoch_losses, self.plan.lr)
        if warning and self.rank == 0:
            print(f"warning: {warning}", file=sys.stderr, flush=True)

    def _validate(self, shard: Any) -> None:
        val = evaluate(self.model, self.batches(shard, None), n_classes=len(self.plan.conditions), device=self.device,
                       attn_implementation=self.attn, autocast_dtype=self.autocast)
        val_metrics = {"val_loss": val.loss, **_class_metrics("val_loss", val.class_sums, self.plan.conditions)}
        self.metrics.log(val_metrics, self.position.global_step)
        self.summary.update(val_metrics)
        self.stopwatch.lap()

    # -----------------------------------------------------------------------------------------------------------------
    # 3. Checkpoint

    def report(self, summary: dict[str, float]) -> None:
        """Checkpoint with `summary` as the metrics and the metrics MLflow has not taken yet (every rank calls it: the
        state dicts are gathered). A checkpoint that cannot be stored fails the run with the place and the cause; Ray
        Train writes each checkpoint into a new folder and records it only once it is complete, so the previous one
        stays intact and the run resumes from it."""
        import ray.train

        with tempfile.TemporaryDirectory() as directory:
            save_training_state(directory, self.model, self.optimizer, self.scheduler, self.position,
                                {"summary": summary})
            self.metrics.save_unsent(directory)
            saved = ray.train.Checkpoint.from_directory(directory) if self.rank == 0 else None
            try:
                ray.train.report(summary, checkpoint=saved)
            except OSError as error:
                raise CrlftError(
                    f"cannot store the checkpoint of step {self.position.global_step} in {self.plan.run_dir}: "
                    f"{error}; the previous checkpoint is intact: fix the storage and continue with --resume"
                ) from error


def _threads(cpus_per_worker: float) -> int:
    return max(1, math.floor(cpus_per_worker))


def _class_metrics(prefix: str, sums: ClassLossSums, conditions: list[str]) -> dict[str, float]:
    return {f"{prefix}_{name}": value for name, value in mean_ce_by_class(sums, conditions).items()}
