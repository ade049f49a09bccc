"""vLLM as evaluation's decoder: the engine `crlft serve` runs with inference.engine=vllm, offline and batched.

The serving replica (crlft/inference/vllm_engine.py) holds vLLM's async engine; evaluation has all its prompts at
once, so it uses vLLM's offline `LLM` with the replica's settings: prompt ids in and token ids out (vLLM's
tokenizer is not loaded), the same stop tokens, context and number type, greedy. crlft turns the ids into text, as
it does when serving, so the answers read as the endpoint's do.

vLLM is imported only when a decoder is built. It runs its engine core in a spawned process, so a script that builds
one needs an `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crlft.export import ModelFolder, adapter_base, adapter_rank, is_adapter
from crlft.inference.engine import Adapter, EngineSettings
from crlft.inference.sampling import answer_budget, answer_text
from crlft.inference.vllm_engine import engine_arguments, lora_request, starting_vllm


def not_the_template_warmup(record: logging.LogRecord) -> bool:
    """vLLM's offline `LLM` warms up a chat template with the tokenizer it was told to skip (prompts come as ids) and
    logs the failure with a traceback at WARNING: nothing is missing, the lines would only alarm."""
    return record.getMessage() != "Chat template warmup failed"


class VllmDecoder:
    """A `crlft.eval.answers.Decoder` backed by one offline vLLM engine for a model folder; `close` ends the engine."""

    def __init__(self, path: Path, settings: EngineSettings) -> None:
        self.folder = ModelFolder.read(path)
        self.adapter, weights = None, path
        if is_adapter(path):  # its base in the engine, the adapter on every request, as a replica serves it
            weights, self.adapter = adapter_base(path).folder(), Adapter(path.name, 1, path)
            settings = settings.with_adapters(1, [adapter_rank(path)])
        with starting_vllm(weights, settings) as unpinned:
            from vllm import LLM

            logging.getLogger("vllm.renderers.base").addFilter(not_the_template_warmup)  # vLLM resets levels only
            self._llm: Any = LLM(**engine_arguments(weights, settings, self.folder.context_len, unpinned))

    def __call__(self, prompts: Sequence[list[int]], max_new_tokens: int) -> list[str]:
        from vllm import SamplingParams

        folder = self.folder
        # As the replica does: an answer never runs past the context (vLLM would refuse the request).
        params = [SamplingParams(temperature=0.0, max_tokens=answer_budget(len(p), max_new_tokens, folder.context_len),
                                 stop_token_ids=folder.stop_ids, detokenize=False) for p in prompts]  # fmt: skip
        outputs = self._llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False,
                                     lora_request=lora_request(self.adapter))
        tokenizer = folder.template_tokenizer.tokenizer
        return [answer_text(tokenizer, output.outputs[0].token_ids, folder.stop_ids) for output in outputs]

    def close(self) -> None:
        """Stop vLLM's engine process now (the offline `LLM` has no close of its own; it would wait for collection)."""
        self._llm.llm_engine.engine_core.shutdown()
