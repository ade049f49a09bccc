"""The README tells the truth: its configuration reference is the config model's, its quick commands run."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from crlft.config import reference_markdown
from jobs.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_configuration_reference_is_generated_from_the_config_model() -> None:
    section = re.search(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->", README, re.S)
    assert section, "README lost its configuration reference markers"
    assert section.group(1) == reference_markdown(), "regenerate it: python -m crlft.config"


def test_the_two_commands_are_the_makefile_targets_and_ci_runs_the_test_one() -> None:
    assert "make demo" in README and "make test" in README
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: install$", makefile, re.M) and re.search(r"^test: install\b", makefile, re.M)
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")


def quick_commands() -> list[str]:
    """The README's step-by-step commands that need no Ray: synth, init-model, data show (seconds each)."""
    block = re.search(r"## Using it step by step\n\n```bash\n(.*?)```", README, re.S)
    assert block
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    return [c for c in commands if c.startswith(("crlft synth", "crlft init-model", "crlft data show"))]


def test_readme_quick_commands_run_as_written(tmp_path: Path) -> None:
    commands = quick_commands()
    assert len(commands) == 3
    crlft = [sys.executable, "-m", "jobs.cli"]
    for command in commands:
        argv = shlex.split(command)
        done = subprocess.run(crlft + argv[1:], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
    assert (tmp_path / "models" / "tiny" / "model.safetensors").is_file()


@pytest.mark.parametrize("command", ["init-model", "synth", "data show", "data build", "train", "eval", "promote",
                                     "models", "serve", "pipeline", "submit", "jobs", "stop", "ablation", "demo",
                                     "feedback stats"])
def test_every_subcommand_explains_itself(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*command.split(), "--help"]
    with pytest.raises(SystemExit) as exited:
        build_parser(argv).parse_args(argv)
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--" in out.split("options:")[-1], out
