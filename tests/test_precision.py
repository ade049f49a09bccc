"""train.precision: bf16 autocast where the hardware computes bf16 and the model is wide enough for it to pay, float32
elsewhere; weights, gradients, optimiser and loss stay float32, and the loss matches float32 within bf16's precision."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from crlft.config import TrainConfig, load_config
from crlft.data.pack import collate, pack_bin
from crlft.errors import CrlftError
from crlft.train.precision import BF16_CPU_MIN_HIDDEN, compute_dtype
from crlft.train.step import StepStats, train_step

CPU = torch.device("cpu")
WIDE, NARROW = BF16_CPU_MIN_HIDDEN, BF16_CPU_MIN_HIDDEN // 4


def test_explicit_precisions_are_obeyed_everywhere() -> None:
    assert compute_dtype("bf16", CPU, NARROW) is torch.bfloat16
    assert compute_dtype("fp32", CPU, WIDE) is None


@pytest.mark.parametrize(("native", "hidden", "expected"), [
    (True, WIDE, torch.bfloat16),
    (True, NARROW, None),  # small matmuls: bf16 measured no faster than float32 on the tiny model
    (False, WIDE, None),  # emulated bf16 is slower than float32
])  # fmt: skip
def test_auto_takes_bf16_on_cpus_that_have_it_for_wide_models(
    monkeypatch: pytest.MonkeyPatch, native: bool, hidden: int, expected: torch.dtype | None
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    assert compute_dtype("auto", CPU, hidden) is expected


def test_auto_takes_bf16_on_gpus_with_bf16_whatever_the_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert compute_dtype("auto", torch.device("cuda"), NARROW) is torch.bfloat16


def test_precision_is_a_validated_config_field() -> None:
    assert TrainConfig().precision == "auto"
    assert load_config(None, {"train.precision": "fp32"}).train.precision == "fp32"
    with pytest.raises(CrlftError, match="train.precision"):
        load_config(None, {"train.precision": "fp16"})


def _step(autocast: torch.dtype | None) -> tuple[StepStats, LlamaForCausalLM]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    generator = torch.Generator().manual_seed(1)
    conversations = [(torch.randint(4, 128, (n,), generator=generator).tolist(), [0.0] * 5 + [1.0] * (n - 5), "GPT4")
                     for n in (40, 25, 60)]
    batch = collate([pack_bin(conversations)], None, 0, ["GPT4"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    stats = train_step(model, [batch], optimizer, scheduler, n_classes=1, grad_clip=1.0, world_size=1,
                          autocast_dtype=autocast)
    return stats, model


def test_a_bf16_step_matches_float32_and_keeps_float32_weights() -> None:
    fp32, _ = _step(None)
    bf16, model = _step(torch.bfloat16)
    assert bf16.loss == pytest.approx(fp32.loss, rel=1e-2)
    assert bf16.grad_norm == pytest.approx(fp32.grad_norm, rel=5e-2)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
