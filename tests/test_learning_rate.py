"""The default learning rate: the reference's rule where it fits (full fine-tuning at scale), a size-based rate where
it does not (small batches, small models, LoRA), always with its reason; and a plain warning when the loss of the
first epoch has not moved."""

from __future__ import annotations

import pytest

from crlft.config import load_config
from crlft.train.lr import MAX_LR, MIN_LR, LrChoice, auto_lr, choose_lr, size_lr, stalled_loss_warning

SMOLLM2_PARAMS = 134_515_584
LLAMA_13B_PARAMS = 13_000_000_000


def test_full_fine_tuning_of_a_large_model_on_large_batches_keeps_the_reference_rule() -> None:
    train = load_config(None, {}).train
    choice = choose_lr(train, supervised_tokens=200_000, n_params=LLAMA_13B_PARAMS)
    assert choice.lr == pytest.approx(auto_lr(200_000)) == pytest.approx(6.7e-5, rel=0.01)
    assert "reference's rule" in choice.reason and "200,000" in choice.reason


def test_a_small_batch_gets_the_rate_of_its_model_size_and_says_why_not_the_rule() -> None:
    train = load_config(None, {}).train
    choice = choose_lr(train, supervised_tokens=6, n_params=1_000_000)  # the rule would give 3.7e-7
    assert choice.lr == pytest.approx(1e-3)
    assert "gives 3.7e-07, too small" in choice.reason and "train.lr" in choice.reason


def test_the_size_based_rate_falls_with_the_square_root_of_the_size_between_bounds() -> None:
    assert size_lr(100_000_000) == pytest.approx(1e-4)
    assert size_lr(SMOLLM2_PARAMS) == pytest.approx(8.6e-5, rel=0.01)
    assert size_lr(10_000) == MAX_LR and size_lr(10**12) == MIN_LR


@pytest.mark.parametrize(("n_params", "expected"), [(SMOLLM2_PARAMS, 8.6e-4), (LLAMA_13B_PARAMS, 1e-4)])
def test_lora_gets_an_adapter_rate_of_1e_4_and_up_whatever_the_batch(n_params: int, expected: float) -> None:
    train = load_config(None, {"train.lora.enabled": True}).train
    choice = choose_lr(train, supervised_tokens=4e6, n_params=n_params)
    assert choice.lr == pytest.approx(expected, rel=0.01)
    assert choice.reason.startswith("LoRA")


def test_an_explicit_rate_wins() -> None:
    train = load_config(None, {"train.lr": 3e-3, "train.lora.enabled": True}).train
    assert choose_lr(train, supervised_tokens=6, n_params=SMOLLM2_PARAMS) == LrChoice(3e-3, "train.lr")


def test_a_first_epoch_whose_loss_did_not_fall_is_reported_with_the_rate_and_its_reason() -> None:
    choice = LrChoice(3.6e-7, "the reference's rule")
    warning = stalled_loss_warning([8.31, 8.30, 8.32, 8.31, 8.30, 8.31, 8.30, 8.31], choice)
    assert warning is not None
    assert "has not moved" in warning and "3.60e-07" in warning and "the reference's rule" in warning
    assert "train.lr" in warning


def test_a_falling_loss_or_a_single_step_is_no_warning() -> None:
    choice = LrChoice(1e-3, "train.lr")
    assert stalled_loss_warning([8.3, 7.9, 7.0, 6.1, 5.5, 5.0, 4.8, 4.7], choice) is None
    assert stalled_loss_warning([8.3], choice) is None
