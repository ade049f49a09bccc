"""`crlft data show`: conversations exactly as the model sees them, each token marked with its loss weight, so that a
user can check the template and the weights by eye."""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

from crlft.command_line import add_config_arguments, config_flag, config_from_args, stage_entrypoint
from crlft.data.readers import iter_file
from crlft.data.records import ClassRules, Reject
from crlft.data.template import Template, TemplateTokenizer, TokenizedConversation

GREEN, DIM, RESET = "\033[32m", "\033[2m", "\033[0m"


def format_tokens(tokenized: TokenizedConversation, decode: Callable[[list[int]], str], color: bool) -> str:
    """Runs of tokens with equal weight: supervised runs as ⟦text⟧×w (green on a terminal), the rest as plain text."""
    out = []
    pairs = zip(tokenized.input_ids, tokenized.weights, strict=True)
    for weight, run in itertools.groupby(pairs, key=lambda p: p[1]):
        text = "|".join(decode([i]) for i, _ in run)
        if weight:
            out.append(f"{GREEN}⟦{text}⟧×{weight:g}{RESET}" if color else f"⟦{text}⟧×{weight:g}")
        else:
            out.append(f"{DIM}{text}{RESET}" if color else text)
    return "".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="a conversation file (JSONL, JSON or Parquet, any accepted format)")
    parser.add_argument("--tokenizer", required=True, help="model or tokenizer folder (or hub id)")
    parser.add_argument("--n", type=int, default=3, help="how many conversations to show")
    config_flag(parser, "train.mode", "--mode")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from crlft.model import load_tokenizer

    cfg = config_from_args(args)
    tokenizer = load_tokenizer(args.tokenizer, cfg.template.end_of_turn, cfg.model.trust_remote_code)
    tt = TemplateTokenizer(Template.from_config(cfg), tokenizer)
    rewards = {c: cfg.reward(c) for c in cfg.classes}
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    shown = 0
    for record in iter_file(Path(args.input), ClassRules.from_config(cfg)):
        if shown >= args.n:
            break
        shown += 1
        if isinstance(record, Reject):
            print(f"--- {record}  (rejected)\n")
            continue
        try:
            tokenized = tt.tokenize_conversation(record, rewards, cfg.data.max_len, cfg.data.overflow,
                                                 cfg.data.per_sequence)
        except ValueError as exc:
            print(f"--- {record.source}:{record.line}  (rejected: {exc})\n")
            continue
        supervised = sum(1 for w in tokenized.weights if w)
        print(f"--- {record.source}:{record.line}  class={record.condition} reward={rewards[record.condition]:g} "
              f"tokens={len(tokenized.input_ids)} supervised={supervised}"
              + ("  (truncated)" if tokenized.truncated else ""))
        print(format_tokens(tokenized, tokenizer.decode, color) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_entrypoint("crlft.commands.show"))
