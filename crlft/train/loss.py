"""The C-RLFT loss: reward-weighted next-token cross-entropy, normalised by the weight sum of the GLOBAL batch.

    loss = sum_t w_t * CE_t / sum_t w_t     (both sums over every token of the optimizer step, on all ranks)

w_t is the class reward of target token t (0 for BOS, system, user text and role prefixes), as the template sets it
and crlft.data.pack shifts it onto the labels. The `per_sequence` option of the reference (each message's weights
divided by its length) is applied by the template at tokenization time; nothing here changes for it.

How a training step uses it, with gradient accumulation over micro-batches:
1. weight_sum = global_weight_sum(sum of batch["weights"].sum() over ALL micro-batches of the step), before any
   forward: the normaliser must be known up front, and it is the same number on every rank.
2. For each micro-batch: crlft_loss(logits, labels, weights, weight_sum, world_size).backward().
   Do NOT divide by the number of micro-batches: the accumulated gradients already sum to the gradient of the
   step's loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from crlft.data.pack import IGNORE_INDEX, PADDING


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (B, T) in float32 from logits (B, T, V); 0 where the label is IGNORE_INDEX."""
    batch, length, vocab = logits.shape
    ce = F.cross_entropy(
        logits.float().reshape(-1, vocab), labels.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX
    )
    return ce.reshape(batch, length)


def global_weight_sum(local_sum: torch.Tensor) -> torch.Tensor:
    """Sum of `local_sum` over all ranks when torch.distributed is initialised, else itself; never differentiable.

    Works for any tensor of sums (e.g. the per-class sums below), element-wise.
    """
    total = local_sum.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def crlft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    weight_sum: torch.Tensor,
    world_size: int = 1,
) -> torch.Tensor:
    """This rank's share of the step loss: sum(w * CE) over the micro-batch / global weight_sum * world_size.

    DDP (and FSDP) AVERAGE gradients over ranks, i.e. divide the summed gradient by world_size; multiplying by
    world_size here cancels that, so the averaged gradient is exactly the gradient of sum_all(w * CE) / weight_sum.
    Without the factor every step would be world_size times too small (the reference's once-fixed bug); dividing
    by this rank's own weight sum instead would let ranks with few supervised tokens count as much as full ones.
    """
    return crlft_loss_from_ce(token_cross_entropy(logits, labels), weights, weight_sum, world_size)


def crlft_loss_from_ce(
    ce: torch.Tensor, weights: torch.Tensor, weight_sum: torch.Tensor, world_size: int = 1
) -> torch.Tensor:
    """`crlft_loss` from per-token CE already computed (B, T): a caller that also logs per-class CE computes the
    cross-entropy over the vocabulary once (a float32 (T, V) temporary is gigabytes for large vocabularies)."""
    return step_share((weights.to(ce.dtype) * ce).sum(), weight_sum, world_size)


def step_share(total: torch.Tensor, weight_sum: torch.Tensor, world_size: int = 1) -> torch.Tensor:
    """A sum over this rank's tokens as its share of a step's loss: / the global weight sum * world_size (see
    `crlft_loss`); the C-RLFT loss and the replay answers' KL term (crlft.train.distill) are normalised alike."""
    # With no supervised token anywhere the numerator is 0 too: the floor only turns 0/0 into 0.
    denominator = weight_sum.to(total.device, torch.float32).clamp_min(torch.finfo(torch.float32).tiny)
    return total / denominator * world_size


class ClassLossSums(NamedTuple):
    """Per-class sums over supervised tokens (weight > 0), shape (n_classes,); add them across ranks and steps."""

    ce_sum: torch.Tensor
    supervised_tokens: torch.Tensor


def per_class_sums(
    ce: torch.Tensor, weights: torch.Tensor, class_ids: torch.Tensor, n_classes: int
) -> ClassLossSums:
    """Sum of CE and count of supervised tokens for each class; `class_ids` (B, T) comes from crlft.data.pack.collate.

    Unweighted on purpose: the mean CE of a class is comparable across classes whatever their rewards.
    """
    supervised = (weights > 0) & (class_ids != PADDING)
    classes = class_ids[supervised]
    ce_sum = torch.zeros(n_classes, dtype=torch.float32, device=ce.device)
    ce_sum.index_add_(0, classes, ce.detach()[supervised].float())
    tokens = torch.bincount(classes, minlength=n_classes).to(torch.float32)
    return ClassLossSums(ce_sum, tokens)


def mean_ce_by_class(sums: ClassLossSums, conditions: Sequence[str]) -> dict[str, float]:
    """Mean CE per class name, for logging; classes without supervised tokens are left out (no NaN metrics)."""
    return {
        name: (ce_sum / tokens).item()
        for name, ce_sum, tokens in zip(conditions, sums.ce_sum, sums.supervised_tokens, strict=True)
        if tokens > 0
    }
