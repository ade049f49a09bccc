"""Each token times its own adapter slot's A and B, compiled (numba, a dependency of vLLM's CPU build): the product
`lora_ops.add_lora_linear` takes for float32 batches on CPUs.

Eager torch ops can either multiply every token by every slot (one product per op, but slots x the multiplications
a token needs) or take one small op per slot, whose cost is the op's, not its multiplications. Here each slot's A and
B are read once for all its tokens, in one call per layer: the multiplications each token needs and no more. Measured
in benchmarks/RESULTS.md, "A compiled product of each token's own slot"."""

from __future__ import annotations

import functools

import numpy as np
from numba import njit


@njit(fastmath=True, cache=True, boundscheck=False, nogil=True)
def own_slot_products(out: np.ndarray, x: np.ndarray, order: np.ndarray, starts: np.ndarray, a_all: np.ndarray,
                      bs: tuple[np.ndarray, ...], offsets: np.ndarray, scale: float) -> None:  # fmt: skip
    """out[t, slice i] += scale * (x[t] @ A_i[s].T) @ B_i[s] for the tokens t = order[starts[s]:starts[s + 1]] of
    each slot s: A_i[s] is rows (i x slots + s) x rank ... of `a_all` (slices x slots x rank rows of `in`), B_i[s] is
    bs[i][s] (rank x out_i). `out` and `x` rows contiguous (the inner loops run along them)."""
    n_slots = starts.shape[0] - 1
    width = x.shape[1]
    for i in range(len(bs)):
        b = bs[i]
        rank, n_out = b.shape[1], b.shape[2]
        offset = offsets[i]
        shrunk = np.empty((x.shape[0], rank), np.float32)
        for s in range(n_slots):
            lo, hi = starts[s], starts[s + 1]
            if lo == hi:
                continue
            first_row = (i * n_slots + s) * rank
            for r in range(rank):
                a_row = a_all[first_row + r]
                for q in range(lo, hi):
                    token = x[order[q]]
                    acc = np.float32(0.0)
                    for k in range(width):
                        acc += token[k] * a_row[k]
                    shrunk[q, r] = acc * scale
            for r in range(rank):
                b_row = b[s, r]
                for q in range(lo, hi):
                    out_row = out[order[q], offset : offset + n_out]
                    h = shrunk[q, r]
                    for j in range(n_out):
                        out_row[j] += h * b_row[j]


@functools.lru_cache(maxsize=64)
def one_slot_order(slot: int, n_tokens: int, n_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """`own_slot_products`' order and starts for a batch whose tokens all have `slot`."""
    starts = np.zeros(n_slots + 1, np.int64)
    starts[slot + 1 :] = n_tokens
    return np.arange(n_tokens, dtype=np.int64), starts
