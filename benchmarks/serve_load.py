"""Serving load benchmark: this endpoint on each engine against the servers a user could pick instead.

    python -m benchmarks.serve_load [--model tiny|smollm2|DIR] [--precision fp32|bf16] [--concurrency 32]
                                    [--rounds 3] [--max-tokens 32]

In one run, on the same exported folder and the same prompts, five OpenAI-compatible servers on loopback:
- `crlft-vllm`: this endpoint (Ray Serve, services/chat.py) with inference.engine=vllm, behind the ingress `crlft serve`
  puts in front (serve.ingress=haproxy: Ray Serve's HAProxy ingress);
- `crlft-transformers`: this endpoint with the transformers engine (crlft.inference.generate);
- `crlft-vllm-serve-proxy`: the same vLLM app through Serve's Python proxy instead (serve.ingress=serve-proxy; in
  HAProxy mode Serve keeps it running as HAProxy's fallback, on a port of its own): what the ingress changes;
- `vllm`: standalone vLLM (`python -m vllm.entrypoints.openai.api_server`), the peer for the vLLM engine;
- `transformers-serve`: `transformers serve --continuous-batching`, the peer for the transformers engine;
- `crlft-vllm-store` (only when named in `--servers`): `crlft-vllm` storing every completion (serve.store, by
  default on) in a local completion store: what storing costs (goal: >= 0.95x `crlft-vllm`).

Each round measures every server in turn (the order rotates between rounds, since on a shared machine the load of
other work drifts): C streamed greedy requests at a time, `--requests` in all, after each server has once served C
requests at that load (first touches are not steady state). Reported per server (medians of the rounds): output
tokens/s (from each answer's usage where the server reports it, else the answer re-tokenized), p50/p99 latency and
time to first token, errors by kind. Ratios, for the servers that ran: crlft-vllm against standalone vLLM (goal >=
0.9x) and against transformers serve (goal >= 1.2x), and the endpoint's two engines against each other. Before the
load, every server answers the same prompts greedily and non-streamed: the share of answers equal to crlft's
transformers engine in float32 (run in this process) is the agreement column (float32 servers should agree; bf16
shows what the number type changes).

Servers get the same CPUs and priority: each endpoint replica 2 CPUs (torch threads 2), standalone vLLM as many model
threads as the endpoint gives its vLLM engine (`crlft.inference.vllm_engine.engine_threads`: both cores for a
real model in float32, else one, as vLLM's own default), pinned by vLLM; transformers serve torch's default threads;
the peers run at the niceness Ray gives its workers. Exit status 1 when a goal is missed or any request got a 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cluster.haproxy_pages import fallback_proxy_port
from cluster.session import free_port, ingress_env
from crlft.config import Config, load_config
from crlft.data.template import Template
from crlft.environ import environment
from crlft.export import ModelMeta, save_exported

TOPICS = ["the moon", "a binary search", "prime numbers", "a good breakfast", "the river", "Python lists",
          "learning to cook", "the weather", "photosynthesis", "a healthy habit", "three apples", "the red box"]
GOAL_VS_VLLM = 0.9
GOAL_VS_TRANSFORMERS_SERVE = 1.2
GOAL_STORE = 0.95
SERVED = "bench"
REPLICA_CPUS = 2


def prompts(n: int) -> list[str]:
    return [f"Tell me about {TOPICS[i % len(TOPICS)]}, part {i // len(TOPICS) + 1}." for i in range(n)]


def mixed_budgets(max_tokens: int) -> tuple[int, int]:
    """The fewest and most tokens a request of the mixed load may ask for: a quarter to twice `max_tokens`."""
    return max(1, max_tokens // 4), 2 * max_tokens


def mixed_requests(n: int, max_tokens: int) -> list[tuple[str, int]]:
    """(prompt, token budget) of n requests that end at different times: `prompts`, each with a budget drawn from
    `mixed_budgets` (seeded, so every server gets the same load). With more requests than streams, a new prompt's
    prefill joins the other requests' decoding. (Prompts with sentences of context before them made the model answer
    in a few tokens, so that prefill, not answers, filled the time.)"""
    rng = random.Random(0)
    low, high = mixed_budgets(max_tokens)
    return [(text, rng.randint(low, high)) for text in prompts(n)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Server:
    name: str
    url: str  # base URL; clients use URL + /v1
    model: str  # what requests put in `model`


@dataclass
class LevelResult:
    server: str
    concurrency: int
    requests: int
    ok: int
    wall_s: float
    output_tokens: int
    latency_p50_s: float
    latency_p99_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def server_errors(self) -> int:
        return sum(n for kind, n in self.errors.items() if kind.startswith("5"))


# ---------------------------------------------------------------------------------------------------------------------
# Load


class TokenCounter:
    """Completion tokens of an answer: the server's usage when it reports it, else the text re-tokenized."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def __call__(self, usage: dict[str, Any] | None, text: str) -> int:
        if usage and usage.get("completion_tokens") is not None:
            return int(usage["completion_tokens"])
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


