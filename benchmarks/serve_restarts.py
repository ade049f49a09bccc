"""Start and stop `crlft serve` N times on ONE port, alternating SIGTERM to its pid and to its process group (what
`kill` and Kubernetes send, and what systemd, `timeout` and a terminal's Ctrl-C do), and count the starts that
answered and the stops that left nothing behind.

    python -m benchmarks.serve_restarts --runs 20 --port 8000            # the tiny model, inference.engine=auto
    python -m benchmarks.serve_restarts --runs 4 --signal SIGINT --model DIR

A stop is clean when the command exits with 0 or 128 + the signal's number within --stop-timeout seconds, printed no
abort trace ("*** SIGTERM received", a Python traceback), and afterwards no process of its session is running (each
run starts `crlft serve` in a session of its own, which every process it starts stays in, whatever parent or process
group it ends up with: Ray's, HAProxy, vLLM's engine cores) and nothing listens on the port. Prints one line per run
and the totals; exits non-zero if any run failed. `--repo` runs another checkout's `crlft serve` (an older commit,
to compare).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
ABORT_TRACE = re.compile(r"\*\*\* \w+ received|Traceback \(most recent call last\)|core dumped")


@dataclass
class Run:
    number: int
    target: str  # "pid" or "group"
    answered: bool
    start_s: float
    stop_s: float
    exit_code: int | None
    trace: str
    left_running: list[str]
    listening: bool
    signum: int
    stderr_tail: list[str]

    @property
    def clean(self) -> bool:
        return (self.exit_code in (0, 128 + self.signum) and not self.trace and not self.left_running
                and not self.listening)


def tiny_model(root: Path) -> Path:
    from crlft.config import Config
    from crlft.export import ModelMeta, save_exported
    from crlft.model import load_model_and_tokenizer
    from crlft.presets import init_model

    model, tokenizer = load_model_and_tokenizer(str(init_model(root / "base", seed=0)))
    return save_exported(model, tokenizer, root / "model", ModelMeta.from_config(Config(), seed=0))


def in_session(sid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (OSError, psutil.Error):
            continue
    return found


def listening(port: int) -> bool:
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
               for c in psutil.net_connections(kind="tcp"))


def answered(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as response:
            return response.status == 200
    except OSError:
        return False


def one_run(number: int, target: str, signum: int, args: argparse.Namespace, model: Path, state: Path) -> Run:
    command = [sys.executable, "-m", "jobs.cli", "serve", "--model", str(model), "--port", str(args.port),
               "--set", f"serve.cpus_per_replica={args.cpus_per_replica}", "--set", f"inference.engine={args.engine}",
               "--set", f"state_dir={state}"]
    log = state / f"run{number}.stderr"
    started = time.monotonic()
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=args.repo,
                                   start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    watchdog = threading.Timer(args.start_timeout, process.kill)
    watchdog.start()
    assert process.stdout is not None
    ready = next((line for line in process.stdout if line.startswith("serving ")), "")
    watchdog.cancel()
    start_s = time.monotonic() - started
    ok = bool(ready) and answered(args.port)
    stopped = time.monotonic()
    if process.poll() is None:
        os.killpg(process.pid, signum) if target == "group" else process.send_signal(signum)
    try:
        exit_code: int | None = process.wait(timeout=args.stop_timeout)
    except subprocess.TimeoutExpired:
        exit_code = None
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    stop_s = time.monotonic() - stopped
    time.sleep(1.0)  # what a stop leaves behind is what is still there a moment later
    left = [f"{p.pid} {p.name()}" for p in in_session(process.pid)]
    stderr = log.read_text(errors="replace")
    trace = next((m.group(0) for m in ABORT_TRACE.finditer(stderr)), "")
    run = Run(number, target, ok, start_s, stop_s, exit_code, trace, left, listening(args.port), signum,
              stderr.splitlines()[-25:])
    for process_left in in_session(process.pid):  # the next run starts on a clean machine either way
        process_left.kill()
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="starts and stops (default 20: 10 to the pid, 10 to "
                        "the group)")
    parser.add_argument("--port", type=int, default=8000, help="the one port every run serves on (default 8000)")
    parser.add_argument("--signal", default="SIGTERM", choices=["SIGTERM", "SIGINT"])
    parser.add_argument("--model", type=Path, help="model folder to serve (default: the tiny model, built here)")
    parser.add_argument("--engine", default="auto", help="inference.engine (default auto: vLLM where installed)")
    parser.add_argument("--cpus-per-replica", type=float, default=0.25)
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--stop-timeout", type=float, default=60.0)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose `crlft serve` runs (default: this)")
    args = parser.parse_args(argv)
    signum = int(signal.Signals[args.signal])
    with tempfile.TemporaryDirectory(prefix="serve-restarts-") as tmp:
        root = Path(tmp)
        model = args.model or tiny_model(root)
        print(f"{args.runs} starts and {args.signal} stops of `crlft serve` on port {args.port}; load "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
        runs = []
        for number in range(1, args.runs + 1):
            target = "pid" if number % 2 else "group"
            run = one_run(number, target, signum, args, model, root)
            runs.append(run)
            print(f"run {number:2d} {target:5s}  answered={run.answered!s:5s} start {run.start_s:5.1f} s  stop "
                  f"{run.stop_s:5.1f} s  exit={run.exit_code}  clean={run.clean!s:5s}"
                  + (f"  trace={run.trace!r}" if run.trace else "")
                  + (f"  left={run.left_running}" if run.left_running else "")
                  + ("  port still listening" if run.listening else ""), flush=True)
            if not run.clean or not run.answered:  # what the command said, to tell why
                print("    " + "\n    ".join(run.stderr_tail), flush=True)
    answered_count = sum(r.answered for r in runs)
    clean = sum(r.clean for r in runs)
    stops = sorted(r.stop_s for r in runs)
    print(f"\nanswered {answered_count}/{len(runs)}, stopped cleanly {clean}/{len(runs)}; stop seconds: median "
          f"{stops[len(stops) // 2]:.1f}, max {stops[-1]:.1f}; load {os.getloadavg()[0]:.1f}")
    return 0 if answered_count == clean == len(runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
