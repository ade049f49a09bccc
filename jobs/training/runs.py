"""Ray Train run folders in `train.storage_path` (default `<state_dir>/ray_results`), local or a URI: one per run,
named after --out and the start time, with `crlft_run.json` saying which --out, data and MLflow run it belongs to.
`--resume` finds the newest run of the same --out and checks that it planned the same steps."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from crlft import storage
from crlft.config import Config
from crlft.errors import CrlftError
from crlft.train.schedule import StepPlan

RUN_FILE = "crlft_run.json"


@dataclass(frozen=True)
class RunRecord:
    """crlft_run.json in a Ray Train run folder."""

    out: str
    data: str
    base_model: str
    mlflow_run_id: str
    plan: dict[str, int]
    lr: float
    created: float = field(default_factory=time.time)


def storage_root(cfg: Config) -> str:
    return storage.location(cfg.train.storage_path or Path(cfg.state_dir) / "ray_results")


def run_name(out: Path) -> str:
    slug = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in out.name)[:40] or "model"
    return f"crlft-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000:04d}"


def write_run_record(root: str, name: str, record: RunRecord) -> None:
    storage.write_text(f"{root}/{name}/{RUN_FILE}", json.dumps(asdict(record), indent=2))


def find_run_to_resume(root: str, out: Path) -> tuple[str, RunRecord]:
    """The newest run folder in `root` whose record names `out`."""
    candidates = []
    for name in storage.subfolders(root):
        text = storage.read_text(f"{root}/{name}/{RUN_FILE}")
        if text is None:
            continue
        record = RunRecord(**json.loads(text))
        if record.out == str(out):
            candidates.append((record.created, name, record))
    if not candidates:
        raise CrlftError(f"nothing to resume: no run for --out {out} in {root}; start one without --resume")
    _, name, record = max(candidates)
    return name, record


def check_same_plan(record: RunRecord, plan: StepPlan, lr: float, name: str) -> None:
    if record.plan != asdict(plan) or not math.isclose(record.lr, lr):
        raise CrlftError(
            f"cannot resume run {name}: it planned {record.plan} at lr {record.lr:g}, this configuration plans "
            f"{asdict(plan)} at lr {lr:g}; resume with the same data, epochs, max_steps, workers, grad_accum and lr"
        )
