"""`crlft`: one command whose subcommands mirror the stages (`crlft COMMAND --help` explains each).

The table below says which module runs each command; every module has `add_arguments(parser)` and `run(args) -> int`
and is also its own `python -m` entrypoint (crlft.command_line.stage_entrypoint), which is what `ray job submit` runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from crlft.command_line import run_guarded
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
    "feedback stats": ("crlft.commands.feedback_stats", "a completion store's answers per model and version by "
                       "feedback, and what `data build STORE` would train on"),
    "serve": ("services.serve_cli", "serve a model behind the OpenAI-compatible endpoint (Ray Serve)"),
    "pipeline": ("jobs.pipeline", "data -> train -> evaluate -> register -> promote (-> deploy)"),
    "submit": ("jobs.submit", "submit a stage to a Ray cluster through the Jobs API"),
    "jobs": ("jobs.submit_list", "list the jobs of a Ray cluster"),
    "stop": ("jobs.submit_stop", "stop a job on a Ray cluster"),
    "ablation": ("jobs.ablation", "reproduce the paper's ablation on the synthetic suite"),
    "demo": ("jobs.demo", "the whole product on the embedded defaults, ending with answers from the served model"),
}


def selected_command(argv: Sequence[str]) -> str | None:
    """The command named by argv (`data build` is two words), found without importing any stage."""
    words = [a for a in argv[:2] if not a.startswith("-")]
    for n in (2, 1):
        name = " ".join(words[:n])
        if len(words) >= n and name in COMMANDS:
            return name
    return None


def _module(name: str) -> ModuleType:
    """The command's module: every one is in the installed packages."""
    return importlib.import_module(COMMANDS[name][0])


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
    for name, (_, help_text) in COMMANDS.items():
        sub, leaf = top, name
        if " " in name:
            group, leaf = name.split(" ", 1)
            if group not in groups:
                group_parser = top.add_parser(group, help=f"{group} commands")
                groups[group] = group_parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            sub = groups[group]
        p = sub.add_parser(leaf, help=help_text, description=help_text)
        if name == selected:
            module = _module(name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
    except CrlftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    return run_guarded(args._run, args)


if __name__ == "__main__":
    raise SystemExit(main())
