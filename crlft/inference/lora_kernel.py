"""Each token times its own adapter slot's A and B, compiled (numba, a dependency of vLLM's CPU build): the product
`lora_ops.add_lora_linear` takes for float32 batches on CPUs.

Eager torch ops can either multiply every token by every slot (one product per op, but slots x the multiplications
a token needs) or take one small op per slot, whose cost is the op's, not its multiplications. Here each slot's A and
B are read once for a chunk of its tokens, in one call per layer: the multiplications each token needs and no more.
Batches of many tokens (prefills) run in chunks of a slot's tokens on torch's threads; small ones (decode steps), or
where numba's pool cannot serve, on one thread. Measured in benchmarks/RESULTS.md, "The compiled product on torch's
threads" (`python -m benchmarks.lora_kernel`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import numba
import numpy as np
import torch
from numba import njit, prange

CHUNK_TOKENS = 16  # a slot's tokens per task on threads: measured against 8 and 32 (RESULTS.md)
# Batches of fewer tokens (decode steps) run on this thread: served, threads lost there to the replica's other threads
# on the same cores, though alone they gained (RESULTS.md).
THREADS_MIN_TOKENS = 128


def _compile(chunk_tokens: int, parallel: bool) -> Callable[..., None]:
    """The loops, compiled with tasks of up to `chunk_tokens` tokens of one slot (numba's cache keeps each form apart
    by this closure's values: it would not by the `parallel` flag alone)."""

    def products(out: np.ndarray, x: np.ndarray, order: np.ndarray, starts: np.ndarray, a_all: np.ndarray,
                 bs: tuple[np.ndarray, ...], offsets: np.ndarray, scale: float) -> None:  # fmt: skip
        """out[t, slice i] += scale * (x[t] @ A_i[s].T) @ B_i[s] for the tokens t = order[starts[s]:starts[s + 1]]
        of each slot s: A_i[s] is rows (i x slots + s) x rank ... of `a_all` (slices x slots x rank rows of `in`),
        B_i[s] is bs[i][s] (rank x out_i). `out` and `x` rows contiguous (the inner loops run along them). Each task
        writes its own tokens' rows."""
        n_slots = starts.shape[0] - 1
        width = x.shape[1]
        n_tasks = 0
        for s in range(n_slots):
            n_tasks += (starts[s + 1] - starts[s] + chunk_tokens - 1) // chunk_tokens
        task_slot = np.empty(n_tasks, np.int64)
        task_start = np.empty(n_tasks, np.int64)
        task = 0
        for s in range(n_slots):
            for lo in range(starts[s], starts[s + 1], chunk_tokens):
                task_slot[task], task_start[task] = s, lo
                task += 1
        for task in prange(n_tasks):  # `range` where not parallel
            s, lo = task_slot[task], task_start[task]
            hi = min(lo + chunk_tokens, starts[s + 1])
            for i in range(len(bs)):
                b = bs[i]
                rank, n_out = b.shape[1], b.shape[2]
                offset = offsets[i]
                shrunk = np.empty((hi - lo, rank), np.float32)
                first_row = (i * n_slots + s) * rank
                for r in range(rank):
                    a_row = a_all[first_row + r]
                    for q in range(lo, hi):
                        token = x[order[q]]
                        acc = np.float32(0.0)
                        for k in range(width):
                            acc += token[k] * a_row[k]
                        shrunk[q - lo, r] = acc * scale
                for r in range(rank):
                    b_row = b[s, r]
                    for q in range(lo, hi):
                        out_row = out[order[q], offset : offset + n_out]
                        h = shrunk[q - lo, r]
                        for j in range(n_out):
                            out_row[j] += h * b_row[j]

    return njit(products, parallel=parallel, fastmath=True, cache=True, boundscheck=False, nogil=True)


_on_threads = _compile(CHUNK_TOKENS, parallel=True)
_on_this_thread = _compile(1 << 62, parallel=False)  # one task per slot
# The process that started numba's thread pool, and whether that pool can share the cores with torch's. A child forked
# from that process cannot use the pool (numba's OpenMP pool terminates it).
_pool: dict[str, int | bool] = {}


def own_slot_products(out: np.ndarray, x: np.ndarray, order: np.ndarray, starts: np.ndarray, a_all: np.ndarray,
                      bs: tuple[np.ndarray, ...], offsets: np.ndarray, scale: float) -> None:  # fmt: skip
    """The loops on as many threads as torch's (a replica's CPUs) for batches of THREADS_MIN_TOKENS tokens or more,
    else on this thread, as where numba's pool cannot serve (`_threads_usable`)."""
    if x.shape[0] < THREADS_MIN_TOKENS or not _threads_usable():
        _on_this_thread(out, x, order, starts, a_all, bs, offsets, scale)
        return
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    _on_threads(out, x, order, starts, a_all, bs, offsets, scale)


def _threads_usable() -> bool:
    """Starts numba's pool on first use, its OpenMP threads set to sleep as soon as a task ends (OMP_WAIT_POLICY, read
    as its library loads): torch's threads run on another OpenMP library, and a thread that spins waiting takes a core
    from them. Not usable: numba's fallback pool (workqueue, which fights torch's threads), or a pool started before
    this process was forked."""
    if not _pool:
        saved = os.environ.get("OMP_WAIT_POLICY")
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        try:
            numba.get_num_threads()  # starts the pool
        finally:
            if saved is None:
                del os.environ["OMP_WAIT_POLICY"]
            else:
                os.environ["OMP_WAIT_POLICY"] = saved
        _pool.update(pid=os.getpid(), usable=numba.threading_layer() != "workqueue")
    return bool(_pool["usable"]) and _pool["pid"] == os.getpid()


@functools.lru_cache(maxsize=64)
def one_slot_order(slot: int, n_tokens: int, n_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """`own_slot_products`' order and starts for a batch whose tokens all have `slot`."""
    starts = np.zeros(n_slots + 1, np.int64)
    starts[slot + 1 :] = n_tokens
    return np.arange(n_tokens, dtype=np.int64), starts
