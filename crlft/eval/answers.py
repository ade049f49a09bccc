"""Greedy answers of token-id prompts, as evaluation, retention and replay ask for them: by a `Decoder`, the engine
`crlft serve` serves with (crlft's continuous-batching engine here, vLLM's in crlft/inference/vllm_decoder.py), each
prompt fitted to the model's context."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from crlft.data.records import Message
from crlft.export import ExportedModel
from crlft.inference.generate import BatchGenerator, GenerationRequest
from crlft.inference.sampling import SamplingParams, answer_text

Decoder = Callable[[Sequence[list[int]], int], list[str]]
"""Greedy answers of token-id prompts (that fit the context with `max_new_tokens` more): (prompts, max_new_tokens) ->
each answer cut at the first stop token, decoded and stripped. Evaluation decodes with the engine `crlft serve`
serves with (`batch_decoder` here, vLLM in crlft/inference/vllm_decoder.py): the accuracy that gates promotion is
what users get."""


def _fit(ids: list[int], keep: int, bos: list[int]) -> list[int]:
    """The prompt cut from the left to `keep` tokens (keeping BOS): the newest turns matter most."""
    if len(ids) <= keep:
        return ids
    return bos + ids[len(ids) - (keep - len(bos)):]


def batch_decoder(exported: ExportedModel, batch_size: int = 16) -> Decoder:
    """crlft's continuous-batching engine, as the `transformers` serving engine runs it (the same stop tokens and
    context), greedy, `batch_size` sequences at a time: the model's own device and number type."""
    stops = exported.stop_ids
    engine = BatchGenerator(exported.model, exported.tokenizer, stops, max_batch_size=batch_size,
                            context_len=exported.folder.context_len)  # fmt: skip

    def decode(prompts: Sequence[list[int]], max_new_tokens: int) -> list[str]:
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        completions = engine.generate([GenerationRequest(prompt, params) for prompt in prompts])
        return [answer_text(exported.tokenizer, c.token_ids, stops) for c in completions]

    return decode


def generate(exported: ExportedModel, prompts: Sequence[list[int]], max_new_tokens: int = 16, batch_size: int = 16,
             decoder: Decoder | None = None) -> list[str]:
    """Greedy answers of token-id prompts by `decoder` (default: `batch_decoder` with `batch_size`), each cut at the
    first stop token and stripped. A prompt too long for the context loses its oldest tokens, and answers get at most
    half the context."""
    limit = exported.folder.context_len
    fitted, max_new_tokens = fit_prompts(prompts, max_new_tokens, limit, exported.template_tokenizer.bos_ids)
    return (decoder or batch_decoder(exported, batch_size))(fitted, max_new_tokens)


def fit_prompts(prompts: Sequence[list[int]], max_new_tokens: int, limit: int,
                bos: list[int]) -> tuple[list[list[int]], int]:
    """The prompts and answer length decoders get (`generate`; jobs/replay.py for vLLM under Ray Data): answers get at
    most half the context `limit` (the model folder's, `ModelFolder.context_len`, which serving applies too), and a
    prompt too long for the rest loses its oldest tokens (keeping BOS)."""
    max_new_tokens = max(1, min(max_new_tokens, limit // 2))
    return [_fit(list(p), limit - max_new_tokens, bos) for p in prompts], max_new_tokens


def chat_prompt(exported: ExportedModel, messages: Sequence[Message], condition: str, system: str = "") -> list[int]:
    return exported.template_tokenizer.tokenize_prompt(messages, condition=condition, system=system)
