"""The GPU check (benchmarks/gpu_check.py) cannot rot unseen: its smoke run executes every part of it (training steps
under each attention path this machine has, their agreement, packed against unpacked, the engine against `generate`)
on a tiny model on the CPU, through the shell entry the GPU machine runs, with only what that machine has: Ray, MLflow
and pydantic cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
NOT_ON_THE_GPU_MACHINE = ("ray", "mlflow", "pydantic")


def test_the_smoke_run_passes_with_only_what_the_gpu_machine_has(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in NOT_ON_THE_GPU_MACHINE:
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(blocked)}
    result = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--json", str(out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    check = json.loads(out.read_text())

    trained = [row for row in check["training"] if "tokens_per_s" in row]
    assert [(row["attention"], row["lora"]) for row in trained] == [("sdpa", False), ("sdpa", True)]
    assert all(row["supervised_tokens_per_s"] > 0 and 0 < row["mfu"] < 1 for row in trained)
    not_run = [row for row in check["training"] if "tokens_per_s" not in row]
    assert all("skipped" in row for row in not_run)  # no backward for FlexAttention on CPU, no flash attention

    assert [row["check"] for row in check["agreement"]] == ["flex_attention vs sdpa: loss",
                                                            "packed vs one conversation a row: loss",
                                                            "packed vs one conversation a row: grad_norm"]
    assert all(row["ok"] for row in check["agreement"])

    assert [row["batch"] for row in check["serving"]] == [1, 4]
    assert all(row["engine_tokens_per_s"] > 0 and row["generate_tokens_per_s"] > 0 for row in check["serving"])
    assert "| sdpa, LoRA |" in result.stdout and "| packed vs one conversation a row: loss |" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_without_a_gpu_only_the_smoke_runs() -> None:
    from benchmarks.gpu_check import main

    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
