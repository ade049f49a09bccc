"""The engines behind the seam of engine.py, opened by kind: crlft's own (`TransformersEngine`, continuous batching
over Hugging Face forward passes on its own thread) and vLLM's (vllm_engine.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from crlft.export import load_exported
from crlft.inference.engine import Adapter, Engine, EngineKind, EngineSettings, Generation
from crlft.inference.generate import BatchGenerator, EngineLoop, GenerationRequest
from crlft.inference.sampling import SamplingParams


def open_engine(path: Path, settings: EngineSettings) -> Engine:
    if settings.kind == "vllm":
        from crlft.inference.vllm_engine import VllmEngine

        return VllmEngine(path, settings)
    return TransformersEngine(path, settings)


class TransformersEngine:
    """crlft's continuous-batching engine on its own thread (crlft.inference.generate.EngineLoop)."""

    kind: EngineKind = "transformers"

    def __init__(self, path: Path, settings: EngineSettings) -> None:
        exported = load_exported(path, dtype=settings.dtype)
        model = exported.model.to(settings.device)
        self.meta = exported.meta
        self.template_tokenizer = exported.template_tokenizer
        self.context_len = exported.folder.context_len
        engine = BatchGenerator(model, exported.tokenizer, exported.stop_ids, max_batch_size=settings.max_batch_size,
                                context_len=self.context_len)
        self.loop = EngineLoop(engine, batch_wait_s=settings.batch_wait_s)

    def submit(self, prompt: Sequence[int], params: Sequence[SamplingParams], stream: bool,
               adapter: Adapter | None = None) -> Generation:
        if adapter is not None:  # EngineSettings.with_adapters refuses this engine before any request
            raise ValueError("crlft's engine serves no adapters")
        generation = Generation(len(params), len(prompt))
        requests = [
            GenerationRequest(
                prompt,
                p,
                on_text=(lambda text, i=i: generation.post(i, text)) if stream else None,
                on_finish=lambda c, i=i: generation.post(i, c),
            )
            for i, p in enumerate(params)
        ]

        def cancel() -> None:
            for r in requests:
                if not r.finished:
                    self.loop.cancel(r)

        generation.cancel = cancel
        for r in requests:
            self.loop.submit(r)
        return generation

    def counts(self) -> tuple[int, int]:
        return self.loop.engine.num_running, self.loop.engine.num_waiting

    def alive(self) -> bool:
        return self.loop.alive()

    def drain(self) -> None:
        self.loop.drain()  # its thread ends once the requests in flight are done
