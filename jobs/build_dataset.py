"""`crlft data build` / `python -m jobs.build_dataset`: conversations -> conditioned, tokenized, packed Parquet shards.

Ray Data end to end, nothing collected on the driver:

    read (files, directories, globs, URIs; every record keeps its file and line)
      + a completion store's records, read on the driver -> store.jsonl (jobs/store_input.py)
      -> validate, assign class, tokenize (actor pool: the tokenizer is loaded once per actor)
      -> materialize in the object store (it feeds three consumers; spills to disk when larger than memory)
      -> small per-block tallies -> stats.json
      -> replay (data.replay, jobs/replay.py): the base model answers ratio x accepted general prompts -> replay.jsonl,
         whose conversations are validated and tokenized as the actors do (process_record) and join the records
      -> rejects, sorted by (source, line) and streamed -> rejects.jsonl
      -> per split: group by a seeded hash of the text -> first-fit-decreasing per group -> one Parquet shard each

The output depends only on the inputs, the config and the seed, byte for byte: a record's split and packing group
come from its text, each group is packed in (source, line) order into the shard named after the group. Replay answers
are the base model's, cached under their fingerprint: a rebuild reuses them.

Replay joins after the tally because its size depends on the number of accepted conversations; the replay records are
then validated, tokenized, counted, split and packed exactly as the user's (one union, one packing), so the only
difference a replay conversation has is its source, `<out>/replay.jsonl`, and its line there.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from cluster.session import ray_session
from crlft.command_line import add_config_arguments, config_flag, config_from_args, stage_entrypoint
from crlft.config import Config
from crlft.data.output import OutputFolder
from crlft.data.process import RECORD_SCHEMA, RecordSettings, process_record, reject_line
from crlft.data.readers import RawRecord, chunked, input_kind, iter_raw_records, remote_listing_args, resolve_inputs
from crlft.data.replay import ReplayPlan, plan_replay, teacher_fields
from crlft.data.shards import PACK_COLUMNS, pack_and_write, pack_groups_for, with_group
from crlft.data.stats import SPLITS, TALLY_COLUMNS, DataStats, Tally, nothing_usable, summarize_block
from crlft.environ import set_offline_defaults
from crlft.errors import CrlftError
from jobs.replay import REPLAY_FILE, Replay, make_replay
from jobs.store_input import STORE_FILE, StoreInput, read_store_input, summary

if TYPE_CHECKING:  # transformers: seconds to import in every Ray worker that only reads, counts or packs
    from crlft.data.template import Template, TemplateTokenizer

ROWS_PER_READ_BLOCK = 2048
TOKENIZE_BATCH_ROWS = 512
# Tokenizer actors ask for 0.75 CPU and readers for 0.25: a full actor pool (one per CPU) then still leaves room for
# the reads that feed it (with 1 CPU each, reads wait for an idle actor to be scaled down: stalls of many seconds).
READ_CPUS = 0.25
INPUT_BYTES_PER_ACTOR = 16 * 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="JSONL / JSON / Parquet files, directories or globs; local paths or URIs (s3://, gs://); "
                        "or a completion store (a folder or URI with store.json, what `crlft serve` stores): its "
                        "answers train by their feedback (data.feedback; see `crlft feedback stats STORE`)")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="tokenizer directory or hub id, the base model's (default: model.base_model); "
                        "<|end_of_turn|> is added if missing")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder: train/, val/, stats.json, rejects")
    config_flag(parser, "data.max_len", "--max-len")
    config_flag(parser, "data.pack_len", "--pack-len")
    parser.add_argument("--expert-only", action="store_true",
                        help="keep only the inference condition's class (data.only_classes)")
    config_flag(parser, "data.val_fraction", "--val-fraction")
    config_flag(parser, "data.seed", "--seed")
    config_flag(parser, "train.mode", "--mode", help="training mode: decides conditions in the prompt and rewards in "
                "the weights")
    config_flag(parser, "data.replay.enabled", "--replay", help="mix in the base model's own answers to general "
                "prompts, so a fine-tune keeps what it knew (default: on for a pretrained base model, off for the "
                "embedded tiny one); one generation pass of the base model over ratio x accepted prompts, cached for "
                "later builds")
    config_flag(parser, "data.replay.ratio", "--replay-ratio")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.expert_only:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"only_classes": [cfg.inference_condition]})})
    stats = build_dataset(args.inputs, args.tokenizer or cfg.model.base_model, args.out, cfg)
    per_class = ", ".join(f"{name} {c['records']}" for name, c in stats["per_class"].items())
    replay = stats["replay"]
    if replay["conversations"]:
        per_class += f"; {replay['conversations']} replay in {replay['condition']}"
    if "store" in stats:
        print(summary(stats["store"]))
    print(
        f"{stats['records_in']} records: {stats['accepted']} accepted ({per_class}), {stats['rejected']} rejected, "
        f"{stats['filtered']} filtered; {stats['bins']} bins of {stats['pack_len']} tokens, "
        f"packing efficiency {stats['packing_efficiency']:.3f} -> {args.out}"
    )
    return 0


def build_dataset(inputs: list[str], tokenizer: str, out: str | Path, cfg: Config) -> dict[str, Any]:
    """Build the training set into `out`; returns the stats (also written to `out`/stats.json).

    Uses the running Ray session if there is one, else starts a local one for the duration."""
    from crlft.data.template import Template

    set_offline_defaults()
    store, files = read_store_input(inputs, cfg)  # before Ray starts: an unusable store fails here
    paths = resolve_inputs(files) if files or store is None else []
    template = Template.from_config(cfg)
    template_tokenizer = _load_template_tokenizer(tokenizer, template, cfg)  # fails here, once, not in every actor
    replay = plan_replay(cfg, tokenizer)  # the base model's tokenizer is the base model's folder
    out_str = str(out)
    with ray_session(cfg), _data_context():
        return _build(paths, tokenizer, out_str, cfg, template_tokenizer, replay, store)


def _build(paths: list[str], tokenizer: str, out: str, cfg: Config, template_tokenizer: TemplateTokenizer,
           replay_plan: ReplayPlan | None, store: StoreInput | None = None) -> dict[str, Any]:
    from ray.data.expressions import col

    started = time.monotonic()
    _log(f"reading {len(paths)} input path(s)" + (f" and the completion store {store.uri}" if store else ""))
    settings = RecordSettings.from_config(cfg)
    output = OutputFolder(out)
    output.remove(STORE_FILE)  # a store file of an earlier run must not pass for this one's
    if store is not None:
        output.write_lines(STORE_FILE, store.lines)
    records, input_bytes = _read_records(paths, store)
    tokenized = records.map_batches(
        TokenizeRecords,
        fn_constructor_args=(tokenizer, cfg.template.end_of_turn, cfg.model.trust_remote_code,
                             template_tokenizer.template, settings),
        batch_size=TOKENIZE_BATCH_ROWS,
        batch_format="pyarrow",
        compute=_tokenizer_pool(input_bytes),
        num_cpus=1 - READ_CPUS,
    ).materialize()
    tally = _tally(tokenized)
    _log(
        f"{tally.records_in} records: {tally.accepted} accepted, {tally.rejected} rejected, {tally.filtered} filtered",
        started,
    )
    replay = make_replay(cfg, replay_plan, template_tokenizer, tally.accepted)
    output.remove(REPLAY_FILE)  # a replay file of an earlier run must not pass for this one's
    if replay.lines:
        tokenized, tally = _add_replay(replay, tokenized, tally, output, template_tokenizer, settings, started)
    rejects = tokenized.filter(expr=col("status") == "rejected").select_columns(["source", "line", "reason", "raw"])
    output.write_lines("rejects.jsonl", _sorted_reject_lines(rejects, tally.rejected))
    _log(f"{tally.rejected} rejects -> rejects.jsonl", started)
    pack_len = _pack_len(cfg, tally, started)
    bins: dict[str, int] = {}
    usable = tally.split_records.get("train", 0) > 0
    for split in SPLITS:
        output.remove(split)  # shards of an earlier run must not mix with these
        count = tally.split_records.get(split, 0)
        if usable and count:
            accepted = tokenized.filter(expr=(col("status") == "accepted") & (col("split") == split))
            bins[split] = _write_packed(accepted, count, pack_len, output.make_folder(split))
            _log(f"{split}: {count} conversations in {bins[split]} bins", started)
    stats = DataStats.from_build(tally, bins, cfg, template_tokenizer.template, tokenizer,
                                 template_tokenizer.fingerprint(), paths, replay.stats,
                                 store.stats() if store else None)  # fmt: skip
    stats.write(out)
    if not usable:
        raise CrlftError(nothing_usable(tally, out))
    _log(f"wrote {out}", started)
    return stats.to_json()


def _pack_len(cfg: Config, tally: Tally, started: float) -> int:
    """The bins' length (Tally.pack_len), said when an unset data.pack_len chose one shorter than data.max_len."""
    pack_len = tally.pack_len(cfg.data)
    if cfg.data.pack_len is None and pack_len < cfg.data.max_len:
        _log(f"bins of {pack_len} tokens: data.pack_len is unset and {tally.split_tokens.get('train', 0)} training "
             f"tokens would fill few bins of {cfg.data.max_len} (few optimiser steps); the longest conversation has "
             f"{tally.longest}", started)
    return pack_len


