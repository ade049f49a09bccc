"""The autocast dtype of `train.precision` (`compute_dtype`), from whether the device computes bfloat16 in hardware."""

from __future__ import annotations

import contextlib

import torch

# bf16 autocast on a CPU pays for its casts only from this hidden size up (benchmarks/RESULTS.md, "Precision").
BF16_CPU_MIN_HIDDEN = 512


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 matmuls in hardware: a CUDA GPU with bf16 support, or a CPU with AVX512-BF16
    or AMX (oneDNN's bf16 kernels); elsewhere bf16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def compute_dtype(precision: str, device: torch.device, hidden_size: int) -> torch.dtype | None:
    """The autocast dtype of `train.precision` for a model of `hidden_size` on `device` (None: float32). Weights,
    gradients, the optimiser and the loss stay in float32 either way (crlft.train.loss takes the cross-entropy in
    float32).

    auto is bf16 on GPUs with bf16, and on CPUs with bf16 in hardware for models of at least BF16_CPU_MIN_HIDDEN:
    below that the matmuls are too small a share of the step for bf16 to pay for its casts (benchmarks/RESULTS.md,
    "Precision")."""
    native = native_bf16(device) and (device.type == "cuda" or hidden_size >= BF16_CPU_MIN_HIDDEN)
    if precision == "bf16" or (precision == "auto" and native):
        return torch.bfloat16
    if precision in ("auto", "fp32"):
        return None
    raise ValueError(f"unknown precision {precision!r}: auto, bf16 or fp32")


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`; no autocast (float32) for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
