"""The schedule of a run: how many optimiser steps it takes (`plan_steps`), AdamW with the paper's betas, eps and
decay (`build_optimizer`), and its learning rate over the steps: linear warm-up, then cosine decay to a floor, a
fraction of the peak (`build_scheduler`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from crlft.errors import CrlftError

if TYPE_CHECKING:  # only annotations: crlft.config needs pydantic, which the GPU check's machine lacks
    from crlft.config import TrainConfig


@dataclass(frozen=True)
class StepPlan:
    """How many optimiser steps the run takes. Each rank gets `bins // world_size` bins per epoch (Ray Train splits
    datasets with equal=True, dropping the remainder) and takes one step per `grad_accum` of them, the last one
    possibly with fewer."""

    bins_per_rank: int
    steps_per_epoch: int
    total_steps: int
    epochs: int  # epochs started, the last one possibly cut by max_steps


def plan_steps(bins: int, world_size: int, grad_accum: int, epochs: int, max_steps: int | None) -> StepPlan:
    bins_per_rank = bins // world_size
    if bins_per_rank == 0:
        raise CrlftError(
            f"the training data has {bins} packed bins, fewer than the {world_size} workers: use fewer workers, "
            "a smaller data.pack_len or more data"
        )
    per_epoch = math.ceil(bins_per_rank / grad_accum)
    total = per_epoch * epochs if max_steps is None else min(max_steps, per_epoch * epochs)
    return StepPlan(bins_per_rank, per_epoch, total, math.ceil(total / per_epoch))

def warmup_steps(total_steps: int, warmup_fraction: float) -> int:
    return math.ceil(total_steps * warmup_fraction)


def lr_factor(step: int, total_steps: int, warmup: int, floor: float) -> float:
    """Multiplier of the peak lr for optimiser step `step` (0-based): linear warm-up ending at 1.0 on the last warm-up
    step, then cosine from 1.0 down to `floor`, reached on the last step."""
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = total_steps - warmup - 1
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup) / decay_steps)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, train: TrainConfig, lr: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, vectors (norms, biases) do not, as usual for LLMs."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    if not decay and not no_decay:
        raise CrlftError("the model has no trainable parameter (check train.lora.target_modules)")
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=train.betas, eps=train.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, train: TrainConfig) -> LambdaLR:
    warmup = warmup_steps(total_steps, train.warmup)
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, train.lr_floor))