async def one_request(client: httpx.AsyncClient, server: Server, body: dict[str, Any],
                      count: TokenCounter) -> tuple[str, float, float, int]:
    """(outcome, latency, time to first token, completion tokens); outcome is "ok", an HTTP status or an exception."""
    started = time.perf_counter()
    first = float("nan")
    text, usage = "", None
    try:
        async with client.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return str(response.status_code), time.perf_counter() - started, first, 0
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return "500-in-stream", time.perf_counter() - started, first, 0
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        text += piece
                        if first != first:  # NaN: not seen yet
                            first = time.perf_counter() - started
    except httpx.HTTPError as exc:
        return type(exc).__name__, time.perf_counter() - started, first, 0
    return "ok", time.perf_counter() - started, first, count(usage, text)


def request_body(server: Server, text: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": server.model, "messages": [{"role": "user", "content": text}],
                            "max_tokens": max_tokens, "temperature": 0.0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def load_level(server: Server, concurrency: int, total: int, max_tokens: int, count: TokenCounter,
                     mixed: bool = False) -> LevelResult:
    """`total` streamed greedy requests, `concurrency` at a time: one short prompt each, up to `max_tokens` tokens, or
    `mixed_requests`."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    requests = mixed_requests(total, max_tokens) if mixed else [(text, max_tokens) for text in prompts(total)]
    for text, budget in requests:
        queue.put_nowait(request_body(server, text, budget, stream=True))
    outcomes: list[tuple[str, float, float, int]] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            outcomes.append(await one_request(client, server, queue.get_nowait(), count))

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ok = [o for o in outcomes if o[0] == "ok"]
    errors: dict[str, int] = {}
    for outcome, *_ in outcomes:
        if outcome != "ok":
            errors[outcome] = errors.get(outcome, 0) + 1
    latencies = [o[1] for o in ok]
    ttfts = [o[2] for o in ok if o[2] == o[2]]
    return LevelResult(server.name, concurrency, len(outcomes), len(ok), wall, sum(o[3] for o in ok),
                       percentile(latencies, 0.5), percentile(latencies, 0.99),
                       percentile(ttfts, 0.5), percentile(ttfts, 0.99), errors)


def greedy_answers(server: Server, texts: list[str], max_tokens: int) -> list[str]:
    with httpx.Client(timeout=600) as client:
        answers = []
        for text in texts:
            response = client.post(server.url + "/v1/chat/completions",
                                   json=request_body(server, text, max_tokens, stream=False))
            response.raise_for_status()
            answers.append(response.json()["choices"][0]["message"]["content"] or "")
        return answers


def reference_answers(model_dir: Path, texts: list[str], max_tokens: int) -> list[str]:
    """crlft's transformers engine in float32, in this process: what every server's greedy answers are compared with."""
    from crlft.data.records import Message
    from crlft.export import load_exported
    from crlft.inference.generate import BatchGenerator, GenerationRequest
    from crlft.inference.sampling import SamplingParams

    exported = load_exported(model_dir)
    engine = BatchGenerator(exported.model, exported.tokenizer, exported.stop_ids)
    requests = [GenerationRequest(exported.template_tokenizer.tokenize_prompt([Message("user", text)]),
                                  SamplingParams(max_tokens, 0.0)) for text in texts]
    return [done.text for done in engine.generate(requests)]


# ---------------------------------------------------------------------------------------------------------------------
# Servers


def build_model(which: str, out: Path) -> Path:
    """An exported folder: `tiny` (built here, untrained), `smollm2` (SmolLM2-135M-Instruct with crlft's template, not
    fine-tuned), or an exported folder as it is."""
    from crlft.model import import_model, load_model_and_tokenizer
    from crlft.presets import init_model

    if which not in ("tiny", "smollm2"):
        return Path(which)
    cfg = Config()
    if which == "tiny":
        base = init_model(out / "base")
    else:
        base = import_model("smollm2", out / "base", Template.from_config(cfg).chat_template(),
                            cfg.template.end_of_turn)
    model, tokenizer = load_model_and_tokenizer(str(base))
    return save_exported(model, tokenizer, out / "exported", ModelMeta.from_config(cfg))


def wait_http(url: str, process: subprocess.Popen[bytes] | None = None, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with status {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"{url} was not up after {timeout_s:.0f} s")


def ray_worker_niceness() -> int:
    import ray

    return int(ray.get(ray.remote(num_cpus=0)(lambda: os.getpriority(os.PRIO_PROCESS, 0)).remote()))


@contextlib.contextmanager
def subprocess_server(name: str, command: list[str], health: str, port: int, model: str,
                      env: dict[str, str] | None = None) -> Iterator[Server]:
    """A peer server in its own process, at the priority Ray gives its workers (the endpoint's replicas, and vLLM's
    engine under them, run reniced: on a shared machine a peer at normal priority would win CPU from them)."""
    log = open(Path(tempfile.gettempdir()) / f"serve-load-{name}.log", "wb")  # noqa: SIM115 (closed below)
    niceness = ray_worker_niceness() - os.getpriority(os.PRIO_PROCESS, 0)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                               preexec_fn=lambda: os.nice(niceness))
    try:
        wait_http(f"http://127.0.0.1:{port}{health}", process)
        yield Server(name, f"http://127.0.0.1:{port}", model)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def vllm_server(model_dir: Path, precision: str, kv_cache_gib: int) -> contextlib.AbstractContextManager[Server]:
    from crlft.inference.engine import serving_dtype
    from crlft.inference.vllm_engine import engine_threads
    from crlft.model import parameter_count

    threads = engine_threads(REPLICA_CPUS, parameter_count(str(model_dir)), serving_dtype(precision, "cpu"))
    # vLLM's default pins one thread and leaves a core to its frontend: the same as the endpoint's engine or told so.
    binding = {} if threads == REPLICA_CPUS - 1 else {"VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", SERVED, "--dtype", "bfloat16" if precision == "bf16" else "float32",
               "--port", str(port), "--host", "127.0.0.1", "--enforce-eager", "--max-num-seqs", "32"]
    return subprocess_server("vllm", command, "/health", port, SERVED,
                             env={"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), **binding})


def transformers_server(model_dir: Path, precision: str) -> contextlib.AbstractContextManager[Server]:
    port = free_port()
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir), "--continuous-batching",
               "--device", "cpu", "--dtype", "bfloat16" if precision == "bf16" else "float32",
               "--host", "127.0.0.1", "--port", str(port),
               # Its KV cache, in blocks of 32 tokens: 8192 tokens, room for every stream (unbounded, it takes most of
               # the machine's memory on CPU and is killed).
               "--cb-block-size", "32", "--cb-num-blocks", "256"]
    return subprocess_server("transformers-serve", command, "/health", port, str(model_dir))


def through_serve_proxy(server: Server, fallback_port: int) -> Server:
    """The same app through Serve's Python proxy, which HAProxy mode keeps as its fallback on `fallback_port`."""
    url = httpx.URL(server.url)
    return Server(server.name + "-serve-proxy", str(url.copy_with(port=fallback_port)), server.model)


CRLFT_APPS = {  # server name -> (engine, stores its completions)
    "crlft-vllm": ("vllm", False),
    "crlft-transformers": ("transformers", False),
    "crlft-vllm-store": ("vllm", True),
}


def crlft_servers(names: list[str], model_dir: Path, precision: str, state: Path, kv_cache_gib: int) -> list[Server]:
    """The endpoint apps named (of CRLFT_APPS) in one Serve instance (call `services.local.shutdown` afterwards)."""
    from services.local import deploy

    servers = []
    port = free_port()
    wanted = {*names, *(["crlft-vllm"] if "crlft-vllm-serve-proxy" in names else [])}  # the proxy's app
    for name in [n for n in CRLFT_APPS if n in wanted]:
        engine, store = CRLFT_APPS[name]
        cfg = load_config(None, {
            "state_dir": str(state), "serve.port": port, "inference.engine": engine, "inference.precision": precision,
            "serve.cpus_per_replica": REPLICA_CPUS, "serve.min_replicas": 1, "serve.max_replicas": 1,
            "inference.max_batch_size": 32, "serve.max_ongoing_requests": 64, "serve.max_queued_requests": 64,
            "inference.vllm_kv_cache_gib": kv_cache_gib, "serve.model_name": SERVED, "serve.access_log": False,
            "serve.store.uri": str(state / "store") if store else None, "serve.store.by_default": store,
        })
        url = deploy(str(model_dir), cfg, name=f"bench-{name}", route_prefix=f"/{name}", timeout_s=900)
        servers.append(Server(name, url, SERVED))
    return servers


# ---------------------------------------------------------------------------------------------------------------------
# Report


def report(levels: list[LevelResult], agreement: dict[str, float], args: argparse.Namespace) -> tuple[str, dict]:
    names = list(dict.fromkeys(level.server for level in levels))
    by_name = {name: [x for x in levels if x.server == name] for name in names}
    tps = {name: median([x.tokens_per_s for x in runs]) for name, runs in by_name.items()}
    lines = [
        f"model: {args.model_desc}; {args.precision}; {args.concurrency} concurrent streams, {args.requests} greedy "
        f"requests of up to {args.max_tokens} tokens per round; {args.rounds} rounds (order rotated), medians; load "
        f"average {args.load[0]:.1f} at the start, {args.load[1]:.1f} at the end on {os.cpu_count()} cores",
        "",
        "| server | output tok/s (rounds) | p50 latency s | p99 latency s | p50 TTFT s | p99 TTFT s "
        "| greedy answers = crlft engine fp32 | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, runs in by_name.items():
        errors: dict[str, int] = {}
        for run in runs:
            for kind, n in run.errors.items():
                errors[kind] = errors.get(kind, 0) + n
        lines.append(
            f"| {name} | {tps[name]:.1f} ({', '.join(f'{x.tokens_per_s:.0f}' for x in runs)}) "
            f"| {median([x.latency_p50_s for x in runs]):.3f} | {median([x.latency_p99_s for x in runs]):.3f} "
            f"| {median([x.ttft_p50_s for x in runs]):.3f} | {median([x.ttft_p99_s for x in runs]):.3f} "
            f"| {agreement.get(name, float('nan')):.0%} | {', '.join(f'{k}: {v}' for k, v in errors.items()) or 0} |")
    ratios = {
        "crlft-vllm / vllm": _round_ratio(by_name, "crlft-vllm", "vllm"),
        "crlft-vllm / transformers-serve": _round_ratio(by_name, "crlft-vllm", "transformers-serve"),
        "crlft-vllm / crlft-vllm-serve-proxy": _round_ratio(by_name, "crlft-vllm", "crlft-vllm-serve-proxy"),
        "crlft-transformers / transformers-serve": _round_ratio(by_name, "crlft-transformers", "transformers-serve"),
        "crlft-vllm / crlft-transformers": _round_ratio(by_name, "crlft-vllm", "crlft-transformers"),  # the engine
        "crlft-vllm-store / crlft-vllm": _round_ratio(by_name, "crlft-vllm-store", "crlft-vllm"),  # serve.store
    }
    lines += ["", "| ratio (output tok/s, same round) | median | rounds |", "| --- | ---: | --- |"]
    for label, values in ratios.items():
        if values:  # both servers ran (--servers)
            lines.append(f"| {label} | {median(values):.2f}x | {', '.join(f'{v:.2f}' for v in values)} |")
    return "\n".join(lines), ratios


def _round_ratio(by_name: dict[str, list[LevelResult]], top: str, bottom: str) -> list[float]:
    if top not in by_name or bottom not in by_name:
        return []
    return [a.tokens_per_s / b.tokens_per_s for a, b in zip(by_name[top], by_name[bottom], strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="tiny", help="tiny (built here), smollm2, or an exported model folder")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64, help="requests per server per round")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--agreement-prompts", type=int, default=12, help="greedy answers compared per server")
    parser.add_argument("--kv-cache-gib", type=int, default=2, help="vLLM on CPU: KV cache per server")
    parser.add_argument("--servers", nargs="+", default=["crlft-vllm", "crlft-vllm-serve-proxy", "crlft-transformers",
                                                         "vllm", "transformers-serve"])
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    import ray

    from services.local import shutdown

    with tempfile.TemporaryDirectory(prefix="serve-load-") as scratch, contextlib.ExitStack() as stack:
        model_dir = build_model(args.model, Path(scratch))
        args.model_desc = {"tiny": "tiny Llama (4 layers, hidden 128), untrained",
                           "smollm2": "SmolLM2-135M-Instruct, crlft template, not fine-tuned"}.get(args.model,
                                                                                                 args.model)
        args.load = [os.getloadavg()[0]]
        count = TokenCounter(model_dir)
        servers = []
        with environment(ingress_env(Config())):  # HAProxy, as `crlft serve` starts it
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        stack.callback(shutdown)
        crlft = crlft_servers(args.servers, model_dir, args.precision, Path(scratch) / "state", args.kv_cache_gib)
        crlft += [through_serve_proxy(s, fallback_proxy_port())
                  for s in crlft if s.name == "crlft-vllm"]
        servers += [s for s in crlft if s.name in args.servers]
        if "vllm" in args.servers:
            servers.append(stack.enter_context(vllm_server(model_dir, args.precision, args.kv_cache_gib)))
        if "transformers-serve" in args.servers:
            servers.append(stack.enter_context(transformers_server(model_dir, args.precision)))
        texts = prompts(args.agreement_prompts)
        reference = reference_answers(model_dir, texts, args.max_tokens)
        answers = {s.name: greedy_answers(s, texts, args.max_tokens) for s in servers}
        agreement = {name: sum(a == b for a, b in zip(ans, reference, strict=True)) / len(texts)
                     for name, ans in answers.items()}
        for server in servers:  # first touch at the measured load: kernels for its batch shapes, the cache's pages
            asyncio.run(load_level(server, args.concurrency, args.concurrency, args.max_tokens, count))
        levels: list[LevelResult] = []
        for r in range(args.rounds):
            for server in servers[r % len(servers):] + servers[: r % len(servers)]:
                asyncio.run(load_level(server, 4, 8, args.max_tokens, count))  # warm up
                levels.append(asyncio.run(load_level(server, args.concurrency, args.requests, args.max_tokens,
                                                     count)))
                print(f"round {r + 1} {server.name}: {levels[-1].tokens_per_s:.1f} tok/s", file=sys.stderr)
        args.load.append(os.getloadavg()[0])
        if "crlft-vllm-store" in args.servers:  # what storing cost is only measured if it stored
            from crlft.data.store import read_store

            time.sleep(3)  # the replica writes its queue every serve.store.flush_s
            print(f"crlft-vllm-store stored {len(read_store(str(Path(scratch) / 'state' / 'store')).choices)} "
                  "completions", file=sys.stderr)
    table, ratios = report(levels, agreement, args)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"levels": [asdict(x) | {"tokens_per_s": x.tokens_per_s}
                                                          for x in levels],
                                               "answers": answers, "ratios": ratios}, indent=2))
    goals = {"crlft-vllm / vllm": GOAL_VS_VLLM, "crlft-vllm / transformers-serve": GOAL_VS_TRANSFORMERS_SERVE,
             "crlft-vllm-store / crlft-vllm": GOAL_STORE}
    missed = [f"{label} >= {goal}x" for label, goal in goals.items() if ratios[label] and median(ratios[label]) < goal]
    missed += ["zero 5xx"] if any(x.server_errors for x in levels) else []
    if missed:
        print(f"\nMISSED: {'; '.join(missed)}", file=sys.stderr)
    return int(bool(missed))


if __name__ == "__main__":
    raise SystemExit(main())
