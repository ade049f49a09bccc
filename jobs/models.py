"""`crlft models [NAME]`: the versions of a registered model with their aliases, lineage and recorded metrics; for an
adapter the base version it runs on, for a base (registry.base_model_name) the adapter versions on it."""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence

from crlft.command_line import add_config_arguments, config_from_args, stage_entrypoint
from crlft.lineage.tags import ADAPTER_OF_TAG, PROMOTION_TAG, TAG
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
    versions = list_versions(name, cfg, tracking_uri=args.mlflow_uri)
    adapters = None
    if name == cfg.registry.base_model_name:
        from crlft.lineage.bases import adapters_on

        adapters = {v.version: adapters_on(f"models:/{name}/{v.version}", cfg, args.mlflow_uri) for v in versions}
    print(format_versions(versions, metrics, adapters))
    return 0


def format_versions(versions: Sequence[ModelVersionInfo], metrics: Sequence[str],
                    adapters: Mapping[str, Sequence[str]] | None = None) -> str:
    """One row per version: aliases, mode, created, the base it runs on (an adapter), the metrics on its latest suite,
    the latest promotion decision; with `adapters` (version -> NAME/VERSION, for a base), the adapters on each."""
    header = ["version", "aliases", "mode", "created", "base", "suite", *metrics, "promotion"]
    if adapters is not None:
        header.append("adapters")
    rows = []
    for info in versions:
        latest = info.latest_suite
        # figures not on the latest suite (the held-out file's silhouette, a benchmark) are shown from any suite
        values = [info.metric(m) if info.metric(m) is not None else _any_suite(info, m) for m in metrics]
        rows.append([
            info.version, ",".join(info.aliases) or "-", info.tags.get(TAG + "mode", "?"),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created_ms / 1000)),
            info.tags.get(ADAPTER_OF_TAG, "-").removeprefix("models:/"), latest or "-",
            *("-" if v is None else f"{v:.4f}" for v in values),
            info.tags.get(PROMOTION_TAG + "decision", "-"),
        ])  # fmt: skip
        if adapters is not None:
            rows[-1].append(", ".join(adapters.get(info.version, ())) or "-")
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
