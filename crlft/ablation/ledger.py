"""An ablation's finished work on disk, so that one that stopped (a crash, a closed laptop, a budget of hours running
out: the real-model ablation takes hours) goes on where it stopped when the same command is given the same --out.

    <out>/ablation.json           its id and the settings its runs depend on (the configuration, base model, suite,
                                  step budget); another command's settings on the same --out are refused
    <out>/base.json               the base model's figures (a real base model)
    <out>/runs/<slug>-seed<N>.json  one finished run's RunResult, written when its evaluation has ended

A run is finished only once its file is there: one stopped halfway is trained again from the start. Seeds and variants
are not settings: a later command may add seeds or variants to an ablation and trains only what is missing.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from crlft.ablation.summary import RunResult
from crlft.config import flatten
from crlft.errors import CrlftError
from crlft.storage import write_whole

ABLATION_FILE = "ablation.json"
BASE_FILE = "base.json"
RUNS_FOLDER = "runs"


def _write_json(path: Path, data: Any) -> None:
    """Whole or not at all: a process killed while writing leaves no half file behind to be read as finished."""
    write_whole(path, json.dumps(data, indent=2) + "\n")


class Ledger:
    def __init__(self, out: Path) -> None:
        self.out = out

    def open(self, settings: dict[str, Any], new_id: str) -> str:
        """The ablation's id: `new_id` for a new --out, the recorded one where `out` holds an ablation with the same
        settings (JSON-able, nested); a CrlftError naming what differs where they are not the same."""
        path = self.out / ABLATION_FILE
        if not path.is_file():
            _write_json(path, {"id": new_id, "settings": settings})
            return new_id
        recorded = json.loads(path.read_text())
        before, now = flatten(recorded["settings"]), flatten(json.loads(json.dumps(settings)))
        differ = sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key))
        if differ:
            shown = "; ".join(f"{key}: {before.get(key)} before, {now.get(key)} now" for key in differ[:5])
            raise CrlftError(f"{self.out} holds ablation {recorded['id']} run with other settings ({shown}"
                             f"{'; ...' if len(differ) > 5 else ''}): give it the same command to go on with it, "
                             "or a new --out")  # fmt: skip
        return str(recorded["id"])

    def _run_path(self, slug: str, seed: int) -> Path:
        return self.out / RUNS_FOLDER / f"{slug}-seed{seed}.json"

    def finished(self, slug: str, seed: int) -> RunResult | None:
        """The run's result where an earlier command finished it."""
        path = self._run_path(slug, seed)
        return RunResult(**json.loads(path.read_text())) if path.is_file() else None

    def record(self, slug: str, result: RunResult) -> None:
        _write_json(self._run_path(slug, result.seed), asdict(result))

    def base(self) -> dict[str, float] | None:
        path = self.out / BASE_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def record_base(self, figures: dict[str, float]) -> None:
        _write_json(self.out / BASE_FILE, figures)