def _read_records(paths: list[str], store: StoreInput | None) -> tuple[Any, int]:
    """The raw records of the files and of the store (rows source, line, text, error), and their estimated size."""
    import ray.data

    parts, size = [], 0
    if paths:
        try:
            source = RecordDatasource(paths, **remote_listing_args(paths))
        except (OSError, ValueError) as exc:  # listing remote inputs: missing bucket, no access, nothing there
            raise CrlftError(f"cannot list the inputs {', '.join(paths)}: {exc}") from None
        parts.append(ray.data.read_datasource(source, num_cpus=READ_CPUS))
        size += source.estimate_inmemory_data_size() or 0
    if store is not None:
        table = store.raw_table()
        parts.append(ray.data.from_arrow(table))
        size += table.nbytes
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0], size


def _add_replay(replay: Replay, tokenized: Any, tally: Tally, output: OutputFolder,
                template_tokenizer: TemplateTokenizer, settings: RecordSettings, started: float) -> tuple[Any, Tally]:
    """The records and tally with the replay conversations added, validated, tokenized and placed by what the
    tokenizing actors run (`process_record`, the same tokenizer), here on the driver: they are a few thousand at most,
    and an actor takes seconds to start. Their source is REPLAY_FILE as named in the output folder (beside
    rejects.jsonl), not its full path: the shards do not depend on where they are written."""
    import ray.data

    output.write_lines(REPLAY_FILE, replay.lines)
    results = [process_record(settings, template_tokenizer, REPLAY_FILE, RawRecord(line=line, text=text, error=""))
               for line, text in enumerate(replay.lines, start=1)]  # fmt: skip
    added = Tally()
    for index, (result, line) in enumerate(zip(results, replay.lines, strict=True)):
        added.add(result)
        if result["status"] == "accepted":
            results[index] = {**result, **teacher_fields(template_tokenizer, line, result["input_ids"],
                                                         result["weights"])}
    distilled = sum(1 for result in results if result["teacher_ids"])
    replay.stats.update(accepted=added.accepted, rejected=added.rejected, filtered=added.filtered, distilled=distilled)
    _log(f"replay: {added.accepted} accepted, {added.rejected} rejected (reasons in rejects.jsonl: an answer too "
         f"long for data.max_len is one), {added.filtered} filtered; {distilled} answers to distil from the base "
         "model (train.replay_kl)", started)
    replayed = ray.data.from_arrow(pa.Table.from_pylist(results, schema=RECORD_SCHEMA))
    return tokenized.union(replayed), tally.merge(added)


