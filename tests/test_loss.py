"""The C-RLFT loss: weighted CE over the global weight sum, so DDP gradients equal the single-process gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from crlft.data.pack import IGNORE_INDEX, PADDING
from crlft.train.loss import (
    ClassLossSums,
    crlft_loss,
    global_weight_sum,
    mean_ce_by_class,
    per_class_sums,
    token_cross_entropy,
)

VOCAB = 11
FEATURES = 6


def test_token_cross_entropy_is_float32_per_token_and_zero_on_ignored_labels() -> None:
    logits = torch.randn(2, 3, VOCAB, generator=torch.Generator().manual_seed(0)).bfloat16()
    labels = torch.tensor([[1, 2, IGNORE_INDEX], [IGNORE_INDEX, 4, 5]])
    ce = token_cross_entropy(logits, labels)
    assert ce.dtype == torch.float32 and ce.shape == (2, 3)
    assert ce[0, 2] == 0 and ce[1, 0] == 0
    expected = F.cross_entropy(logits[0, 0:1].float(), labels[0, 0:1])
    torch.testing.assert_close(ce[0, 0], expected)


def test_zero_weight_tokens_contribute_no_gradient() -> None:
    logits = torch.randn(1, 4, VOCAB, generator=torch.Generator().manual_seed(1), requires_grad=True)
    labels = torch.tensor([[1, 2, 3, 4]])
    weights = torch.tensor([[0.0, 1.0, 0.0, 0.1]])
    crlft_loss(logits, labels, weights, weights.sum()).backward()
    assert logits.grad is not None
    assert (logits.grad[0, [0, 2]] == 0).all()
    assert (logits.grad[0, [1, 3]] != 0).any(dim=-1).all()


def test_a_token_gradient_scales_with_its_weight() -> None:
    row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(2))
    logits = row.expand(1, 2, VOCAB).clone().requires_grad_(True)  # two identical tokens, same target
    labels = torch.tensor([[3, 3]])
    weights = torch.tensor([[1.0, 0.1]])
    crlft_loss(logits, labels, weights, weights.sum()).backward()
    assert logits.grad is not None
    torch.testing.assert_close(logits.grad[0, 1] * 10, logits.grad[0, 0])


def test_loss_is_the_weighted_mean_of_token_cross_entropy() -> None:
    logits = torch.randn(2, 3, VOCAB, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([[1, 2, IGNORE_INDEX], [3, 4, 5]])
    weights = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 1.0]])
    ce = token_cross_entropy(logits, labels)
    expected = (weights * ce).sum() / weights.sum()
    torch.testing.assert_close(crlft_loss(logits, labels, weights, weights.sum()), expected)
    # world_size multiplies (DDP divides the summed gradient by it again)
    torch.testing.assert_close(crlft_loss(logits, labels, weights, weights.sum(), world_size=4), expected * 4)


def test_loss_is_zero_not_nan_when_nothing_is_supervised() -> None:
    logits = torch.randn(1, 2, VOCAB, requires_grad=True)
    weights = torch.zeros(1, 2)
    loss = crlft_loss(logits, torch.tensor([[1, 2]]), weights, weights.sum())
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None and (logits.grad == 0).all()


def test_global_weight_sum_without_distributed_is_a_detached_copy() -> None:
    local = torch.tensor(3.5, requires_grad=True) * 2
    total = global_weight_sum(local)
    assert total.item() == 7.0 and not total.requires_grad


def test_per_class_sums_count_supervised_tokens_only_and_give_mean_ce_per_class() -> None:
    ce = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]])
    weights = torch.tensor([[0.0, 1.0, 1.0, 0.1], [0.1, 0.0, 0.0, 0.0]])
    class_ids = torch.tensor([[0, 0, 0, 1], [1, 1, PADDING, PADDING]])
    sums = per_class_sums(ce, weights, class_ids, n_classes=3)
    assert sums.ce_sum.tolist() == [5.0, 9.0, 0.0]
    assert sums.supervised_tokens.tolist() == [2.0, 2.0, 0.0]
    assert mean_ce_by_class(sums, ["GPT4", "GPT3", "Human"]) == {"GPT4": 2.5, "GPT3": 4.5}


def test_per_class_sums_add_up_across_batches() -> None:
    a = ClassLossSums(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))
    b = ClassLossSums(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 1.0]))
    summed = ClassLossSums(a.ce_sum + b.ce_sum, a.supervised_tokens + b.supervised_tokens)
    assert mean_ce_by_class(summed, ["GPT4", "GPT3"]) == {"GPT4": 2.0, "GPT3": 2.0}


# --- real torch.distributed: 2 processes over gloo --------------------------------------------------------------


def _rank_data(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, labels and weights of one rank; the ranks have very different weight sums (4.2 vs 0.3)."""
    generator = torch.Generator().manual_seed(100 + rank)
    features = torch.randn(2, 5, FEATURES, generator=generator)
    labels = torch.randint(0, VOCAB, (2, 5), generator=generator)
    if rank == 0:
        weights = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.1, 0.1]])
    else:
        weights = torch.tensor([[0.0, 0.0, 0.1, 0.1, 0.0], [0.0, 0.0, 0.0, 0.1, 0.0]])
    return features, labels, weights


