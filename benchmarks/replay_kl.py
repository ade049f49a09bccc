"""The cost of the replay answers' KL term (crlft/train/distill.py): a LoRA step with `train.replay_kl` 1.0 against the
same step without it, on the same packed bins of a data folder built with replay, alternating.

    python -m benchmarks.replay_kl DATA --base-model MODEL [--bins 16] [--rounds 3] [--threads 2] [--json FILE]

DATA: a `crlft data build` output with replay answers to distil (e.g. the pipeline's data folder of the defaults' run
in RESULTS.md, "Retention"); MODEL: its base model. One process, `--threads` torch threads,
crlft.train.step.train_step over `--bins` training bins spread evenly over the shards (one bin a step, as the default
`grad_accum` 1), the two arms alternating for `--rounds` rounds from the same LoRA weights (the weights move, the work
a step does does not); each arm's seconds a step are the median of its rounds, wall and process CPU (a shared
machine's neighbours slow the wall clock).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from crlft.config import load_config
from crlft.data.stats import DataStats
from crlft.model import load_model_and_tokenizer
from crlft.train.batches import as_packed_row, collate_micro_batch
from crlft.train.schedule import build_optimizer, build_scheduler
from crlft.train.step import train_step
from crlft.train.wrap import wrap_lora

ARMS = (("without the term", 0.0), ("train.replay_kl 1.0", 1.0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="a data folder built with replay (its stats.json counts answers to distil)")
    parser.add_argument("--base-model", required=True, help="the data's base model folder")
    parser.add_argument("--bins", type=int, default=16, help="training bins a round (one a step)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each arm once a round, alternating")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    stats = DataStats.read(args.data)
    if not (stats.replay or {}).get("distilled"):
        sys.exit(f"{args.data} has no replay answers to distil: build it with replay on a pretrained base model")
    cfg = load_config(None, {"train.lora.enabled": True})
    model, tokenizer = load_model_and_tokenizer(args.base_model, cfg.template.end_of_turn)
    model = wrap_lora(model, cfg.train.lora, [tokenizer.convert_tokens_to_ids(cfg.template.end_of_turn)])
    table = pq.read_table(f"{args.data}/train")
    spread = sorted({round(i * (table.num_rows - 1) / max(args.bins - 1, 1)) for i in range(args.bins)})
    rows = [as_packed_row(r) for r in table.take(spread).to_pylist()]  # first-fit-decreasing puts the longest first
    batches = [collate_micro_batch(r, tokenizer.pad_token_id, stats.conditions, "sdpa", torch.device("cpu"), True)
               for r in rows]  # fmt: skip
    optimizer = build_optimizer(model, cfg.train, lr=1e-4)
    scheduler = build_scheduler(optimizer, args.bins * args.rounds * len(ARMS), cfg.train)
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in ARMS}
    for round_index in range(args.rounds):
        for name, weight in ARMS if round_index % 2 == 0 else ARMS[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            for batch in batches:
                train_step(model, [batch], optimizer, scheduler, n_classes=len(stats.conditions), grad_clip=1.0,
                           world_size=1, replay_kl=weight)  # fmt: skip
            steps = len(batches)
            seconds[name].append(((time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps))
    tokens = sum(len(r["input_ids"]) for r in rows)
    distilled_tokens = sum(int(b["student_positions"].numel()) for b in batches)
    result = {name: {"wall_s_a_step": statistics.median(w for w, _ in runs),
                     "cpu_s_a_step": statistics.median(c for _, c in runs)} for name, runs in seconds.items()}
    base, with_term = (result[name] for name, _ in ARMS)
    result["ratio_wall"] = with_term["wall_s_a_step"] / base["wall_s_a_step"]
    result["ratio_cpu"] = with_term["cpu_s_a_step"] / base["cpu_s_a_step"]
    result["tokens_a_step"], result["distilled_tokens_a_step"] = tokens / len(rows), distilled_tokens / len(rows)
    for name, _ in ARMS:
        print(f"{name:22s} {result[name]['wall_s_a_step']:.3f} s a step (wall), {result[name]['cpu_s_a_step']:.3f} "
              "CPU s")
    print(f"the term costs {result['ratio_wall']:.2f}x a step (wall), {result['ratio_cpu']:.2f}x (CPU); "
          f"{result['distilled_tokens_a_step']:.0f} of {result['tokens_a_step']:.0f} tokens a step distilled "
          f"({len(rows)} bins, {args.rounds} rounds, {args.threads} threads)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