def _load_template_tokenizer(tokenizer: str, template: Template, cfg: Config) -> TemplateTokenizer:
    from crlft.data.template import TemplateTokenizer
    from crlft.model import load_tokenizer

    return TemplateTokenizer(template, load_tokenizer(tokenizer, cfg.template.end_of_turn, cfg.model.trust_remote_code))


class RecordDatasource(FileBasedDatasource):
    """Reads JSONL, JSON and Parquet files as rows (source, line, text, error), streaming within each file.

    Ray's read_text cannot give line numbers (it drops blank lines and the row index is lost once blocks are
    split); here each file is read by one task that numbers its own lines."""

    def __init__(self, paths: list[str], rows_per_block: int = ROWS_PER_READ_BLOCK, **kwargs: Any) -> None:
        super().__init__(paths, **kwargs)
        self._rows_per_block = rows_per_block

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> Any:
        if input_kind(path) == "parquet":
            return filesystem.open_input_file(path)  # Parquet needs random access: its footer, read first, is last
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
        for chunk in chunked(iter_raw_records(input_kind(path), f), self._rows_per_block):
            yield pa.table(
                {
                    "source": pa.array([path] * len(chunk), pa.string()),
                    "line": pa.array([r["line"] for r in chunk], pa.int64()),
                    "text": pa.array([r["text"] for r in chunk], pa.string()),
                    "error": pa.array([r["error"] for r in chunk], pa.string()),
                }
            )


