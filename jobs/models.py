"""`crlft models [NAME]`: the versions of a registered model with their aliases, lineage and recorded metrics."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from crlft.command_line import add_config_arguments, config_from_args, stage_entrypoint
from crlft.lineage.tags import PROMOTION_TAG, TAG
from crlft.lineage.versions import ModelVersionInfo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="registered model name (default: registry.model_name, crlft-chat)")
    parser.add_argument("--metric", action="append",
                        help="metric column(s) to show (default: registry.metric, retention, condition_gap, "
                        "silhouette)")
    parser.add_argument("--mlflow-uri", metavar="URI", help="MLflow tracking URI (default: config, env, local SQLite)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from crlft.lineage.versions import list_versions

    cfg = config_from_args(args)
    name = args.name or cfg.registry.model_name
    metrics = args.metric or [cfg.registry.metric, "retention", "condition_gap", "silhouette"]
    print(format_versions(list_versions(name, cfg, tracking_uri=args.mlflow_uri), metrics))
    return 0


def format_versions(versions: Sequence[ModelVersionInfo], metrics: Sequence[str]) -> str:
    """One row per version: aliases, mode, created, the metrics on its latest suite, the latest promotion decision."""
    header = ["version", "aliases", "mode", "created", "suite", *metrics, "promotion"]
    rows = []
    for info in versions:
        latest = info.latest_suite
        # figures not on the latest suite (the held-out file's silhouette, a benchmark) are shown from any suite
        values = [info.metric(m) if info.metric(m) is not None else _any_suite(info, m) for m in metrics]
        rows.append([
            info.version, ",".join(info.aliases) or "-", info.tags.get(TAG + "mode", "?"),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created_ms / 1000)), latest or "-",
            *("-" if v is None else f"{v:.4f}" for v in values),
            info.tags.get(PROMOTION_TAG + "decision", "-"),
        ])  # fmt: skip
    if not rows:
        return f"no versions (header: {' '.join(header)})"
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join([f"{versions[0].name}:", *lines])


def _any_suite(info: ModelVersionInfo, metric: str) -> float | None:
    for figures in info.evaluations.values():
        if metric in figures:
            return figures[metric]
    return None


if __name__ == "__main__":
    raise SystemExit(stage_entrypoint("jobs.models"))
