"""Data pipeline benchmark: the Ray Data job against a plain single-process loop over the same library functions.

    python benchmarks/data_pipeline.py [--conversations 50000] [--files 8] [--scale 4] [--tokenizer DIR]

1. Generates N conversations in F files (OpenChat JSONL, ShareGPT JSON arrays, OpenAI JSONL; 1% broken records),
   and the same mix at N / scale.
2. Ray: `build_dataset` on a local Ray started first (its start-up is timed apart).
3. Baseline: one process reads, validates, tokenizes (crlft.data.process.process_record), packs (pack_conversations) and
   writes the same shards; like any plain loop it keeps the accepted conversations in memory to group them.
Each build runs in a fresh interpreter (its memory figures are its own), loop and Ray interleaved (a burst of other
work on the host then does not land on one engine only); the host's load average is printed with each run.
Prints conversations/s and tokens/s of both and their ratio, checks that both wrote byte-identical outputs, and
the driver's RSS growth during the build at N / scale and N: the Ray driver stays flat (records stream through the
object store and the workers), the plain loop grows with the input. Exit status 1 if the outputs differ.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq

from crlft.config import Config, load_config
from crlft.data.process import RecordResult, RecordSettings, process_record, reject_line
from crlft.data.readers import input_kind, iter_raw_records
from crlft.data.shards import group_of, pack_conversations, pack_groups_for, shard_name, shard_table
from crlft.data.stats import SPLITS, DataStats, Tally
from crlft.data.template import Template, TemplateTokenizer
from crlft.model import load_tokenizer
from crlft.presets import default_corpus, train_tokenizer

_TEXT = (
    "the a cat dog river mountain answer question small large quickly slowly because when how why what where "
    "first second third number list plan idea story bread music email apple box team robot friend student "
    "explain remember build find write read need see want think know give make take go come"
)
WORDS = tuple(_TEXT.split())


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def _turns(rng: random.Random) -> list[tuple[str, str]]:
    turns = []
    for _ in range(rng.randint(1, 3)):
        turns.append(("user", _sentence(rng, 4, 25)))
        turns.append(("assistant", " ".join(_sentence(rng, 5, 18) for _ in range(rng.randint(1, 5)))))
    return turns


def _record(rng: random.Random, style: str) -> dict[str, Any]:
    expert = rng.random() < 0.2
    turns = _turns(rng)
    if style == "openchat":
        return {"items": [{"role": r, "content": c} for r, c in turns], "condition": "GPT4" if expert else "GPT3"}
    if style == "sharegpt":
        return {"conversations": [{"from": "human" if r == "user" else "gpt", "value": c} for r, c in turns],
                "model": "gpt-4" if expert else "gpt-3.5-turbo"}  # fmt: skip
    return {"messages": [{"role": r, "content": c} for r, c in turns], **({"condition": "GPT4"} if expert else {})}


def generate(folder: Path, conversations: int, files: int, seed: int = 0) -> list[str]:
    """`conversations` records spread over `files` files of the three formats; 1% of JSONL lines are broken."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(files):
        style = ("openchat", "sharegpt", "openai")[index % 3]
        count = conversations // files + (1 if index < conversations % files else 0)
        records = [_record(rng, style) for _ in range(count)]
        if style == "sharegpt":
            path = folder / f"part{index}.json"
            path.write_text(json.dumps(records))
        else:
            path = folder / f"part{index}.jsonl"
            lines = [json.dumps(r) for r in records]
            lines = [line[: len(line) // 2] if rng.random() < 0.01 else line for line in lines]
            path.write_text("\n".join(lines) + "\n")
        paths.append(str(path.resolve()))
    return paths


@contextlib.contextmanager
def peak_rss() -> Iterator[dict[str, float]]:
    """Samples this process's resident memory every 20 ms; yields a dict that gets `peak_mib` and `start_mib`."""
    process = psutil.Process()
    result = {"start_mib": process.memory_info().rss / 2**20, "peak_mib": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            result["peak_mib"] = max(result["peak_mib"], process.memory_info().rss / 2**20)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result["peak_mib"] = max(result["peak_mib"], process.memory_info().rss / 2**20)


def single_process(paths: list[str], tokenizer_dir: str, out: Path, cfg: Config) -> dict[str, Any]:
    """The same stage as one plain loop: same functions, same outputs, everything in this process."""
    settings = RecordSettings.from_config(cfg)
    template = Template.from_config(cfg)
    tokenizer = TemplateTokenizer(template, load_tokenizer(tokenizer_dir, cfg.template.end_of_turn))
    tally = Tally()
    accepted: dict[str, list[RecordResult]] = defaultdict(list)
    rejects: list[RecordResult] = []
    for path in paths:
        with open(path, "rb") as stream:
            for raw in iter_raw_records(input_kind(path), stream):
                record = process_record(settings, tokenizer, path, raw)
                tally.add(record)
                if record["status"] == "accepted":
                    accepted[record["split"]].append(record)
                elif record["status"] == "rejected":
                    rejects.append(record)
    out.mkdir(parents=True, exist_ok=True)
    rejects.sort(key=lambda r: (r["source"], r["line"]))
    (out / "rejects.jsonl").write_text("".join(reject_line(r) + "\n" for r in rejects))
    bins: dict[str, int] = {}
    pack_len = tally.pack_len(cfg.data)
    for split in SPLITS:
        if not accepted[split]:
            continue
        groups = pack_groups_for(len(accepted[split]))
        members: dict[int, list[RecordResult]] = defaultdict(list)
        for record in accepted[split]:
            members[group_of(record["key"], groups)].append(record)
        (out / split).mkdir(exist_ok=True)
        bins[split] = 0
        for group, records in members.items():
            rows = pack_conversations(records, pack_len)
            pq.write_table(shard_table(rows), out / split / shard_name(group))
            bins[split] += len(rows)
    stats = DataStats.from_build(tally, bins, cfg, template, tokenizer_dir, tokenizer.fingerprint(), paths)
    stats.write(out)
    return stats.to_json()


@dataclass
class Run:
    engine: str
    conversations: int
    seconds: float
    records: int
    tokens: int
    start_mib: float
    peak_mib: float
    load: float  # the host's 1-minute load average at the end: other work competing for the cores
    ray_start_s: float = 0.0

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def line(self) -> str:
        return (
            f"{self.engine:<6} {self.conversations:>7} {self.seconds:>8.1f} {self.records_per_s:>8.0f} "
            f"{self.tokens_per_s:>9.0f} {self.start_mib:>9.0f} {self.peak_mib:>9.0f} "
            f"{self.peak_mib - self.start_mib:>+8.0f} {self.load:>5.1f}"
        )


def child(engine: str, paths: list[str], tokenizer_dir: str, out: Path, conversations: int) -> Run:
    """One measured build in this (fresh) process, so that its memory figures are its own."""
    cfg = load_config(None, {})
    ray_start_s = 0.0
    if engine == "ray":
        import ray

        from jobs.build_dataset import build_dataset as build

        started = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False)
        ray_start_s = time.perf_counter() - started
    else:
        build = single_process
    try:
        with peak_rss() as memory:
            started = time.perf_counter()
            stats = build(paths, tokenizer_dir, out, cfg)
            seconds = time.perf_counter() - started
    finally:
        if engine == "ray":
            ray.shutdown()
    tokens = sum(c["tokens"] for c in stats["per_class"].values())
    return Run(engine, conversations, seconds, stats["records_in"], tokens, memory["start_mib"], memory["peak_mib"],
               os.getloadavg()[0], ray_start_s)  # fmt: skip


def measure(engine: str, paths: list[str], tokenizer_dir: str, out: Path, conversations: int) -> Run:
    """Runs `child` in a fresh interpreter (this file with --child)."""
    spec = out.with_suffix(".json")
    spec.write_text(json.dumps({"engine": engine, "paths": paths, "tokenizer": tokenizer_dir, "out": str(out),
                                "conversations": conversations}))  # fmt: skip
    subprocess.run([sys.executable, __file__, "--child", str(spec)], check=True)
    return Run(**json.loads(spec.read_text())["run"])


def identical_outputs(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=50_000, help="conversations in the large input")
    parser.add_argument("--files", type=int, default=8, help="input files (a mix of the three formats)")
    parser.add_argument("--scale", type=int, default=4, help="the small input is conversations / scale")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the tiny default tokenizer, trained here)")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        spec = json.loads(args.child.read_text())
        run = child(spec["engine"], spec["paths"], spec["tokenizer"], Path(spec["out"]), spec["conversations"])
        args.child.write_text(json.dumps({**spec, "run": asdict(run)}))
        return 0

    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        tokenizer_dir = args.tokenizer
        if tokenizer_dir is None:
            tokenizer_dir = str(scratch / "tokenizer")
            train_tokenizer(default_corpus()).save_pretrained(tokenizer_dir)
        sizes = {args.conversations // args.scale: 1, args.conversations: 2}
        inputs = {n: generate(scratch / f"in{n}", n, args.files, seed=seed) for n, seed in sizes.items()}
        # Interleaved, so that a burst of other work on the host does not land on one engine only.
        runs = [measure(engine, inputs[n], tokenizer_dir, scratch / f"{engine}{n}", n)
                for n in sizes for engine in ("loop", "ray")]  # fmt: skip
        same = identical_outputs(scratch / f"ray{args.conversations}", scratch / f"loop{args.conversations}")

    ray_runs = [r for r in runs if r.engine == "ray"]
    loop_runs = [r for r in runs if r.engine == "loop"]
    print(f"\nhost: {os.cpu_count()} cores; Ray start-up {ray_runs[-1].ray_start_s:.1f} s (not in the times below)")
    print(f"{'engine':<6} {'convs':>7} {'seconds':>8} {'convs/s':>8} {'tokens/s':>9} {'RSS MiB':>9} {'peak MiB':>9} "
          f"{'growth':>8} {'load':>5}")  # fmt: skip
    for run in runs:
        print(run.line())
    ray_large, loop_large = ray_runs[-1], loop_runs[-1]
    ratio = ray_large.records_per_s / loop_large.records_per_s
    print(f"Ray Data / single process at {args.conversations} conversations: {ratio:.2f}x conversations/s, "
          f"{ray_large.tokens_per_s / loop_large.tokens_per_s:.2f}x tokens/s")  # fmt: skip
    growth = {engine: " -> ".join(f"{r.peak_mib - r.start_mib:+.0f}" for r in rs)
              for engine, rs in (("ray", ray_runs), ("loop", loop_runs))}  # fmt: skip
    print(f"driver RSS growth during the build, input x{args.scale}: Ray {growth['ray']} MiB, "
          f"single process {growth['loop']} MiB")  # fmt: skip
    print(f"byte-identical outputs (shards, rejects, stats): {'yes' if same else 'NO'}")
    if args.json:
        figures = {
            "ratio_conversations_per_s": ratio, "identical": same,
            "runs": [{**asdict(run), "records_per_s": run.records_per_s, "tokens_per_s": run.tokens_per_s}
                     for run in runs],
        }  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