def _model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(FEATURES, VOCAB)


def _gradients(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def _ddp_worker(rank: int, world_size: int, out_dir: str) -> None:
    # A file rendezvous, not a port chosen and released for gloo to bind later (another process took it once: SIGABRT)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world_size)
    try:
        model = DistributedDataParallel(_model())
        features, labels, weights = _rank_data(rank)
        variants = {
            "global": (global_weight_sum(weights.sum()), world_size),
            "local_sum": (weights.sum(), 1),  # the bug: each rank normalises by its own weight sum
            "no_world_size": (global_weight_sum(weights.sum()), 1),  # the bug: forgets DDP's averaging
        }
        results = {}
        for name, (weight_sum, scale) in variants.items():
            model.zero_grad()
            crlft_loss(model(features), labels, weights, weight_sum, world_size=scale).backward()
            results[name] = _gradients(model)  # DDP has averaged them over the ranks
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_gradients(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[torch.Tensor]]:
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(2, str(out_dir)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(out_dir / f"rank{r}.pt") for r in (0, 1))
    for name in rank0:  # DDP keeps the replicas identical
        for g0, g1 in zip(rank0[name], rank1[name], strict=True):
            torch.testing.assert_close(g0, g1)
    return rank0


@pytest.fixture(scope="module")
def union_gradients() -> list[torch.Tensor]:
    """The single-process gradient of the loss over both ranks' data at once."""
    model = _model()
    parts = [_rank_data(rank) for rank in (0, 1)]
    features, labels, weights = (torch.cat(column) for column in zip(*parts, strict=True))
    crlft_loss(model(features), labels, weights, weights.sum()).backward()
    return _gradients(model)


def _max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def test_ddp_gradient_with_the_global_weight_sum_equals_the_single_process_gradient(
    ddp_gradients: dict[str, list[torch.Tensor]], union_gradients: list[torch.Tensor]
) -> None:
    for ddp, union in zip(ddp_gradients["global"], union_gradients, strict=True):
        torch.testing.assert_close(ddp, union, atol=1e-6, rtol=0)


def test_normalising_by_each_ranks_own_weight_sum_would_give_a_different_gradient(
    ddp_gradients: dict[str, list[torch.Tensor]], union_gradients: list[torch.Tensor]
) -> None:
    assert _max_difference(ddp_gradients["local_sum"], union_gradients) > 1e-2


def test_forgetting_the_world_size_factor_would_halve_the_gradient(
    ddp_gradients: dict[str, list[torch.Tensor]], union_gradients: list[torch.Tensor]
) -> None:
    for ddp, union in zip(ddp_gradients["no_world_size"], union_gradients, strict=True):
        torch.testing.assert_close(ddp * 2, union, atol=1e-6, rtol=0)
