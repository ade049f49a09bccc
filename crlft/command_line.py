"""What every `crlft` subcommand shares, Ray-free: `--config FILE` and `--set section.key=value`, a stage's own flags
for config keys (`config_flag`: type, choices, help and default come from the config's field), user errors as one
line and exit status 2, and `python -m <module>` entrypoints.

The command table (which subcommand runs which module) is the application's, in jobs/cli.py: this core names no
module of jobs/, services/ or benchmarks/. A stage module has `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import types
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from crlft.config import Config, load_config
from crlft.errors import CrlftError

# The parsed arguments carry the config keys their flags set under this name (`config_flag` registers each flag as a
# parser default), so that `config_from_args` needs nothing but the arguments.
CONFIG_KEYS = "_config_keys"


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


def config_field(key: str) -> FieldInfo:
    """The config model's field for a dotted key (`train.epochs`); KeyError names a key the config does not have."""
    model: type[BaseModel] = Config
    *sections, leaf = key.split(".")
    for name in sections:
        field = model.model_fields.get(name)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise KeyError(f"{key}: {name} is not a config section")
        model = annotation
    if leaf not in model.model_fields:
        raise KeyError(f"{key} is not a config key")
    return model.model_fields[leaf]


def _shown(value: Any) -> str:
    """A default as it would be written in YAML or after --set."""
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, str):
        return value
    return json.dumps(value)


def config_flag(
    parser: argparse.ArgumentParser, key: str, *flags: str, show_default: bool = True, **extra: Any
) -> argparse.Action:
    """Add a flag that sets the config key `key` (`config_flag(parser, "train.epochs", "--epochs")`).

    From the config's field: the type (int, float, str; `X | None` as X), choices (a Literal or an Enum), the bool
    behaviour (a field that is off by default: a plain switch, `--gpu`; one on or undecided by default: `--x` and
    `--no-x`), a metavar (N for integers, X for numbers) and the help: the field's description (or `help=`), the key
    and its default (`show_default=False` where the command starts from a recipe, not the defaults). `extra` goes to
    `add_argument` as it is (dest, metavar, help). The flag's default is None, so a flag not given changes nothing;
    `config_from_args` applies the ones given, after --config and --set.
    """
    if not flags:
        raise TypeError(f"config_flag({key!r}): name the flag, e.g. --{key.rsplit('.', 1)[-1].replace('_', '-')}")
    info = config_field(key)
    annotation, default = info.annotation, info.get_default(call_default_factory=True)
    if get_origin(annotation) in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            annotation = options[0]
    kwargs: dict[str, Any] = {"default": None}
    if annotation is bool:
        kwargs["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
    elif get_origin(annotation) is Literal:
        choices = list(get_args(annotation))
        kwargs.update(type=type(choices[0]), choices=choices)
    elif isinstance(annotation, type) and issubclass(annotation, Enum):
        kwargs.update(type=str, choices=[member.value for member in annotation])
    elif annotation in (int, float, str):
        kwargs["type"] = annotation
        if annotation is not str:
            kwargs["metavar"] = "N" if annotation is int else "X"
    else:
        raise TypeError(f"config_flag({key!r}): no flag for a field of type {info.annotation}; use --set {key}=...")
    text = extra.pop("help", None) or info.description or ""
    where = key if default is None or not show_default else f"{key}; default {_shown(default)}"
    kwargs["help"] = (f"{text} ({where})" if text else f"({where})").replace("%", "%%")
    kwargs.update(extra)
    action = parser.add_argument(*flags, **kwargs)
    keys = dict(parser.get_default(CONFIG_KEYS) or {})
    keys[action.dest] = key
    parser.set_defaults(**{CONFIG_KEYS: keys})
    return action


def config_from_args(args: argparse.Namespace) -> Config:
    """The config from --config, then --set overrides, then the flags `config_flag` added (those given)."""
    overrides: dict[str, Any] = {}
    for item in getattr(args, "overrides", []) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CrlftError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=2")
        overrides[key.strip()] = yaml.safe_load(value)
    for dest, key in (getattr(args, CONFIG_KEYS, None) or {}).items():
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
