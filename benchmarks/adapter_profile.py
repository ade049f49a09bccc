"""Where serving adapters spends its time: offline vLLM with its engine core in this process, the base alone against 1
and N adapters in the same run, then a cProfile of the N-adapter run.

    python -m benchmarks.adapter_profile [--model smollm2|tiny|DIR] [--adapters 8] [--rounds 2] [--top 20]

What it runs: the model's crlft base and N untrained adapters (rank `--rank`, every linear layer), built as
benchmarks/adapter_load.py builds them; one `vllm.LLM` in float32 with LoRA on (max_loras N, slots of the adapters'
rank), its engine core in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that one profiler sees the model's forward
passes. Each round generates 32 prompts of 40 tokens, 32 greedy tokens each, with no adapter, with one adapter for
all, and round-robin over N adapters, in that order. It prints tokens/s and the ratio to the base of the same round,
then the functions that took the most time in one more N-adapter run. No HTTP, no Serve: benchmarks/adapter_load.py
measures the endpoint.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from pathlib import Path

from benchmarks.adapter_load import make_adapters
from benchmarks.serve_load import build_model
from crlft.config import load_config
from crlft.inference.engine import slot_rank
from crlft.inference.vllm_engine import IN_ENGINE_CORE

PROMPTS, PROMPT_TOKENS, MAX_TOKENS = 32, 40, 32


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="smollm2", help="tiny (built here), smollm2, or an exported model folder")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--top", type=int, default=20, help="functions listed from the profile")
    args = parser.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, where cProfile sees it

    tmp = Path(tempfile.mkdtemp(prefix="crlft-adapter-profile-"))
    cfg = load_config(None, {"state_dir": str(tmp / "state"), "train.lora.enabled": True,
                             "train.lora.merge": False, "train.lora.r": args.rank})  # fmt: skip
    base, adapters = make_adapters(build_model(args.model, tmp), cfg, tmp / "adapters", args.adapters)

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=str(base), dtype="float32", enable_lora=True, max_loras=args.adapters,
              max_cpu_loras=args.adapters, max_lora_rank=slot_rank(None, [args.rank]), max_num_seqs=PROMPTS,
              enforce_eager=True, skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 30, max_model_len=512,
              **IN_ENGINE_CORE)  # fmt: skip
    prompts = [{"prompt_token_ids": list(range(100 + i, 100 + i + PROMPT_TOKENS))} for i in range(PROMPTS)]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    requests = [LoRARequest(f"adapter-{i}", i + 1, str(path)) for i, path in enumerate(adapters)]

    def tokens_per_s(count: int) -> float:
        lora = None if count == 0 else [requests[i % count] for i in range(PROMPTS)]
        started = time.perf_counter()
        llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        return PROMPTS * MAX_TOKENS / (time.perf_counter() - started)

    counts = (0, 1, args.adapters)
    for count in counts:  # warm-up: every adapter loaded
        tokens_per_s(count)
    print(f"model {args.model}, {args.adapters} adapters of rank {args.rank}, load average "
          f"{os.getloadavg()[0]:.1f}")
    for round_ in range(args.rounds):
        rates = {count: tokens_per_s(count) for count in counts}
        print(f"round {round_ + 1}: " + ", ".join(
            f"{'base' if c == 0 else f'{c} adapter(s)'} {r:.1f} tok/s" + ("" if c == 0 else f" ({r / rates[0]:.2f}x)")
            for c, r in rates.items()))  # fmt: skip
    profile = cProfile.Profile()
    profile.enable()
    tokens_per_s(args.adapters)
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
