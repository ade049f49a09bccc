"""Every stage flag that stands for a config key is derived from the config's field (crlft.command_line.config_flag):
it sets its key, its help names the key, its choices are the field's; no stage keeps a hand-written flag map."""

from __future__ import annotations

import argparse
import importlib
import inspect
import tomllib
from enum import Enum
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest

from crlft.command_line import CONFIG_KEYS, config_field, config_flag, config_from_args
from crlft.config import MOVED_KEYS, Config, Mode, load_config
from crlft.errors import CrlftError
from jobs.cli import COMMANDS, main


def stage_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"crlft {command}")
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    return parser


def config_value(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for name in key.split("."):
        value = getattr(value, name)
    return value


def field_choices(key: str) -> list[Any] | None:
    """The values a field allows, read from its annotation (None: not a closed set)."""
    annotation = config_field(key).annotation
    options = [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) is not Literal else []
    if len(options) == 1:
        annotation = options[0]
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return [member.value for member in annotation]
    return None


def required_argv(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholder values for a stage's required positionals and options."""
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings and action.nargs not in ("?", "*", argparse.REMAINDER):
            argv.append("x")
        elif action.option_strings and action.required:
            argv += [action.option_strings[0], "x"]
    return argv


def not_the_default(action: argparse.Action, default: Any) -> tuple[list[str], Any]:
    """Arguments giving the flag a value other than the config's default, and the value the config should get."""
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        return ([flag], True) if default is False else ([f"--no-{flag[2:]}"], False)
    if action.nargs == 0:  # a switch
        return [flag], True
    default = default.value if isinstance(default, Enum) else default
    if action.choices:
        value = next(c for c in action.choices if c != default)
    elif action.type is int:
        value = 4096 if default is None else default + 1  # unset sizes: one every key takes (data.pack_len >= max_len)
    elif action.type is float:
        value = default / 2 if default else 0.5
    else:
        value = "elsewhere"
    return [flag, str(value)], value


CONFIG_COMMANDS = ["train", "data build", "pipeline", "serve", "eval", "data show", "init-model", "demo"]


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_every_config_flag_of_a_stage_sets_its_config_key(command: str) -> None:
    parser = stage_parser(command)
    keys = parser.get_default(CONFIG_KEYS)
    assert keys, f"crlft {command} has no flag from the config"
    actions = {action.dest: action for action in parser._actions}
    defaults = Config()
    argv, expected = required_argv(parser), {}
    for dest, key in keys.items():
        given, value = not_the_default(actions[dest], config_value(defaults, key))
        argv += given
        expected[key] = value
    cfg = config_from_args(parser.parse_args(argv))
    assert {key: config_value(cfg, key) for key in expected} == expected
    untouched = config_from_args(parser.parse_args(required_argv(parser)))
    assert untouched == defaults, "a flag not given must leave its key at the config's value"


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_a_config_flags_help_names_its_key_and_its_choices_are_the_fields(command: str) -> None:
    parser = stage_parser(command)
    for dest, key in parser.get_default(CONFIG_KEYS).items():
        action = next(a for a in parser._actions if a.dest == dest)
        assert f"({key}" in action.help, action.help
        if not isinstance(action, argparse.BooleanOptionalAction):
            assert action.choices == field_choices(key), f"{action.option_strings[0]} of crlft {command}"
        assert action.default is None  # not given: the config decides


def test_no_stage_keeps_a_flag_map() -> None:
    assert list(inspect.signature(config_from_args).parameters) == ["args"]
    for command in CONFIG_COMMANDS:
        assert not hasattr(importlib.import_module(COMMANDS[command][0]), "_FLAGS"), command


def test_stage_help_shows_the_key_each_flag_sets(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["train", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(train.epochs; default 5)", "(train.mode; default crlft)", "(train.use_gpu; default false)",
                  "(model.base_model; default .crlft/models/tiny)", "(train.max_steps)"):
        assert shown in text, text


def test_a_value_outside_the_fields_choices_is_refused_by_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["train", "--data", "d", "--out", "o", "--mode", "bogus"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --mode: invalid choice: 'bogus'" in err and all(m.value in err for m in Mode), err


def test_config_flag_derives_switches_and_refuses_what_it_cannot_derive() -> None:
    parser = argparse.ArgumentParser()
    config_flag(parser, "train.use_gpu", "--gpu")  # off by default: a switch
    config_flag(parser, "data.replay.enabled", "--replay")  # undecided by default: --replay and --no-replay
    config_flag(parser, "serve.port", "--port", metavar="PORT")
    assert config_from_args(parser.parse_args(["--gpu", "--no-replay", "--port", "9"])).model_dump(
        include={"train": {"use_gpu"}, "data": {"replay": {"enabled"}}, "serve": {"port"}}
    ) == {"train": {"use_gpu": True}, "data": {"replay": {"enabled": False}}, "serve": {"port": 9}}
    assert config_from_args(parser.parse_args([])) == Config()
    with pytest.raises(SystemExit):
        parser.parse_args(["--gpu", "yes"])
    with pytest.raises(KeyError, match="train.epoch is not a config key"):
        config_flag(parser, "train.epoch", "--epoch")
    with pytest.raises(TypeError, match="--set serve.api_keys"):
        config_flag(parser, "serve.api_keys", "--api-key")


def test_a_flag_overrides_the_same_key_given_with_set() -> None:
    parser = stage_parser("train")
    args = parser.parse_args(["--data", "d", "--out", "o", "--set", "train.epochs=2", "--set", "train.lr=0.001",
                              "--epochs", "3"])
    cfg = config_from_args(args)
    assert (cfg.train.epochs, cfg.train.lr) == (3, 0.001)


def test_a_moved_key_in_a_config_file_or_set_names_its_new_place(tmp_path: Path) -> None:
    """The engine's settings moved from serve.* to inference.*: an old config or --set is told where, not pydantic's
    "extra inputs are not permitted"; the flags kept their names and set the new keys."""
    old = tmp_path / "old.yaml"
    old.write_text("serve:\n  port: 9\n  engine: vllm\n  max_batch_size: 8\n")
    with pytest.raises(CrlftError) as raised:
        load_config(old)
    message = str(raised.value)
    assert "serve.engine moved to inference.engine" in message, message
    assert "serve.max_batch_size moved to inference.max_batch_size" in message and "not permitted" not in message
    parser = stage_parser("serve")
    for key in MOVED_KEYS:
        with pytest.raises(CrlftError, match=rf"{key} moved to {MOVED_KEYS[key]}"):
            config_from_args(parser.parse_args([*required_argv(parser), "--set", f"{key}=1"]))
    for command in ("serve", "eval"):
        parser = stage_parser(command)
        cfg = config_from_args(parser.parse_args([*required_argv(parser), "--engine", "transformers"]))
        assert cfg.inference.engine == "transformers", command
    assert load_config(None, {"inference.engine": "vllm"}).inference.engine == "vllm"


def test_every_command_runs_a_module_of_the_installed_packages() -> None:
    """`pip install .` installs crlft, jobs, services and cluster (pyproject.toml); benchmarks/ stays in the clone."""
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    installed = {pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {name: module for name, (module, _) in COMMANDS.items() if module.split(".")[0] not in installed} == {}
