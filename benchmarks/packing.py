"""Packing benchmark: how full first-fit-decreasing bins are, against naive padded batching.

    python benchmarks/packing.py [DATA] [--capacity 2048] [--tokenizer DIR]

Token lengths come from the real pipeline: the records are parsed and classed as the data stage does, rendered by
the one template and tokenized with `--tokenizer`, or by default with the tiny model's tokenizer trained on DATA itself
(what `crlft init-model --corpus DATA` builds, as a user would; the built-in corpus tokenizer splits English text
into about 2.4x more tokens, which changes the bin count but not FFD's quality).
Requirement: FFD fills at least 98% of the bin slots; the exit status is 1 when it does not.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

from crlft.commands.init_model import build_default_model
from crlft.config import Config
from crlft.data.pack import first_fit_decreasing, packing_efficiency, padding_efficiency
from crlft.data.readers import iter_file
from crlft.data.records import ClassRules, Conversation
from crlft.data.template import Template, TemplateTokenizer
from crlft.model import load_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT / "tests" / "fixtures" / "fastchat" / "dummy_conversation.json"  # FastChat sample
REQUIRED_FFD_EFFICIENCY = 0.98


def token_lengths(data: Path, tokenizer_dir: Path, capacity: int, cfg: Config) -> tuple[list[int], int]:
    """Token length of each accepted conversation (cut at a turn boundary to `capacity`), and the reject count."""
    tokenizer = TemplateTokenizer(Template.from_config(cfg), load_tokenizer(str(tokenizer_dir)))
    rewards = {name: cfg.reward(name) for name in cfg.classes}
    lengths: list[int] = []
    rejected = 0
    for record in iter_file(data, ClassRules.from_config(cfg)):
        if not isinstance(record, Conversation):
            rejected += 1
            continue
        try:
            lengths.append(len(tokenizer.tokenize_conversation(record, rewards, max_len=capacity).input_ids))
        except ValueError:  # cannot fit even one exchange
            rejected += 1
    return lengths, rejected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help="conversations (JSON/JSONL/Parquet)")
    parser.add_argument("--capacity", type=int, default=2048, help="token budget of one bin")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32], help="naive batch sizes to compare")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the tiny default trained on DATA)")
    args = parser.parse_args(argv)

    cfg = Config()
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = args.tokenizer or build_default_model(Path(scratch) / "tiny", cfg, [args.data])
        lengths, rejected = token_lengths(args.data, tokenizer_dir, args.capacity, cfg)
    if not lengths:
        print(f"no conversation of {args.data} could be tokenized", file=sys.stderr)
        return 1

    started = time.perf_counter()
    bins = first_fit_decreasing(lengths, args.capacity)
    ffd_seconds = time.perf_counter() - started
    ffd = packing_efficiency(lengths, bins, args.capacity)

    print(f"data: {args.data}")
    print(
        f"conversations: {len(lengths)} (rejected {rejected}), tokens: {sum(lengths)}, "
        f"length min/mean/max: {min(lengths)}/{sum(lengths) / len(lengths):.1f}/{max(lengths)}"
    )
    print(f"FFD @ {args.capacity}: {len(bins)} bins, efficiency {ffd:.2%} ({ffd_seconds * 1e3:.1f} ms)")
    # On a small data set the one partly filled bin dominates: show the bound and the fill of the other bins.
    fewest_bins = math.ceil(sum(lengths) / args.capacity)
    fills = sorted(sum(lengths[i] for i in members) for members in bins)
    print(
        f"  lower bound {fewest_bins} bins; any packing into {len(bins)} bins fills at most "
        f"{sum(lengths) / (len(bins) * args.capacity):.2%}; bins other than the emptiest are "
        f"{sum(fills[1:]) / (max(len(bins) - 1, 1) * args.capacity):.2%} full (emptiest holds {fills[0]} tokens)"
    )
    for batch_size in args.batch_sizes:
        print(f"naive batching, batch size {batch_size} (input order): efficiency "
              f"{padding_efficiency(lengths, batch_size):.2%}")
    verdict = "PASS" if ffd >= REQUIRED_FFD_EFFICIENCY else "FAIL"
    print(f"{verdict}: FFD efficiency {ffd:.2%} (required >= {REQUIRED_FFD_EFFICIENCY:.0%})")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
