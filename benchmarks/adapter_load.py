"""Many adapters behind one endpoint: one replica serving 1, 4 and 8 LoRA adapters on one base, against the base alone.

    python -m benchmarks.adapter_load [--model tiny|smollm2|DIR] [--adapters 1 4 8] [--concurrency 32]
                                      [--requests 64] [--rounds 2] [--max-tokens 32] [--rank 8] [--load even|mixed]
                                      [--base-lora]

What it builds: the model (as benchmarks/serve_load.py builds it), its crlft base (`crlft.export.write_base`, in a
temporary state dir) and as many adapters as the largest count asked for (`adapter-0` ...), each made without
training: the base wrapped as C-RLFT's LoRA training wraps it (`crlft.train.wrap.wrap_lora`, train.lora.merge false,
rank `--rank` on every linear layer) with random LoRA weights seeded per adapter, saved with
`crlft.export.save_adapter`. Throughput does not depend on the weights' values, only on their shapes.

What it measures, in one run, each configuration a deploy of its own (`services.local.deploy`, vLLM engine, one replica
with 2 CPUs, behind the HAProxy ingress `crlft serve` uses) and a `services.local.shutdown` of Serve after it:
- `base`: the crlft base served as a model, no adapters (vLLM without LoRA): what one merged fine-tune alone costs,
  since a merged model has the same shapes;
- `adapters-N`: the same base with N adapters (serve.adapters: the folders; inference.max_loras = N, so every adapter
  stays loaded), under a mixed load: request i names adapter i mod N;
- `base-lora` (with `--base-lora`): the replica of `adapters-1` (LoRA on) asked for the base only, so no batch holds an
  adapter: what turning LoRA on costs the requests that name no adapter, apart from the adapters' products.
Each round deploys every configuration in turn (the order rotates between rounds, as serve_load's does, since on a
shared machine the load of other work drifts); a configuration first serves C requests at the measured load (first
touches, each adapter's load into the engine included), then 8 at 4 streams, then the measured load: C streamed
greedy requests at a time, `--requests` in all (serve_load's load generator). `--load even` (the default): one short
prompt each and a budget of `--max-tokens` tokens, so requests start and end together and a batch holds as many tokens
of each adapter; `--load mixed` (serve_load's `mixed_requests`): budgets of a quarter to twice `--max-tokens`, so
requests end at different times and, with more requests than streams, a new prompt's prefill joins other adapters'
decoding: batches where one adapter has most of the tokens.

How to read it, per configuration (medians of the rounds): output tokens/s with each round's, p50/p99 latency, errors;
the ratio of its tokens/s to `base` in the same round (issue #27's goal: 8 adapters >= 0.8x); the resident memory
(RSS) of the replica's vLLM engine-core process, which holds the weights, the KV cache and the adapters, after the load,
and for N adapters the difference per added adapter against 1 adapter ((RSS_N - RSS_1) / (N - 1); goal: under 5% of
the base's weights, whose size on disk is printed). LoRA itself (any adapter against none) shows in `adapters-1`
against `base`, LoRA turned on with no adapter in a batch in `base-lora`: vLLM preallocates its adapter slots
(max_loras x max_lora_rank) at start. The RSS of one configuration moves by tens of MiB, up to 150, between rounds
(the allocator, the KV cache's touched pages): the figure by the shapes is the steadier one, what vLLM holds per
adapter whatever the allocator does: its slot (A and B of every adapted layer at max_lora_rank, in the engine's number
type) and the adapter as loaded (its weights, kept in vLLM's adapter cache,
max_cpu_loras = max_loras), printed in the header and beside the goals. Exit status 1 when a request got a 5xx, else
0 (the goals are reported, not enforced); Ctrl-C reports the configurations measured so far and exits 130.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from itertools import cycle
from pathlib import Path

import httpx

from benchmarks.serve_load import (
    REPLICA_CPUS,
    LevelResult,
    Server,
    TokenCounter,
    build_model,
    load_level,
    median,
    mixed_budgets,
)
from cluster.session import free_port, ingress_env
from crlft.config import Config, load_config
from crlft.environ import environment
from crlft.errors import CrlftError
from crlft.inference.engine import slot_rank

GOAL_RATIO_8 = 0.8  # issue #27: 8 adapters in one replica >= 0.8x the tokens/s of one merged model
GOAL_MEMORY_SHARE = 0.05  # and memory per added adapter under 5% of the base
BASE = "base"
BASE_LORA = "base-lora"
MIB = 1 << 20


class RoundRobin(Server):
    """A Server whose `model` names the next adapter each time it is read: serve_load's `load_level` reads it once per
    request it queues, so request i goes to adapter i mod N."""

    def __init__(self, name: str, url: str, models: list[str]) -> None:
        self.name, self.url, self.models = name, url, models
        self._next = cycle(models)

    @property  # type: ignore[override]  # a field in Server
    def model(self) -> str:
        return next(self._next)


@dataclass
class Measured:
    config: str
    adapters: int
    level: LevelResult
    engine_rss: int | None  # bytes; None when the engine core was not found
    start_s: float


# ---------------------------------------------------------------------------------------------------------------------
# The base and the adapters


def make_adapters(model_dir: Path, cfg: Config, out: Path, count: int) -> tuple[Path, list[Path]]:
    """The crlft base of the model at `model_dir` (under cfg.state_dir) and `count` adapters on it, with random LoRA
    weights (seed i for adapter-i): what `crlft train --lora --set train.lora.merge=false` exports, untrained."""
    import torch

    from crlft.export import ModelMeta, save_adapter, write_base
    from crlft.model import load_model_and_tokenizer
    from crlft.train.wrap import wrap_lora

    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    base_dir = write_base(model, tokenizer, cfg)
    meta = ModelMeta.from_config(cfg)
    folders = []
    for i in range(count):
        if i:  # get_peft_model wraps the model in place: a fresh base for every adapter
            model, tokenizer = load_model_and_tokenizer(str(base_dir))
        wrapped = wrap_lora(model, cfg.train.lora, [])
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in wrapped.named_parameters():
                if "lora_" in name:  # small: the answers stay the base's, the work is the same
                    param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.01)
        folders.append(save_adapter(wrapped, tokenizer, out / f"adapter-{i}", meta, base_dir))
    return base_dir, folders


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def slot_bytes(adapter: Path, max_lora_rank: int, precision: str) -> int:
    """What vLLM allocates per adapter slot by the shapes alone: for every adapted layer, A (max_lora_rank x in) and B
    (out x max_lora_rank) in the engine's number type (vllm/lora/layers/base_linear.py, create_lora_weights)."""
    from safetensors import safe_open

    width = 0
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
            shape = f.get_slice(key).get_shape()
            width += shape[1] if "lora_A" in key else shape[0] if "lora_B" in key else 0
    return width * max_lora_rank * (2 if precision == "bf16" else 4)


