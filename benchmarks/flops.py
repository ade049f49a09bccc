"""Model FLOPs per token and a measured matmul peak: the two halves of every FLOP/s fraction (MFU) the benchmarks
report. Imports torch only, so the GPU check runs it on a machine that has nothing else."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch


def model_flops_per_token(model: torch.nn.Module, lengths: Sequence[int]) -> float:
    """Useful training FLOPs per real token of conversations of `lengths` tokens:
    4 x matmul parameters (forward, and the backward to the inputs) + 2 x trainable matmul parameters (the weight
    gradients: all of them in a full fine-tune, which makes the usual 6 x parameters, the adapters' under LoRA)
    + 12 x layers x hidden x mean causal context inside the token's own conversation (attention across the
    conversations of a packed bin, and padding, count as waste). Every nn.Linear counts, lm_head included."""
    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    matmul_params = sum(w.numel() for w in linear)
    trainable = sum(w.numel() for w in linear if w.requires_grad)
    mean_context = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)
    config = model.config
    return 4 * matmul_params + 2 * trainable + 12 * config.num_hidden_layers * config.hidden_size * mean_context


def matmul_flops(device: torch.device, dtype: torch.dtype, size: int, seconds: float = 2.0) -> float:
    """FLOP/s of a square matmul: per CPU second of this process on CPU (like the loops' CPU-time rates), per
    second on GPU."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    clock = time.perf_counter if on_gpu else time.process_time
    torch.matmul(a, b)
    sync()
    runs, start = 0, clock()
    while clock() - start < seconds:
        torch.matmul(a, b)
        runs += 1
        sync()
    return 2 * size**3 * runs / (clock() - start)