class TokenizeRecords:
    """Ray Data actor: loads the tokenizer once, then validates and tokenizes batches of raw records."""

    def __init__(self, tokenizer: str, end_of_turn: str, trust_remote_code: bool, template: Template,
                 settings: RecordSettings) -> None:
        set_offline_defaults()
        from crlft.data.template import TemplateTokenizer
        from crlft.model import load_tokenizer

        self._tokenizer = TemplateTokenizer(template, load_tokenizer(tokenizer, end_of_turn, trust_remote_code))
        self._settings = settings

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = [batch.column(name).to_pylist() for name in ("source", "line", "text", "error")]
        results = [
            process_record(self._settings, self._tokenizer, source, RawRecord(line=line, text=text, error=error))
            for source, line, text, error in zip(*columns, strict=True)
        ]
        return pa.Table.from_pylist(results, schema=RECORD_SCHEMA)


def _tally(tokenized: Any) -> Tally:
    """Adds up one small summary per block (a few hundred bytes each), never the records."""
    summaries = tokenized.select_columns(TALLY_COLUMNS).map_batches(summarize_block, batch_size=None,
                                                                     batch_format="pyarrow")
    total = Tally()
    for row in summaries.iter_rows():
        total = total.merge(Tally.from_json(row["tally"]))
    return total


def _sorted_reject_lines(rejects: Any, count: int) -> Iterator[str]:
    if count == 0:
        return
    for row in rejects.sort(["source", "line"]).iter_rows():
        yield reject_line(row)


def _write_packed(accepted: Any, count: int, capacity: int, folder: str) -> int:
    """Pack one split into `folder`, one shard per packing group; returns the number of bins."""
    groups = pack_groups_for(count)
    shards = (
        accepted.select_columns(PACK_COLUMNS)
        .map_batches(with_group, fn_kwargs={"groups": groups}, batch_format="pyarrow")
        .groupby("group", num_partitions=groups)
        .map_groups(pack_and_write, fn_kwargs={"capacity": capacity, "folder": folder}, batch_format="pyarrow")
    )
    return sum(row["bins"] for row in shards.iter_rows())


def _tokenizer_pool(input_bytes: int | None) -> Any:
    """Up to one tokenizer actor per CPU. Starting one costs seconds (transformers, the tokenizer), so the pool
    starts with one per INPUT_BYTES_PER_ACTOR of input; Ray's autoscaler is slow to add them on its own."""
    import ray
    import ray.data

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    initial = min(cpus, max(1, math.ceil((input_bytes or 0) / INPUT_BYTES_PER_ACTOR)))
    return ray.data.ActorPoolStrategy(min_size=1, max_size=cpus, initial_size=initial)


@contextlib.contextmanager
def _data_context() -> Iterator[None]:
    """This stage's Ray Data settings, restored afterwards (the caller may be a longer pipeline).

    - Progress bars on a terminal; in logs (ray job logs, CI) only this stage's own lines.
    - The sort-based shuffle for the packing groups: Ray 2.60's default hash shuffle starts aggregator actors that
      cost tens of seconds on a small machine (measured: 23 s against 0.4 s for 500 conversations on 2 CPUs).
      RAY_DATA_DEFAULT_SHUFFLE_STRATEGY still overrides it.
    """
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.shuffle_strategy)
    terminal = sys.stderr.isatty()
    ctx.enable_progress_bars = terminal
    ctx.print_on_execution_start = terminal
    if "RAY_DATA_DEFAULT_SHUFFLE_STRATEGY" not in os.environ:
        ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    # ray.data: its INFO lines; its progress module: a warning that the bars are off (they are, on purpose).
    loggers = {logging.getLogger("ray.data"): logging.WARNING, logging.getLogger("ray.data._internal.progress"):
               logging.ERROR}  # fmt: skip
    levels = {logger: logger.level for logger in loggers}
    if not terminal:
        for logger, level in loggers.items():
            logger.setLevel(level)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.shuffle_strategy = saved
        for logger, level in levels.items():
            logger.setLevel(level)


def _log(message: str, started: float | None = None) -> None:
    elapsed = "" if started is None else f" ({time.monotonic() - started:.1f} s)"
    print(f"[data build] {message}{elapsed}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(stage_entrypoint("jobs.build_dataset"))
