"""`crlft synth`: write the synthetic mixed-quality suite (crlft/synth/suite.py), or with `--facts` a mixed-quality
set of invented facts for a pretrained model (crlft/synth/facts.py): each says why it is built as it is."""

from __future__ import annotations

import argparse

from crlft.command_line import stage_entrypoint
from crlft.synth.suite import DEFAULT_N_EVAL, DEFAULT_N_EXPERT, DEFAULT_RATIO, DEFAULT_WRONG_RATE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for train.jsonl, heldout.jsonl and eval.jsonl")
    parser.add_argument("--facts", action="store_true", help="invented facts about N countries, answered in sentences "
                        "(new knowledge for a pretrained model; writes train.jsonl and eval.jsonl): --n-countries")
    parser.add_argument("--n-countries", type=int, default=8, help="with --facts: countries, 3 facts each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-expert", type=int, default=DEFAULT_N_EXPERT, help="expert (GPT4) training conversations")
    parser.add_argument("--ratio", type=float, default=DEFAULT_RATIO,
                        help="sub-optimal (GPT3) conversations per expert one")
    parser.add_argument("--n-eval", type=int, default=DEFAULT_N_EVAL, help="held-out exact-match questions")
    parser.add_argument("--wrong-rate", type=float, default=DEFAULT_WRONG_RATE,
                        help="how often GPT3 gives its systematic wrong answer")


def run(args: argparse.Namespace) -> int:
    from crlft.synth.facts import write_facts
    from crlft.synth.suite import write_suite

    if args.facts:
        files = write_facts(args.out, n_countries=args.n_countries, ratio=args.ratio, wrong_rate=args.wrong_rate,
                            seed=args.seed)
    else:
        files = write_suite(args.out, seed=args.seed, n_expert=args.n_expert, ratio=args.ratio, n_eval=args.n_eval,
                            wrong_rate=args.wrong_rate)
    for name, path in files.items():
        lines = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"{name:8s} {lines:6d} lines  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_entrypoint("crlft.commands.synth"))
