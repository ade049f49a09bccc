"""`crlft`: one command whose subcommands mirror the stages.

Each stage lives in a module with `add_arguments(parser)` and `run(args) -> int`; the same module is a
`python -m jobs.<stage>` entrypoint (what `ray job submit` runs) through `stage_entrypoint`. Every subcommand takes
`--config FILE` and `--set section.key=value` overrides; its own flags are shorthands for config keys.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml

from crlft.config import Config, load_config
from crlft.errors import CrlftError

# command -> (module, one-line help). Modules are imported only when their command runs (Ray is slow to import).
COMMANDS: dict[str, tuple[str, str]] = {
    "init-model": ("crlft.commands.init_model", "build the embedded default model and tokenizer (no download)"),
    "synth": ("crlft.commands.synth", "write the synthetic mixed-quality suite (train / held-out / eval)"),
    "data show": ("crlft.commands.show", "print conversations as the model sees them, tokens marked with weights"),
    "data build": ("jobs.build_dataset", "Ray Data: validate, condition, tokenize and pack conversations"),
    "train": ("jobs.train", "Ray Train: C-RLFT across workers, with checkpoints and MLflow tracking"),
    "eval": ("jobs.evaluate", "evaluate a model: accuracy per condition, condition swap, embeddings, benchmarks"),
    "promote": ("jobs.promote", "move the champion alias to a registered version if it is at least as good"),
    "models": ("jobs.models", "list registered model versions with their metrics and aliases"),
    "serve": ("services.serve_cli", "serve a model behind the OpenAI-compatible endpoint (Ray Serve)"),
    "pipeline": ("jobs.pipeline", "data -> train -> evaluate -> register -> promote (-> deploy)"),
    "submit": ("jobs.submit", "submit a stage to a Ray cluster through the Jobs API"),
    "jobs": ("jobs.submit_list", "list the jobs of a Ray cluster"),
    "stop": ("jobs.submit_stop", "stop a job on a Ray cluster"),
    "ablation": ("benchmarks.ablation", "reproduce the paper's ablation on the synthetic suite"),
    "demo": ("jobs.demo", "the whole product on the embedded defaults, ending with answers from the served model"),
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML configuration (see README: Configuration)")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override a config key, e.g. --set train.epochs=2 (repeatable; VALUE is YAML)",
    )


def config_from_args(args: argparse.Namespace, flags: Mapping[str, str] | None = None) -> Config:
    """The config from --config, then --set overrides, then the stage's own flags (`dest -> section.key`)."""
    overrides: dict[str, Any] = {}
    for item in getattr(args, "overrides", []) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CrlftError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=2")
        overrides[key.strip()] = yaml.safe_load(value)
    for dest, key in (flags or {}).items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides[key] = value
    return load_config(getattr(args, "config", None), overrides)


def _load(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None
        raise


def selected_command(argv: Sequence[str]) -> str | None:
    """The command named by argv (`data build` is two words), found without importing any stage."""
    words = [a for a in argv[:2] if not a.startswith("-")]
    for n in (2, 1):
        name = " ".join(words[:n])
        if len(words) >= n and name in COMMANDS:
            return name
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Every command is listed; only the selected one's module is imported (stages import Ray, which is slow)."""
    selected = selected_command(argv)
    parser = argparse.ArgumentParser(
        prog="crlft",
        description="C-RLFT (OpenChat) fine-tuning and serving on Ray: mixed-quality conversations are labelled by "
        "source, the source is written into the prompt, and the loss is weighted by each source's reward.",
    )
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (module_name, help_text) in COMMANDS.items():
        sub = top
        leaf = name
        if " " in name:
            group, leaf = name.split(" ", 1)
            if group not in groups:
                group_parser = top.add_parser(group, help=f"{group} commands")
                groups[group] = group_parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            sub = groups[group]
        p = sub.add_parser(leaf, help=help_text, description=help_text)
        if name != selected:
            continue
        module = _load(module_name)
        if module is None:
            p.set_defaults(_run=_not_built(name))
            continue
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _not_built(name: str) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        print(f"crlft {name}: this stage is not built yet", file=sys.stderr)
        return 3

    return run


def run_guarded(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """User errors become one clear line and exit status 2; set CRLFT_DEBUG=1 for the traceback."""
    try:
        return int(run(args) or 0)
    except CrlftError as exc:
        if os.environ.get("CRLFT_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def stage_entrypoint(module_name: str, argv: Sequence[str] | None = None) -> int:
    """`python -m jobs.<stage>`: the same flags as the matching `crlft` subcommand."""
    module = importlib.import_module(module_name)
    help_text = next((h for m, h in COMMANDS.values() if m == module_name), None)
    parser = argparse.ArgumentParser(prog=f"python -m {module_name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    return run_guarded(module.run, args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    return run_guarded(args._run, args)


if __name__ == "__main__":
    raise SystemExit(main())
