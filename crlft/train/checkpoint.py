"""What resuming needs, in one folder: the trainable weights, optimiser and scheduler state, the data position and
every rank's RNG state, through torch.distributed.checkpoint's full state dicts, so DDP, FSDP and single-process runs
save and load the same files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim.lr_scheduler import LambdaLR

from crlft.errors import CrlftError
from crlft.train.rng import gather_rng_states

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "trainer_state.json"


@dataclass(frozen=True)
class TrainingPosition:
    """Where a run is: optimiser steps done, and the epoch and step inside it to continue from."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


_SAVE_OPTIONS = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
_LOAD_OPTIONS = StateDictOptions(full_state_dict=True, strict=False)


def save_training_state(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    position: TrainingPosition,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write what resuming needs into `directory`. Every rank must call it (state dicts are gathered collectively);
    only rank 0 writes. Frozen parameters (the base model under LoRA) are not saved: they are the base model's.
    A failed write is a CrlftError naming the folder and the cause."""
    model_state = get_model_state_dict(model, options=_SAVE_OPTIONS)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_SAVE_OPTIONS)
    rng_states = gather_rng_states()
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    out = Path(directory)
    state = {"position": asdict(position), "scheduler": scheduler.state_dict(), "extra": dict(extra or {})}
    try:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(model_state, out / MODEL_FILE)
        torch.save(optimizer_state, out / OPTIMIZER_FILE)
        torch.save(rng_states, out / RNG_FILE)
        (out / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
    except (OSError, RuntimeError) as error:  # torch's writer reports a failed write (a full disk) as RuntimeError
        cause = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
        raise CrlftError(f"cannot write the training state to {out}: {cause}") from error


def load_model_weights(directory: str | Path, model: nn.Module) -> None:
    """Load the saved trainable weights into `model` (wrapped or not); every saved tensor must find its parameter."""
    saved = torch.load(Path(directory) / MODEL_FILE, weights_only=True, map_location="cpu")
    expected = set(get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)))
    unknown = sorted(set(saved) - expected)
    if unknown:
        raise CrlftError(
            f"checkpoint {directory} does not match the model: {len(unknown)} saved tensors have no trainable "
            f"parameter (e.g. {unknown[:3]}); resume with the same base model and LoRA settings"
        )
    set_model_state_dict(model, saved, options=_LOAD_OPTIONS)


@dataclass(frozen=True)
class LoadedState:
    position: TrainingPosition
    rng_states: list[dict[str, Any]]
    extra: dict[str, Any]


def load_training_state(
    directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LambdaLR
) -> LoadedState:
    """Restore weights, optimiser and scheduler from `directory` (on every rank); return the position and RNG states."""
    path = Path(directory)
    load_model_weights(path, model)
    optimizer_state = torch.load(path / OPTIMIZER_FILE, weights_only=True, map_location="cpu")
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_LOAD_OPTIONS)
    state = json.loads((path / STATE_FILE).read_text())
    scheduler.load_state_dict(state["scheduler"])
    rng_states = torch.load(path / RNG_FILE, weights_only=True)
    return LoadedState(TrainingPosition(**state["position"]), rng_states, state["extra"])
