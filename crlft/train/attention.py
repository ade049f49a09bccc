"""The attention implementation that trains (`train.attention`) on a device."""

from __future__ import annotations

import contextlib
import importlib.util

import torch
from torch import nn

from crlft.errors import CrlftError


def set_attention(model: nn.Module, requested: str, device: torch.device) -> str:
    """Give `model` the attention implementation of `train.attention` on `device`; return its name.

    auto takes varlen flash attention on GPU where flash_attn is installed, else keeps the model's own (sdpa for
    Llama); flex_attention, which also skips the pairs across conversations, is not chosen for you: on an H100 it was
    no faster than sdpa for a 1.1B model on 4096-token bins (benchmarks/RESULTS.md, GPU check)."""
    if requested == "auto":
        if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
            with contextlib.suppress(ImportError, ValueError):  # a model without flash attention keeps its own
                model.set_attn_implementation("flash_attention_2")
        return model.config._attn_implementation
    if requested == "flex_attention" and device.type != "cuda":
        raise CrlftError("train.attention flex_attention needs a GPU: FlexAttention has no backward pass on CPU")
    try:
        model.set_attn_implementation(requested)
    except (ImportError, ValueError) as error:
        raise CrlftError(f"train.attention {requested} is not available here: {error}") from None
    return requested
