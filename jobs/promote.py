"""`crlft promote NAME --version V`: move the champion alias to V only if V is at least as good as the champion on
the same evaluation suite (or there is no champion). The decision and both figures are recorded on the version and
as an MLflow run. Exit status 0 when V holds the alias afterwards, 1 when the promotion was refused."""

from __future__ import annotations

import argparse

from crlft.command_line import add_config_arguments, config_from_args, stage_entrypoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="registered model name (default: registry.model_name, crlft-chat)")
    parser.add_argument("--version", required=True, help="the candidate version")
    parser.add_argument("--metric", help="metric compared, higher is better (default: registry.metric)")
    parser.add_argument("--suite", help="suite id the metric is compared on (default: the candidate's latest)")
    parser.add_argument("--alias", help="alias to move (default: registry.alias, champion)")
    parser.add_argument("--force", action="store_true", help="move the alias without comparing (recorded as forced)")
    parser.add_argument("--mlflow-uri", metavar="URI", help="MLflow tracking URI (default: config, env, local SQLite)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from crlft.lineage.promotion import promote

    cfg = config_from_args(args)
    decision = promote(
        args.name or cfg.registry.model_name, args.version, args.metric, args.force,
        suite=args.suite, alias=args.alias, cfg=cfg, tracking_uri=args.mlflow_uri,
    )  # fmt: skip
    print(decision.summary())
    figures = [f"candidate {decision.metric}={_shown(decision.candidate_value)}"]
    if decision.champion_version is not None:
        figures.append(f"previous {decision.alias} v{decision.champion_version} = {_shown(decision.champion_value)}")
    print(f"  suite {decision.suite or '-'}: " + "; ".join(figures))
    return 0 if decision.is_champion else 1


def _shown(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    raise SystemExit(stage_entrypoint("jobs.promote"))
