"""Evaluation's decoding: where vLLM's offline engine runs the model, measured against vLLM's CPU default.

    python -m benchmarks.eval_decode [--model tiny|smollm2|DIR] [--prompts 64] [--max-new-tokens 64] [--rounds 5]

`crlft eval` decodes suite and benchmark answers with the engine `crlft serve` would serve with; with vLLM on the CPU
that is `crlft.inference.vllm_decoder.VllmDecoder`, which runs the model in vLLM's engine core process, as the
replica does (`crlft.inference.vllm_engine.IN_ENGINE_CORE`). In one run, on the same exported folder and the same
chat prompts:
- `engine-core`: that decoder;
- `worker-process`: the same decoder with vLLM's CPU default, the model in a worker process that the engine core
  waits on (same threads, unpinned);
- `transformers`: crlft's own engine (`crlft.eval.answers.batch_decoder`), the decoder where vLLM is not installed.

Every decoder is started once (start times reported, not counted), then each round decodes all prompts greedily with
every decoder in turn, the order rotating between rounds (the load of a shared machine drifts). Reported: seconds per
round and the answers' tokens/s for each, the ratio of engine-core to worker-process tokens/s per round, and whether the
two vLLM variants gave the same answers (they must: the same model, number type and greedy decoding).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from benchmarks.serve_load import build_model, prompts
from crlft.data.records import Message

Decoder = Callable[[Sequence[list[int]], int], list[str]]


def vllm_decoder(model_dir: Path, in_engine_core: bool) -> Any:
    """Evaluation's vLLM decoder on the CPU in float32; with `in_engine_core` off, vLLM's CPU default executor."""
    from crlft.inference import vllm_engine
    from crlft.inference.engine import EngineSettings
    from crlft.inference.vllm_decoder import VllmDecoder

    settings = EngineSettings("vllm", "cpu", torch.float32, max_batch_size=32, batch_wait_s=0.0, kv_cache_gib=1.0)
    default = contextlib.nullcontext() if in_engine_core else mock.patch.dict(vllm_engine.IN_ENGINE_CORE, clear=True)
    with default:
        return VllmDecoder(model_dir, settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="smollm2", help="tiny (built here), smollm2, or an exported model folder")
    parser.add_argument("--prompts", type=int, default=64, help="prompts decoded per round")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    from crlft.eval.answers import batch_decoder, chat_prompt, generate
    from crlft.export import load_exported

    with tempfile.TemporaryDirectory(prefix="eval-decode-") as scratch:
        model_dir = build_model(args.model, Path(scratch))
        exported = load_exported(model_dir)
        condition = exported.meta.inference_condition
        chats = [chat_prompt(exported, [Message("user", text)], condition) for text in prompts(args.prompts)]
        load = [os.getloadavg()[0]]
        started: dict[str, float] = {}
        decoders: dict[str, Any] = {}
        for name, make in [("engine-core", lambda: vllm_decoder(model_dir, True)),
                           ("worker-process", lambda: vllm_decoder(model_dir, False)),
                           ("transformers", lambda: batch_decoder(exported, 32))]:
            t0 = time.perf_counter()
            decoders[name] = make()
            started[name] = time.perf_counter() - t0
        seconds: dict[str, list[float]] = {name: [] for name in decoders}
        tokens: dict[str, list[int]] = {name: [] for name in decoders}
        answers: dict[str, list[str]] = {}
        names = list(decoders)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                answers[name] = generate(exported, chats, args.max_new_tokens, decoder=decoders[name])
                seconds[name].append(time.perf_counter() - t0)
                tokens[name].append(sum(len(exported.tokenizer.encode(a, add_special_tokens=False))
                                        for a in answers[name]))
        for name in ("engine-core", "worker-process"):
            decoders[name].close()
        load.append(os.getloadavg()[0])

    rate = {n: [t / s for t, s in zip(tokens[n], seconds[n], strict=True)] for n in decoders}
    ratios = [a / b for a, b in zip(rate["engine-core"], rate["worker-process"], strict=True)]
    same = answers["engine-core"] == answers["worker-process"]
    print(f"model {args.model}, {args.prompts} prompts x {args.max_new_tokens} new tokens, {args.rounds} rounds, "
          f"load {load[0]:.1f} at start, {load[1]:.1f} at end")
    print("| decoder | start s | s per round (median) | tokens/s (rounds) |\n| --- | ---: | ---: | --- |")
    for n in decoders:
        print(f"| {n} | {started[n]:.1f} | {statistics.median(seconds[n]):.2f} | "
              f"{statistics.median(rate[n]):.0f} ({', '.join(f'{x:.0f}' for x in rate[n])}) |")
    print(f"engine-core / worker-process tokens/s: {statistics.median(ratios):.2f}x "
          f"({', '.join(f'{x:.2f}' for x in ratios)}); the same answers: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "load": load, "start_s": started,
                                               "seconds": seconds, "tokens": tokens, "ratios": ratios,
                                               "same_answers": same}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
