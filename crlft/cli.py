"""What every `crlft` subcommand shares, Ray-free: `--config FILE` and `--set section.key=value` (a stage's own flags
are shorthands for config keys), user errors as one line and exit status 2, and `python -m <module>` entrypoints.

The command table (which subcommand runs which module) is the application's, in jobs/cli.py: this core names no
module of jobs/, services/ or benchmarks/. A stage module has `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml

from crlft.config import Config, load_config
from crlft.errors import CrlftError


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


def run_guarded(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """User errors become one clear line and exit status 2; set CRLFT_DEBUG=1 for the traceback."""
    try:
        return int(run(args) or 0)
    except CrlftError as exc:
        if os.environ.get("CRLFT_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or a stop signal turned into one (cluster.session.Stopped)
        print("interrupted" if type(exc) is KeyboardInterrupt else f"stopped ({exc})", file=sys.stderr)
        return 128 + int(getattr(exc, "signum", signal.SIGINT))


def stage_entrypoint(module_name: str, argv: Sequence[str] | None = None) -> int:
    """`python -m <module>` for a stage module (what `ray job submit` runs): its flags, described by the first line
    of its docstring."""
    module = importlib.import_module(module_name)
    description = module.__doc__.strip().splitlines()[0] if module.__doc__ else None
    parser = argparse.ArgumentParser(prog=f"python -m {module_name}", description=description)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    return run_guarded(module.run, args)
