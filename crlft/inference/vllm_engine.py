"""The vLLM engine behind the engine seam: vLLM's `AsyncLLM` inside the project's own Serve replica.

Why vLLM's async engine in the project's deployment and not Ray Serve LLM (`ray.serve.llm.LLMServer` behind
`build_openai_app`): the ingress here owns the product's behaviour (the `condition` field, API keys, OpenAI-shaped
errors and overload answers, following the registry's champion with in-place swaps, the chat page, metrics), and the
template is crlft's. Serve LLM would bring a second OpenAI layer and a second deployment to route through, with its
own request schema to keep in step; one replica holding one `AsyncLLM` keeps a single process boundary (vLLM's own
engine-core process) and the same swap and drain logic for both engines.

The engine gets prompt ids (the project's template, not vLLM's chat rendering) and returns token ids (vLLM's
tokenizer is not loaded): crlft's `StopText` detokenizes, so stop strings, streaming and usage are exactly those of
the transformers engine. One vLLM request per choice: vLLM refuses n > 1 with greedy sampling, and per-request seeds
give choice i its own seed + i.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from crlft.environ import environment
from crlft.export import ModelFolder
from crlft.inference.engine import Adapter, EngineKind, EngineSettings, Generation
from crlft.inference.sampling import Completion, SamplingParams, StopText, answer_budget, next_piece
from crlft.model import parameter_count

logger = logging.getLogger("ray.serve")
GIB = 2**30
# vLLM logs its whole configuration, the weight loading and the KV cache at INFO on every engine start (some 40 lines
# in the demo's output per engine); its warnings stay. A user's own VLLM_LOGGING_LEVEL wins.
VLLM_LOG_ENV = {"VLLM_LOGGING_LEVEL": "WARNING"}
# The model in the engine core's process, as vLLM runs one GPU. vLLM on CPU puts it in a worker process, which its
# thread pinning needs, and the engine core waits on that worker by spinning, on the cores the model's threads need
# (the gain is measured in benchmarks/RESULTS.md, "Serving").
# Named by its class: vLLM's CPU platform turns the name "uni" into its worker process ("mp").
IN_ENGINE_CORE = {"distributed_executor_backend": "vllm.v1.executor.uniproc_executor.UniProcExecutor"}


def engine_arguments(path: Path, settings: EngineSettings, context_len: int, unpinned: bool) -> dict[str, Any]:
    """vLLM's engine arguments for a model folder, for the replica's async engine and evaluation's offline one;
    `unpinned` as `starting_vllm` yields it."""
    on_cpu = settings.device == "cpu"
    return (IN_ENGINE_CORE if unpinned else {}) | {
        "model": str(path),
        "skip_tokenizer_init": True,  # prompts come as ids, answers go out as ids
        "dtype": str(settings.dtype).removeprefix("torch."),
        "max_model_len": context_len,
        "max_num_seqs": settings.max_batch_size,
        "kv_cache_memory_bytes": int(settings.kv_cache_gib * GIB) if on_cpu else None,
        "enforce_eager": on_cpu,  # torch.compile on CPU costs minutes at start for little at these sizes
        "seed": 0,
    } | lora_arguments(settings)


def lora_arguments(settings: EngineSettings) -> dict[str, Any]:
    """Adapters per request (vLLM's LoRA): up to `max_loras` in a batch, as many kept loaded in memory."""
    if not settings.max_loras:
        return {}
    return {"enable_lora": True, "max_loras": settings.max_loras, "max_cpu_loras": settings.max_loras,
            "max_lora_rank": settings.max_lora_rank}


def lora_request(adapter: Adapter | None) -> Any:
    if adapter is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(adapter.name, adapter.lora_id, str(adapter.path))


# A float32 model this large waits on its forward passes, not on the replica's Python: its engine gets every CPU of the
# replica. A smaller model, or one in bf16 (cheaper forward passes on CPUs with matrix units), leaves one CPU to the
# replica's frontend, which a second model thread would take. The cut lies where a token's forward pass outweighs the
# frontend's share of it (benchmarks/RESULTS.md, "Serving": SmolLM2-135M in float32 gains, the tiny model loses).
FORWARD_BOUND_PARAMETERS = 30_000_000


def engine_threads(cpus: int, parameters: int, dtype: torch.dtype) -> int:
    """vLLM's model threads on `cpus` CPUs: all of them for a model whose forward passes dominate, else one left to
    the frontend (as vLLM's own pinning leaves one core)."""
    forward_bound = dtype == torch.float32 and parameters >= FORWARD_BOUND_PARAMETERS
    return cpus if forward_bound else max(1, cpus - 1)


@contextlib.contextmanager
def starting_vllm(path: Path, settings: EngineSettings) -> Iterator[bool]:
    """The environment while vLLM is imported and starts its engine process, which inherits it: its log level, and on
    the CPU its threads. Yields whether they run unpinned (then the model runs in the engine core: `IN_ENGINE_CORE`).

    vLLM on CPU pins its model threads to the node's first cores, every engine on the node to the same ones, whatever
    CPUs Ray gave each replica. Unpinned instead, `engine_threads` of this process's CPUs (Ray puts a replica's in
    OMP_NUM_THREADS). A user's own VLLM_CPU_OMP_THREADS_BIND is kept. The environment is as before afterwards."""
    with environment(VLLM_LOG_ENV):
        started = unpinned_threads(path, settings, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
        if started is None:
            yield False
            return
        with environment(started, override=True):
            yield True


def unpinned_threads(path: Path, settings: EngineSettings, cpus: int) -> dict[str, str] | None:
    """The environment that runs vLLM's model threads unpinned, `engine_threads` of `cpus` (`starting_vllm`; replay's
    Ray Data stage puts it in its actor's); None where vLLM places them: on GPUs, or pinned by the user's own
    VLLM_CPU_OMP_THREADS_BIND."""
    if settings.device != "cpu" or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return None
    threads = engine_threads(cpus, parameter_count(str(path)), settings.dtype)
    return {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(threads)}


class VllmEngine:
    kind: EngineKind = "vllm"

    def __init__(self, path: Path, settings: EngineSettings) -> None:
        folder = ModelFolder.read(path)
        self.meta, self.template_tokenizer = folder.meta, folder.template_tokenizer
        self.context_len, self.stop_ids = folder.context_len, folder.stop_ids
        with starting_vllm(path, settings) as unpinned:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            args = AsyncEngineArgs(**engine_arguments(path, settings, self.context_len, unpinned))
            self._llm = AsyncLLM.from_vllm_config(args.create_engine_config(), disable_log_stats=True)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._draining = False
        self._closed = False

    def submit(self, prompt: Sequence[int], params: Sequence[SamplingParams], stream: bool,
               adapter: Adapter | None = None) -> Generation:
        if self._draining:
            raise RuntimeError("the engine is shutting down")
        generation = Generation(len(params), len(prompt))
        loop = asyncio.get_running_loop()
        lora = lora_request(adapter)
        tasks = [loop.create_task(self._choice(generation, i, list(prompt), p, stream, lora))
                 for i, p in enumerate(params)]
        self._in_flight.update(tasks)
        for task in tasks:
            task.add_done_callback(self._in_flight.discard)
        generation.cancel = lambda: [t.cancel() for t in tasks if not t.done()]
        return generation

    async def _choice(self, generation: Generation, index: int, prompt: list[int], params: SamplingParams,
                      stream: bool, lora: Any) -> None:
        from vllm import SamplingParams as VllmParams
        from vllm.sampling_params import RequestOutputKind

        text = StopText(self.template_tokenizer.tokenizer, params.stop)
        ids: list[int] = []
        vllm_params = VllmParams(
            max_tokens=answer_budget(len(prompt), params.max_tokens, self.context_len),
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            stop_token_ids=self.stop_ids,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )
        reason = None
        try:
            outputs = self._llm.generate({"prompt_token_ids": prompt}, vllm_params, request_id=uuid.uuid4().hex,
                                         lora_request=lora)
            async with contextlib.aclosing(outputs):  # leaving early (a stop string) aborts the vLLM request
                async for output in outputs:
                    piece, reason = self._take(text, ids, output.outputs[0].token_ids)
                    if reason is None and output.finished:
                        reason = "length" if output.outputs[0].finish_reason == "length" else "stop"
                    if reason is not None:
                        piece += text.flush()
                    if stream and piece:
                        generation.post(index, piece)
                    if reason is not None:
                        break
            generation.post(index, Completion(text.text, tuple(ids), reason or "stop", len(prompt)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the request fails, the engine and the other requests go on
            logger.exception("vLLM generation failed")
            generation.post(index, Completion(text.text, tuple(ids), "error", len(prompt), error=str(exc)))

    def _take(self, text: StopText, ids: list[int], new: Sequence[int]) -> tuple[str, str | None]:
        """Feed new tokens one at a time, so that a stop ends the answer at exactly the token that made it."""
        shown = ""
        for token in new:
            piece, stopped = next_piece(text, ids, token, self.stop_ids)
            shown += piece
            if stopped:
                return shown, "stop"
        return shown, None

    def counts(self) -> tuple[int, int]:
        # vLLM schedules inside its engine core: what this replica holds counts as running.
        return len(self._in_flight), 0

    def alive(self) -> bool:
        return not self._closed and not self._llm.errored

    def drain(self) -> None:
        self._draining = True
        asyncio.get_running_loop().create_task(self._close_when_done())

    async def _close_when_done(self) -> None:
        while self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        self._closed = True
        await asyncio.to_thread(self._llm.shutdown)
