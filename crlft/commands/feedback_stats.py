"""`crlft feedback stats STORE`: what a completion store holds, per served model and version (stored answers, rated
up, rated down, corrected, unrated), and what `crlft data build STORE` would train on under the current config."""

from __future__ import annotations

import argparse
import json
from typing import Any

from crlft.command_line import add_config_arguments, config_from_args, stage_entrypoint
from crlft.data.feedback import FeedbackRules, feedback_table, store_records, training_summary
from crlft.data.store import read_store, snapshot
from crlft.storage import location

COLUMNS = ("stored", "rated_up", "rated_down", "corrected", "unrated")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Count a completion store's answers per served model and version by their feedback (rated up, rated down, "
        "corrected, unrated; the latest feedback on an answer counts), and say what `crlft data build STORE` would "
        "train on: records per class under data.feedback (rated up and corrected as inference_condition, unrated as "
        "the lowest-reward class, rated down not at all, unless set), less duplicates. Those records are still "
        "checked by the template and data.max_len when built.")
    parser.add_argument("store", metavar="STORE", help="the completion store: folder or URI (serve.store.uri)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_config_arguments(parser)


def feedback_stats(root: str, rules: FeedbackRules) -> dict[str, Any]:
    """The report as data (what --json prints)."""
    taken = snapshot(root)
    contents = read_store(root)
    return {
        "store": root, "snapshot": taken, "models": feedback_table(contents, rules),
        "orphan_feedback": contents.orphan_feedback,
        "training": training_summary(store_records(contents, rules), rules),
    }  # fmt: skip


def format_report(report: dict[str, Any]) -> str:
    rows = [("model", "version", *(c.replace("_", " ") for c in COLUMNS))]
    rows += [(m["model"], m["model_version"], *(str(m[c]) for c in COLUMNS)) for m in report["models"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"completion store {report['store']} (snapshot {report['snapshot']})"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    if not report["models"]:
        lines.append("(no stored answers yet)")
    if report["orphan_feedback"]:
        lines.append(f"{report['orphan_feedback']} feedback rows name no stored answer (not counted)")
    training = report["training"]
    per_class = ", ".join(f"{name} {n}" for name, n in training["records_per_class"].items()) or "nothing"
    classes = ", ".join(f"{kind.replace('_', ' ')} -> {name or 'not trained'}"
                        for kind, name in training["classes"].items())
    lines.append(f"data build would train on: {per_class} ({training['excluded']} excluded, "
                 f"{training['duplicates']} duplicates); classes: {classes} (data.feedback)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    report = feedback_stats(location(args.store), FeedbackRules.from_config(cfg))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_entrypoint("crlft.commands.feedback_stats"))