# ---------------------------------------------------------------------------------------------------------------------
# One configuration


def engine_core_rss() -> int | None:
    """RSS of the vLLM engine-core process under this process (this benchmark's own Ray: its raylet starts the replica,
    the replica its engine core), not another session's on the same machine."""
    import psutil

    found = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in process.name() or "EngineCore" in " ".join(process.cmdline()):
                found.append(process.memory_info().rss)
    return max(found) if found else None


def served_models(url: str) -> list[str]:
    response = httpx.get(url + "/v1/models", timeout=30)
    response.raise_for_status()
    return [m["id"] for m in response.json()["data"]]


def measure(config: str, adapters: list[Path], base_dir: Path, args: argparse.Namespace, state: Path,
            count: TokenCounter) -> Measured:
    """Deploy one configuration, load it, read its engine's memory, stop Serve. `base-lora`: the requests name the
    base, not the adapters."""
    from services.local import deploy, shutdown

    cfg = load_config(None, {
        "state_dir": str(state), "serve.port": free_port(), "inference.engine": "vllm",
        "inference.precision": args.precision, "serve.cpus_per_replica": REPLICA_CPUS, "serve.min_replicas": 1,
        "serve.max_replicas": 1, "inference.max_batch_size": 32, "serve.max_ongoing_requests": 64,
        "serve.max_queued_requests": 64, "inference.vllm_kv_cache_gib": args.kv_cache_gib, "serve.access_log": False,
        "serve.adapters": [str(a) for a in adapters], "inference.max_loras": max(1, len(adapters)),
        "inference.max_lora_rank": args.max_lora_rank,
    })
    started = time.perf_counter()
    try:
        url = deploy(None if adapters else str(base_dir), cfg, name="bench-adapters", timeout_s=900)
        start_s = time.perf_counter() - started
        names = served_models(url)
        if adapters:
            base_name = cfg.registry.base_model_name
            wanted = [n for n in names if n != base_name]
            if len(wanted) != len(adapters):
                raise RuntimeError(f"{config}: /v1/models lists {names}, expected {base_name} and {len(adapters)} "
                                   "adapters")
            server: Server = RoundRobin(config, url, [base_name] if config == BASE_LORA else wanted)
        else:
            server = Server(config, url, names[0])
        asyncio.run(load_level(server, args.concurrency, args.concurrency, args.max_tokens, count))  # first touch
        asyncio.run(load_level(server, 4, 8, args.max_tokens, count))  # warm up
        level = asyncio.run(load_level(server, args.concurrency, args.requests, args.max_tokens, count,
                                       mixed=args.load == "mixed"))
        rss = engine_core_rss()
    finally:
        shutdown(shutdown_ray=False)
    return Measured(config, 0 if config == BASE_LORA else len(adapters), level, rss, start_s)


