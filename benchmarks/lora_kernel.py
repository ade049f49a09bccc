"""The adapters' products of the linear layers alone, on a model's shapes: each way `lora_ops.add_lora_linear` can take,
inside a forward pass of the base's products (their threads share the cores, as in a replica).

    python -m benchmarks.lora_kernel [--slots 8] [--rank 8] [--repeats 7] [--cases mixed:32 one:512 ...]

Shapes: SmolLM2-135M's 30 layers (hidden 576; q/k/v 576, 192, 192; gate/up 1536; down from 1536), float32, torch on
its default threads, adapter slots laid out by `lora_ops.LayerSlots` as in vLLM. A case is a batch: `mixed:N` is N
tokens over every slot (round-robin up to 32 tokens, a decode step; else N / slots a slot, a prefill), `one:N` is N
tokens of one slot. Per case, alternated and best of `--repeats`: a pass of the base's products alone, then with each
way's adapter products after every layer's; printed: the ms each way adds to a pass, and its ratio to one thread.
- threads: `lora_kernel`'s loops, chunks of each slot's tokens on torch's threads (float32's way from
  `lora_kernel.THREADS_MIN_TOKENS` tokens on);
- one thread: the same loops on this thread, a task a slot (float32's way below that, or where numba's pool is its
  workqueue);
- BLAS: per slice one product with the slot's A and an `addmm_` with its B (`lora_ops._one_adapter_linear`, bf16's
  way for one slot; float32's before the loops ran on threads), `one:N` cases only.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable
from types import SimpleNamespace

import numba
import numpy as np
import torch

from crlft.inference import lora_kernel, lora_ops

HIDDEN, MLP, KV, LAYERS = 576, 1536, 192, 30
LINEARS = ((HIDDEN, (HIDDEN, KV, KV)), (HIDDEN, (HIDDEN,)), (HIDDEN, (MLP, MLP)), (MLP, (HIDDEN,)))  # in, slices
DEFAULT_CASES = ("mixed:8", "mixed:32", "mixed:256", "mixed:1024", "one:32", "one:128", "one:512", "one:1024")


def layers(n_slots: int, rank: int) -> list[tuple[torch.Tensor, lora_ops.LayerSlots]]:
    """Each linear layer's base weight and its adapter slots (random, as vLLM's buffers: slots x 1 x rank x in)."""
    made = []
    for _ in range(LAYERS):
        for width, slices in LINEARS:
            lora_a = tuple(torch.randn(n_slots, 1, rank, width) * 0.02 for _ in slices)
            lora_b = tuple(torch.randn(n_slots, 1, size, rank) * 0.02 for size in slices)
            slots = lora_ops.LayerSlots.of(SimpleNamespace(), lora_a, lora_b)
            made.append((torch.randn(sum(slices), width) * 0.02, slots))
    return made


WAYS: dict[str, Callable | None] = {
    "base alone": None,
    "threads": functools.partial(lora_ops._compiled_linear, products=lora_kernel._on_threads),
    "one thread": functools.partial(lora_ops._compiled_linear, products=lora_kernel._on_this_thread),
    "BLAS": lora_ops._one_adapter_linear,
}


def forward_pass(made: list, inputs: dict[int, torch.Tensor], slots: lora_ops.TokenGroups | int,
                 way: Callable | None) -> float:  # fmt: skip
    started = time.perf_counter()
    for weight, layer in made:
        x = inputs[weight.shape[1]]
        out = x @ weight.T
        if way is not None:
            way(slots, out, x, layer, 2.0)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="mixed:N or one:N (default: %(default)s)")
    args = parser.parse_args(argv)
    made = layers(args.slots, args.rank)
    assert lora_kernel._threads_usable(), "numba's thread pool is its workqueue here: nothing to compare"
    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    print(f"SmolLM2-135M's shapes, {LAYERS} layers, {args.slots} slots of rank {args.rank}, float32; torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print("| batch | base alone ms | threads ms | one thread ms | BLAS ms | threads / one thread | BLAS / one thread |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for case in args.cases:
        kind, n = case.split(":")
        n = int(n)
        if kind == "one":
            slots, ways = 0, WAYS
        else:
            spread = np.arange(n) % args.slots if n <= 32 else np.repeat(np.arange(args.slots), -(-n // args.slots))[:n]
            slots, ways = lora_ops.TokenGroups.of(torch.from_numpy(spread), args.slots), dict(list(WAYS.items())[:3])
        inputs = {width: torch.randn(n, width) for width in (HIDDEN, MLP)}
        best = dict.fromkeys(ways, float("inf"))
        for repeat in range(args.repeats + 1):  # the first round compiles and warms up; alternated, best of the rest
            for name, way in ways.items():
                seconds = forward_pass(made, inputs, slots, way)
                best[name] = min(best[name], seconds) if repeat else best[name]
        added = {name: 1000 * (best[name] - best["base alone"]) for name in ways}
        blas = (f"{added['BLAS']:.1f}", f"{added['BLAS'] / added['one thread']:.2f}x") if "BLAS" in ways else ("-",) * 2
        print(f"| {kind} {n} | {1000 * best['base alone']:.0f} | {added['threads']:.1f} | {added['one thread']:.1f} | "
              f"{blas[0]} | {added['threads'] / added['one thread']:.2f}x | {blas[1]} |", flush=True)


if __name__ == "__main__":
    main()
