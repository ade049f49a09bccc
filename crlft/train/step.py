"""One optimiser step (`train_step`), the validation pass (`evaluate`) and the clock that times them.

One optimiser step = `grad_accum` packed bins per rank. The loss of the step is normalised by the weight sum of ALL
its micro-batches on ALL ranks (crlft.train.loss), known before the first backward; gradients are synchronised only
on the last micro-batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from crlft.train.batches import model_inputs
from crlft.train.distill import replay_kl_sum
from crlft.train.loss import (
    ClassLossSums,
    crlft_loss_from_ce,
    global_weight_sum,
    per_class_sums,
    step_share,
    token_cross_entropy,
)
from crlft.train.precision import autocast_context


@dataclass(frozen=True)
class StepStats:
    """What one optimiser step did, summed over all ranks."""

    loss: float  # the step's C-RLFT loss: sum(w * CE) / sum(w) over the global batch (the replay KL term apart)
    class_sums: ClassLossSums  # per class: CE sum and supervised token count (for the per-class mean CE)
    supervised_tokens: int
    tokens: int
    grad_norm: float
    lr: float  # the learning rate the step used
    replay_kl: float | None = None  # mean KL(base || model) a distilled replay token (crlft.train.distill); None: none


def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce of DDP / FSDP2 for micro-batches that are not the last one of the step."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def fsdp_no_sync() -> Iterator[None]:
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return fsdp_no_sync()
    return contextlib.nullcontext()

def _scalar(value: torch.Tensor | float) -> float:
    full = value.full_tensor() if hasattr(value, "full_tensor") else value  # FSDP2 returns a DTensor norm
    return float(full)


def train_step(
    model: nn.Module,
    micro_batches: Sequence[Mapping[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    *,
    n_classes: int,
    grad_clip: float,
    world_size: int,
    attn_implementation: str = "sdpa",
    autocast_dtype: torch.dtype | None = None,
    replay_kl: float = 0.0,
) -> StepStats:
    """One optimiser step over this rank's micro-batches (all ranks call it with the same number of them).

    The normaliser is the weight sum of every micro-batch on every rank, all-reduced before the first backward;
    each micro-batch's loss is already its share of the step's loss, so the accumulated gradients are not divided
    by the number of micro-batches (crlft.train.loss explains the world_size factor). Micro-batches with teacher inputs
    (crlft.train.batches.teacher_inputs) add `replay_kl` times their KL term (crlft.train.distill) to the loss.
    """
    if not micro_batches:
        raise ValueError("a step needs at least one micro-batch")
    device = micro_batches[0]["input_ids"].device
    local_weight_sum = torch.stack([batch["weights"].sum() for batch in micro_batches]).sum()
    weight_sum = global_weight_sum(local_weight_sum.to(device))
    ce_sum = torch.zeros(n_classes, device=device)
    class_tokens = torch.zeros(n_classes, device=device)
    local_loss = torch.zeros((), device=device)
    supervised = torch.zeros((), device=device)
    kl_sum = torch.zeros((), device=device)
    kl_tokens = torch.zeros((), device=device)
    lr = optimizer.param_groups[0]["lr"]
    model.train()
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with gradient_sync(model, enabled=last):
            with autocast_context(device, autocast_dtype):
                logits = model(**model_inputs(batch, attn_implementation), use_cache=False).logits
            ce = token_cross_entropy(logits, batch["labels"])
            crlft_loss = crlft_loss_from_ce(ce, batch["weights"], weight_sum, world_size)
            loss = crlft_loss
            if replay_kl and "teacher_ids" in batch:
                kl = replay_kl_sum(model, logits, batch, autocast_dtype)
                loss = loss + replay_kl * step_share(kl, weight_sum, world_size)
                kl_sum += kl.detach()
                kl_tokens += batch["student_positions"].numel()
            loss.backward()
        with torch.no_grad():
            sums = per_class_sums(ce.detach(), batch["weights"], batch["class_ids"], n_classes)
            ce_sum += sums.ce_sum
            class_tokens += sums.supervised_tokens
            local_loss += crlft_loss.detach() / world_size
            supervised += (batch["weights"] > 0).sum()
        del logits, ce, loss, crlft_loss
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(batch["sequence_ids"].ge(0).sum()) for batch in micro_batches)
    totals = global_weight_sum(
        torch.cat([local_loss.reshape(1), supervised.reshape(1).float(), torch.tensor([float(tokens)], device=device),
                   kl_sum.reshape(1), kl_tokens.reshape(1), ce_sum, class_tokens])
    ).cpu()
    return StepStats(
        loss=float(totals[0]),
        class_sums=ClassLossSums(totals[5 : 5 + n_classes], totals[5 + n_classes :]),
        supervised_tokens=int(totals[1]),
        tokens=int(totals[2]),
        grad_norm=_scalar(grad_norm),
        lr=lr,
        replay_kl=float(totals[3] / totals[4]) if totals[4] > 0 else None,
    )


@dataclass(frozen=True)
class EvalStats:
    loss: float  # sum(w * CE) / sum(w) over the evaluated data of all ranks
    class_sums: ClassLossSums


@torch.no_grad()
def evaluate(
    model: nn.Module,
    micro_batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    n_classes: int,
    device: torch.device,
    attn_implementation: str = "sdpa",
    autocast_dtype: torch.dtype | None = None,
) -> EvalStats:
    """Weighted loss and per-class CE sums over every batch of every rank (all ranks must call it)."""
    model.eval()
    weighted = torch.zeros(2, device=device)  # sum(w * CE), sum(w)
    ce_sum = torch.zeros(n_classes, device=device)
    class_tokens = torch.zeros(n_classes, device=device)
    for batch in micro_batches:
        with autocast_context(device, autocast_dtype):
            logits = model(**model_inputs(batch, attn_implementation), use_cache=False).logits
        ce = token_cross_entropy(logits, batch["labels"])
        weighted += torch.stack([(batch["weights"] * ce).sum(), batch["weights"].sum()])
        sums = per_class_sums(ce, batch["weights"], batch["class_ids"], n_classes)
        ce_sum += sums.ce_sum
        class_tokens += sums.supervised_tokens
    totals = global_weight_sum(torch.cat([weighted, ce_sum, class_tokens])).cpu()
    loss = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
    return EvalStats(loss, ClassLossSums(totals[2 : 2 + n_classes], totals[2 + n_classes :]))


class Stopwatch:
    """Wall and process-CPU seconds since the last lap (CPU time counts every thread of this process, Ray's own
    included, but not the time other processes held the cores)."""

    def __init__(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        elapsed = (wall - self._wall, cpu - self._cpu)
        self._wall, self._cpu = wall, cpu
        return elapsed
