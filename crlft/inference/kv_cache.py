"""crlft's engine's KV cache: layers that grow into spare room instead of being concatenated again at every step,
and the left padding that lines up rows of different lengths when batches are merged (continuous batching)."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends each step's keys and values into spare room (grown by doubling) instead of
    concatenating the whole cache again at every step; `keys` and `values` are views of the filled part."""

    def __init__(self) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._len = 0

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> GrowingLayer:
        layer = cls()
        layer.update(keys, values)
        return layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True
        n = key_states.shape[-2]
        if self._k is None or self._v is None or self._len + n > self._k.shape[-2]:
            room = 2 * (self._len + n) + 32
            k = key_states.new_empty((*key_states.shape[:-2], room, key_states.shape[-1]))
            v = value_states.new_empty((*value_states.shape[:-2], room, value_states.shape[-1]))
            if self._k is not None and self._v is not None:
                k[..., : self._len, :] = self._k[..., : self._len, :]
                v[..., : self._len, :] = self._v[..., : self._len, :]
            self._k, self._v = k, v
        self._k[..., self._len : self._len + n, :] = key_states
        self._v[..., self._len : self._len + n, :] = value_states
        self._len += n
        return self._views()

    def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._k is not None and self._v is not None
        self.keys, self.values = self._k[..., : self._len, :], self._v[..., : self._len, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._k is not None and self._v is not None:
            self._k, self._v = self._k[indices], self._v[indices]
            self._views()

    def drop_front(self, n: int) -> None:
        """Forget the first n positions (padding no row needs any more)."""
        if self._k is not None and self._v is not None:
            self._k, self._v = self._k[..., n:, :], self._v[..., n:, :]
            self._len -= n
            self._views()


def growing_cache() -> DynamicCache:
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer  # layers are created on first use, one per model layer
    return cache


def growing_only(cache: DynamicCache) -> bool:
    return all(type(layer) is GrowingLayer for layer in cache.layers)


def left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def cat_left_padded(old: torch.Tensor, new: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([left_pad(old, width, dim=2), left_pad(new, width, dim=2)], dim=0)
