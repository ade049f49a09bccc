"""Faults under load: one replica's process, or only its vLLM engine core, SIGKILLed while requests run.

    python -m benchmarks.replica_faults [--cases replica engine] [--concurrency 32] [--max-tokens 32]
                                        [--warmup-s 5] [--after-s 5] [--hang-s 90] [--recovery-s 240]

One Serve instance on loopback as `crlft serve` runs it (the HAProxy ingress), 2 replicas of the tiny model on vLLM's
CPU build. Per case, `--concurrency` clients send chat requests back to back (three of four streamed, one plain), each
bounded by `--hang-s` (a request not over by then is a hang). After `--warmup-s`, the replica with the most requests in
flight is killed: its process (`replica`) or its vLLM engine core (`engine`). The load goes on until 2 replicas serve
again (a request begun after the kill was answered by a replica other than the survivor: the replacement, or the victim
with its engine restarted), then `--after-s` more. Every answer names its replica (the X-Crlft-Replica header).

Reported per case: requests in flight at the kill and on the victim (its answers' header, or, with no answer at all,
a connection dropped while the kill was in flight: only the victim's process died), requests failed, failed beyond the
victim's requests in flight, hung, seconds from the kill until 2 replicas serve again, the failed requests by kind.
Exit status 1 when a request hung or failed beyond the victim's, 2 replicas did not serve again, or /readyz through
the ingress said no while they recovered (one replica could serve throughout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cluster.session import free_port, ingress_env
from crlft.config import load_config
from crlft.environ import environment

APP = "faults"
SERVED = "faults-model"
CASES = ("replica", "engine")
# The first second after a replica's kill, while the kernel tears its process down: a request sent then can still
# reach the dying replica, which HAProxy resends elsewhere (cluster/session.py's HAPROXY_RETRY_ON; before that, some
# got HAProxy's error page). /readyz must say yes from then on; requests beyond the victim's must never fail.
TEARDOWN_S = 1.0


@dataclass
class Outcome:
    """One request: when it ran, which replica answered (empty: no answer's headers came), how it ended."""

    started: float
    ended: float
    stream: bool
    replica: str
    result: str  # "ok", "error event", "status NNN", an exception's name, or "hung"
    error: dict[str, Any] | None = None  # the OpenAI error object, where one came
    done: bool = False  # a stream's last event was [DONE]

    @property
    def ok(self) -> bool:
        return self.result == "ok"


class Load:
    """`clients` requests at a time, back to back, on an event loop of their own thread, until `stop()`."""

    def __init__(self, url: str, clients: int, max_tokens: int, hang_s: float) -> None:
        self.url, self.clients, self.max_tokens, self.hang_s = url, clients, max_tokens, hang_s
        self.outcomes: list[Outcome] = []
        self.live: dict[int, tuple[float, str]] = {}  # request -> (started, replica once its headers came)
        self._stop = threading.Event()
        self._keys = itertools.count()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop sending; the requests under way end (each within its bound) before this returns."""
        self._stop.set()
        self._thread.join()

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.hang_s), limits=limits) as client:
            await asyncio.gather(*(self._client(client, i % 4 != 3) for i in range(self.clients)))

    async def _client(self, client: httpx.AsyncClient, stream: bool) -> None:
        body = {"model": SERVED, "messages": [{"role": "user", "content": "keep talking"}],
                "max_tokens": self.max_tokens, "stream": stream}
        while not self._stop.is_set():
            key, outcome = next(self._keys), Outcome(time.monotonic(), 0.0, stream, "", "hung")
            self.live[key] = (outcome.started, "")
            try:
                await asyncio.wait_for(self._request(client, body, key, outcome), self.hang_s)
            except TimeoutError:
                pass
            except Exception as exc:  # a dropped connection, or an answer that is not what the API promises
                outcome.result = type(exc).__name__
            finally:
                del self.live[key]
                outcome.ended = time.monotonic()
                self.outcomes.append(outcome)

    async def _request(self, client: httpx.AsyncClient, body: dict[str, Any], key: int, outcome: Outcome) -> None:
        async with client.stream("POST", self.url + "/v1/chat/completions", json=body) as response:
            outcome.replica = response.headers.get("x-crlft-replica", "")
            self.live[key] = (outcome.started, outcome.replica)
            if not outcome.stream or response.status_code != 200:
                text = (await response.aread()).decode()
                outcome.error = json.loads(text).get("error") if text.startswith("{") else None
                outcome.result = "ok" if response.status_code == 200 else f"status {response.status_code}"
                return
            events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
        outcome.done = events[-1:] == ["[DONE]"]
        errors = [json.loads(e)["error"] for e in events if e.startswith('{"error"')]
        outcome.error = errors[0] if errors else None
        outcome.result = "error event" if errors else ("ok" if outcome.done else "no [DONE]")


@dataclass
class FaultResult:
    case: str
    killed_at: float
    victim: str
    survivor: str
    in_flight: int  # requests under way at the kill
    on_victim: list[Outcome]  # ... of which on the victim
    outcomes: list[Outcome] = field(default_factory=list)
    recovered_s: float | None = None  # from the kill until 2 replicas serve again
    readiness: Counter[str] = field(default_factory=Counter)  # /readyz through the ingress from the kill on
    readiness_failed_at: list[float] = field(default_factory=list)  # seconds after the kill of each /readyz not 200
    engine_cores: int = 0  # vLLM engine cores of the app's replicas at the end

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def hung(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.result == "hung"]

    @property
    def failed_beyond_victim(self) -> list[Outcome]:
        victims = {id(o) for o in self.on_victim}
        return [o for o in self.failed if id(o) not in victims]

    @property
    def failed_after_teardown(self) -> list[Outcome]:
        """Failed beyond the victim's, begun once its teardown was over: the ingress sent them to a dead replica."""
        return [o for o in self.failed_beyond_victim if o.started - self.killed_at >= TEARDOWN_S]


def replica_pids() -> dict[str, int]:
    """The app's replicas: Serve's replica id (what the X-Crlft-Replica header names) -> process id."""
    import ray

    from services.chat import DEPLOYMENT_NAME

    prefix = f"SERVE_REPLICA::{APP}#{DEPLOYMENT_NAME}#"
    pids = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(prefix):
            with contextlib.suppress(Exception):  # a replica that just died
                handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
                pids[actor["name"][len(prefix):]] = ray.get(handle.__ray_call__.remote(lambda _: os.getpid()),
                                                            timeout=10)
    return pids


def engine_cores(pids: dict[str, int]) -> dict[str, int]:
    """Replica id -> the process id of its vLLM engine core."""
    import psutil

    cores = {}
    for replica, pid in pids.items():
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(pid).children():
                if (child.cmdline() or [""])[0].startswith("VLLM::EngineCore"):
                    cores[replica] = child.pid
    return cores


def readiness(url: str) -> str:
    """/readyz's status code through the ingress (or why none came)."""
    try:
        return str(httpx.get(url + "/readyz", timeout=5).status_code)
    except httpx.HTTPError as exc:
        return type(exc).__name__


def probe(url: str, result: FaultResult) -> None:
    sent = time.monotonic() - result.killed_at
    status = readiness(url)
    result.readiness[status] += 1
    if status != "200":
        result.readiness_failed_at.append(round(sent, 2))


def run_case(url: str, case: str, *, concurrency: int = 32, max_tokens: int = 32, warmup_s: float = 5.0,
             after_s: float = 5.0, hang_s: float = 90.0, recovery_s: float = 240.0) -> FaultResult:
    """Kill one replica's process or engine core under load, and follow the load until 2 replicas serve again."""
    pids = replica_pids()
    if len(pids) != 2:
        raise RuntimeError(f"expected 2 replicas, found {len(pids)}")
    with Load(url, concurrency, max_tokens, hang_s) as load:
        time.sleep(warmup_s)
        held = Counter(replica for _, replica in list(load.live.values()) if replica)
        victim = max(pids, key=lambda r: held[r])
        [survivor] = set(pids) - {victim}
        target = pids[victim] if case == "replica" else engine_cores(pids)[victim]
        killed_at = time.monotonic()
        os.kill(target, signal.SIGKILL)
        result = FaultResult(case, killed_at, victim, survivor, len(load.live), [])
        deadline = killed_at + recovery_s
        while result.recovered_s is None and time.monotonic() < deadline:
            probe(url, result)
            time.sleep(0.25)
            served = [o.ended for o in list(load.outcomes)
                      if o.ok and o.started > killed_at and o.replica not in ("", survivor)]
            result.recovered_s = min(served) - killed_at if served else None
        while time.monotonic() < killed_at + (result.recovered_s or 0) + after_s:
            probe(url, result)
            time.sleep(0.25)
    result.outcomes = load.outcomes
    result.on_victim = [o for o in load.outcomes if o.started < killed_at < o.ended
                        and (o.replica == victim or (not o.replica and not o.ok))]
    result.engine_cores = len(engine_cores(replica_pids()))
    return result


@contextlib.contextmanager
def two_replicas(scratch: Path) -> Iterator[str]:
    """2 replicas of the tiny model on vLLM behind the HAProxy ingress, in a local Ray of this process; yields the
    URL."""
    import ray
    from ray import serve

    from benchmarks.serve_load import build_model
    from services.chat import chat_application
    from services.local import public_url, shutdown, wait_until_ready

    folder = build_model("tiny", scratch)
    cfg = load_config(None, {
        "state_dir": str(scratch / "state"), "serve.port": free_port(), "inference.engine": "vllm",
        "serve.cpus_per_replica": 0.25, "serve.min_replicas": 2, "serve.max_replicas": 2,
        "inference.vllm_kv_cache_gib": 0.25, "inference.max_batch_size": 16, "serve.model_name": SERVED,
        "serve.access_log": False,
    })
    with environment(ingress_env(cfg)):  # the ingress `crlft serve` puts in front
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        serve.run(chat_application(str(folder), cfg), name=APP)
        url = public_url(cfg.serve.host, cfg.serve.port)
        wait_until_ready(url, timeout_s=600)
        yield url
    finally:
        shutdown()


def report(results: list[FaultResult], args: argparse.Namespace) -> str:
    lines = [
        f"2 replicas of the tiny model (vLLM, CPU) behind HAProxy; {args.concurrency} clients back to back (3 of 4 "
        f"streamed), up to {args.max_tokens} tokens; the kill after {args.warmup_s:.0f} s of load; load average "
        f"{args.load[0]:.1f} at the start, {args.load[1]:.1f} at the end on {os.cpu_count()} cores",
        "",
        "| killed | requests | in flight at the kill (on the victim) | failed | failed beyond the victim's (after "
        f"{TEARDOWN_S:.0f} s) | hung "
        "| s until 2 replicas serve | engine cores at the end | failures | /readyz after the kill |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in results:
        kinds = Counter(o.result + (" + [DONE]" if o.done else "") for o in r.failed)
        recovered = f"{r.recovered_s:.1f}" if r.recovered_s is not None else "never"
        lines.append(f"| {r.case} | {len(r.outcomes)} | {r.in_flight} ({len(r.on_victim)}) | {len(r.failed)} "
                     f"| {len(r.failed_beyond_victim)} ({len(r.failed_after_teardown)}) | {len(r.hung)} | {recovered} "
                     f"| {r.engine_cores} "
                     f"| {', '.join(f'{k}: {n}' for k, n in kinds.items()) or 0} "
                     f"| {', '.join(f'{k}: {n}' for k, n in r.readiness.items())}"
                     + (f" (not 200: sent {r.readiness_failed_at} s after the kill)" if r.readiness_failed_at else "")
                     + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--warmup-s", type=float, default=5.0, help="load before the kill")
    parser.add_argument("--after-s", type=float, default=5.0, help="load after 2 replicas serve again")
    parser.add_argument("--hang-s", type=float, default=90.0, help="a request not over after this long is a hang")
    parser.add_argument("--recovery-s", type=float, default=240.0, help="how long to wait for 2 replicas to serve")
    args = parser.parse_args(argv)

    args.load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="replica-faults-") as scratch, two_replicas(Path(scratch)) as url:
        results = []
        for case in args.cases:
            results.append(run_case(url, case, concurrency=args.concurrency, max_tokens=args.max_tokens,
                                    warmup_s=args.warmup_s, after_s=args.after_s, hang_s=args.hang_s,
                                    recovery_s=args.recovery_s))
            print(f"{case}: done", file=sys.stderr)
        args.load.append(os.getloadavg()[0])
    print(report(results, args))
    bad = any(r.hung or r.failed_beyond_victim or r.recovered_s is None
              or any(sent >= TEARDOWN_S for sent in r.readiness_failed_at) for r in results)
    return int(bad)


if __name__ == "__main__":
    raise SystemExit(main())