# ---------------------------------------------------------------------------------------------------------------------
# Report


def report(runs: list[Measured], args: argparse.Namespace) -> str:
    names = list(dict.fromkeys(m.config for m in runs))
    by_name = {name: [m for m in runs if m.config == name] for name in names}
    rounds = {name: {i: m for i, m in enumerate(ms)} for name, ms in by_name.items()}
    rss = {name: _median_or_none([m.engine_rss for m in ms]) for name, ms in by_name.items()}
    base_weights = weights_bytes(args.base_dir)
    slot = slot_bytes(args.adapter_dirs[0], args.max_lora_rank, args.precision)
    held = slot + weights_bytes(args.adapter_dirs[0])  # per adapter: its slot and its loaded weights
    budget = f"up to {args.max_tokens}"
    if args.load == "mixed":
        budget = "{} to {}".format(*mixed_budgets(args.max_tokens))
    lines = [
        f"model: {args.model_desc}; {args.precision}; base weights {base_weights / MIB:.1f} MiB, each adapter "
        f"{weights_bytes(args.adapter_dirs[0]) / MIB:.2f} MiB on disk (rank {args.rank}, all linear layers; "
        f"inference.max_lora_rank {args.max_lora_rank}; by the shapes vLLM holds per adapter {held / MIB:.2f} MiB, "
        f"{held / base_weights:.1%} of the base: a slot of {slot / MIB:.2f} MiB and the adapter as loaded); "
        f"{args.concurrency} concurrent streams, {args.requests} greedy requests of {budget} tokens "
        f"({args.load} load) per configuration and round, spread round-robin over the adapters; {args.rounds} "
        f"round{'s' if args.rounds != 1 else ''} (order rotated), medians; one replica, {REPLICA_CPUS} CPUs; "
        f"load average {args.load_average[0]:.1f} at the start, {args.load_average[1]:.1f} at the end on "
        f"{os.cpu_count()} cores",
        "",
        "| configuration | output tok/s (rounds) | / base, same round (rounds) | p50 latency s | p99 latency s "
        "| errors | engine core RSS MiB | per added adapter vs 1 adapter MiB | start s |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    one = next((n for n in names if by_name[n][0].adapters == 1), None)
    for name, ms in by_name.items():
        errors: dict[str, int] = {}
        for m in ms:
            for kind, n in m.level.errors.items():
                errors[kind] = errors.get(kind, 0) + n
        ratios = [m.level.tokens_per_s / rounds[BASE][i].level.tokens_per_s
                  for i, m in enumerate(ms) if BASE in rounds and i in rounds[BASE]]
        ratio = f"{median(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})" if name != BASE and ratios else "-"
        added = ms[0].adapters
        per_adapter = ((rss[name] - rss[one]) / (added - 1) / MIB
                       if one and added > 1 and rss[name] is not None and rss[one] is not None else None)
        lines.append(
            f"| {name} | {median([m.level.tokens_per_s for m in ms]):.1f} "
            f"({', '.join(f'{m.level.tokens_per_s:.0f}' for m in ms)}) | {ratio} "
            f"| {median([m.level.latency_p50_s for m in ms]):.3f} | {median([m.level.latency_p99_s for m in ms]):.3f} "
            f"| {', '.join(f'{k}: {v}' for k, v in errors.items()) or 0} "
            f"| {'-' if rss[name] is None else f'{rss[name] / MIB:.0f}'} "
            f"| {'-' if per_adapter is None else f'{per_adapter:+.1f}'} "
            f"| {median([m.start_s for m in ms]):.0f} |")
    eight = next((n for n in names if by_name[n][0].adapters == 8), None)
    if eight and BASE in by_name:
        ratio = median([m.level.tokens_per_s / b.level.tokens_per_s
                        for m, b in zip(by_name[eight], by_name[BASE], strict=False)])
        verdict = "met" if ratio >= GOAL_RATIO_8 else "not met"
        goal = [f"8 adapters / base {ratio:.2f}x (goal >= {GOAL_RATIO_8}x: {verdict})"]
        memory = f"memory per added adapter (goal < {GOAL_MEMORY_SHARE:.0%} of the base's weights): by the shapes " \
                 f"{held / base_weights:.1%} ({'met' if held / base_weights < GOAL_MEMORY_SHARE else 'not met'})"
        spread = max((max(known) - min(known) for ms in by_name.values()
                      if (known := [m.engine_rss for m in ms if m.engine_rss is not None])), default=0)
        if one and rss[eight] is not None and rss[one] is not None:
            added = rss[eight] - rss[one]
            if added <= spread:  # the RSS of one configuration moves more between rounds than 7 adapters add
                memory += (f"; by the engine core's RSS not measurable: 1 -> 8 adapters {added / MIB:+.0f} MiB, "
                           f"within the RSS's spread between rounds ({spread / MIB:.0f} MiB)")
            else:
                share = added / 7 / base_weights
                verdict = "met" if share < GOAL_MEMORY_SHARE else "not met"
                memory += f"; by the engine core's RSS {share:.1%} ({verdict}; spread between rounds " \
                          f"{spread / MIB:.0f} MiB)"
        goal.append(memory)
        lines += ["", "issue #27's goals: " + "; ".join(goal)]
    return "\n".join(lines)


def _median_or_none(values: list[int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return median(known) if known else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="tiny", help="tiny (built here), smollm2, or an exported model folder")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 8], help="adapter counts, one replica each")
    parser.add_argument("--rank", type=int, default=Config().train.lora.r, help="the adapters' LoRA rank")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64, help="requests per configuration per round")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--load", choices=["even", "mixed"], default="even",
                        help="even: the same budget each, so the requests run in step; mixed: budgets of a quarter to "
                        "twice --max-tokens, so new prompts' prefills join other adapters' decoding (give more "
                        "--requests than --concurrency)")
    parser.add_argument("--base-lora", action="store_true",
                        help="also measure base-lora: the replica of adapters-1 asked for the base only")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kv-cache-gib", type=int, default=2, help="vLLM on CPU: the engine's KV cache")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    try:  # the slots' rank a replica chooses for these adapters by default
        args.max_lora_rank = slot_rank(Config().inference.max_lora_rank, [args.rank])
    except CrlftError as exc:
        parser.error(f"--rank {args.rank}: {exc}")

    import ray

    from services.local import shutdown

    configs = [BASE, *([BASE_LORA] if args.base_lora else []), *(f"adapters-{n}" for n in args.adapters)]
    counts = {BASE: 0, BASE_LORA: 1, **{f"adapters-{n}": n for n in args.adapters}}
    with tempfile.TemporaryDirectory(prefix="adapter-load-") as scratch, contextlib.ExitStack() as stack:
        scratch_dir = Path(scratch)
        state = scratch_dir / "state"
        model_dir = build_model(args.model, scratch_dir)
        args.model_desc = {"tiny": "tiny Llama (4 layers, hidden 128), untrained",
                           "smollm2": "SmolLM2-135M-Instruct, crlft template, not fine-tuned"}.get(args.model,
                                                                                                 args.model)
        cfg = load_config(None, {"state_dir": str(state), "train.lora.enabled": True, "train.lora.merge": False,
                                 "train.lora.r": args.rank})
        args.base_dir, args.adapter_dirs = make_adapters(model_dir, cfg, scratch_dir / "adapters", max(args.adapters))
        count = TokenCounter(args.base_dir)
        args.load_average = [os.getloadavg()[0]]
        with environment(ingress_env(Config())):  # HAProxy, as `crlft serve` starts it
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        stack.callback(shutdown)
        runs: list[Measured] = []
        interrupted = False
        try:
            for r in range(args.rounds):
                for config in configs[r % len(configs):] + configs[: r % len(configs)]:
                    runs.append(measure(config, args.adapter_dirs[: counts[config]], args.base_dir, args, state,
                                        count))
                    m = runs[-1]
                    print(f"round {r + 1} {config}: {m.level.tokens_per_s:.1f} tok/s, engine core "
                          f"{'?' if m.engine_rss is None else f'{m.engine_rss / MIB:.0f}'} MiB, "
                          f"start {m.start_s:.0f} s", file=sys.stderr)
        except KeyboardInterrupt:  # Ctrl-C: the configurations measured so far are still reported
            if not runs:
                raise
            interrupted = True
            print(f"interrupted: reporting the {len(runs)} configuration runs measured", file=sys.stderr)
        args.rounds = len({i for i in range(args.rounds) if i * len(configs) < len(runs)})
        args.load_average.append(os.getloadavg()[0])
        runs.sort(key=lambda m: configs.index(m.config))  # stable: each configuration's rounds in order
        table = report(runs, args)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(m) | {"tokens_per_s": m.level.tokens_per_s} for m in runs],
                                              indent=2))
    if any(m.level.server_errors for m in runs):
        print("\nMISSED: zero 5xx", file=sys.stderr)
        return 1
    return 130 if interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
