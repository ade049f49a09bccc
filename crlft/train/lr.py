"""The peak learning rate and why (`choose_lr`): the reference's auto rule `lr = 3e-4 * sqrt(supervised_tokens_per_step
/ 4e6)` where it fits (full fine-tuning on large batches), a rate from the model's size where it does not (small
batches, small models, LoRA); and a warning when the first epoch's loss has not moved (`stalled_loss_warning`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from crlft.errors import CrlftError

if TYPE_CHECKING:  # only annotations: crlft.config needs pydantic, which the GPU check's machine lacks
    from crlft.config import TrainConfig


REFERENCE_BASE_LR = 3e-4
REFERENCE_BASE_TOKENS = 4e6  # supervised tokens per step at which the reference's base lr applies


def supervised_tokens_per_step(pack_len: int, world_size: int, grad_accum: int, supervised_ratio: float) -> float:
    """Expected supervised tokens in one optimiser step: every bin of the global batch times the supervised share.

    The reference computes `batch_max_len * world_size * supervised_ratio`; bins are its batches, and gradient
    accumulation multiplies the global batch the same way more ranks do.
    """
    return pack_len * world_size * grad_accum * supervised_ratio


def auto_lr(supervised_tokens: float) -> float:
    """The reference's rule: 3e-4 at 4M supervised tokens a step, scaled with the square root of the batch."""
    if supervised_tokens <= 0:
        raise CrlftError("the data has no supervised tokens (every weight is 0): nothing to train on")
    return REFERENCE_BASE_LR * math.sqrt(supervised_tokens / REFERENCE_BASE_TOKENS)


# Where the reference's rule does not fit (small batches, small models, LoRA), the peak rate follows the model's size:
# SCALE_LR at SCALE_PARAMS parameters, with the inverse square root of the size (about 1e-5 for 7B-13B models, 1e-4 at
# 100M, 1e-3 for a few-million-parameter toy), inside [MIN_LR, MAX_LR]. LoRA adapters start at zero and take a rate
# LORA_FACTOR times larger (1e-4 and up): the best LoRA rate is about 10x the best full fine-tuning rate (Biderman et
# al. 2024, arXiv 2405.09673; Schulman et al. 2025, "LoRA Without Regret").
SCALE_LR = 1e-4
SCALE_PARAMS = 1e8
MIN_LR, MAX_LR = 1e-5, 1e-3
LORA_FACTOR = 10.0
STALL_DROP = 0.02  # relative loss drop over the first epoch below which the run warns that it is not learning


@dataclass(frozen=True)
class LrChoice:
    lr: float
    reason: str  # one line: which rule chose it, from what


def size_lr(n_params: int) -> float:
    """A full fine-tuning rate for a model of n_params parameters (see SCALE_LR)."""
    return min(MAX_LR, max(MIN_LR, SCALE_LR * math.sqrt(SCALE_PARAMS / n_params)))


def choose_lr(train: TrainConfig, supervised_tokens: float, n_params: int) -> LrChoice:
    """The peak learning rate and why: train.lr when set; for full fine-tuning the reference's rule unless the
    model's size calls for more (small batches and small models); for LoRA a size-based adapter rate."""
    if train.lr is not None:
        return LrChoice(train.lr, "train.lr")
    size_rate = size_lr(n_params)
    if train.lora.enabled:
        lr = min(MAX_LR, max(1e-4, LORA_FACTOR * size_rate))
        return LrChoice(lr, f"LoRA on a {n_params / 1e6:,.0f}M-parameter model: adapters start at zero and need 1e-4 "
                        "and up (the reference's rule is for full fine-tuning); set train.lr to choose another")
    reference = auto_lr(supervised_tokens)
    rule = f"the reference's rule 3e-4 * sqrt(T / 4e6) at T = {supervised_tokens:,.0f} supervised tokens a step"
    if reference >= size_rate:
        return LrChoice(reference, rule)
    return LrChoice(size_rate, f"{rule} gives {reference:.1e}, too small to learn on a batch this size (it is "
                    f"calibrated for millions of tokens a step): using the rate for a {n_params / 1e6:,.0f}M-parameter "
                    "model instead; set train.lr to choose another")


def stalled_loss_warning(epoch_losses: Sequence[float], lr: LrChoice) -> str | None:
    """A warning when the loss of the first epoch (its step losses, in order) did not fall by STALL_DROP: the mean of
    the last quarter of its steps against the mean of the first quarter."""
    if len(epoch_losses) < 2:
        return None
    quarter = max(1, len(epoch_losses) // 4)
    start, end = np.mean(epoch_losses[:quarter]), np.mean(epoch_losses[-quarter:])
    if end <= start * (1.0 - STALL_DROP):
        return None
    return (f"the loss has not moved in the first epoch ({start:.4f} -> {end:.4f} over {len(epoch_losses)} steps): "
            f"the model is not learning at lr {lr.lr:.2e} ({lr.reason}); try a larger train.lr, more data per step "
            "or more epochs")
