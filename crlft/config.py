"""One typed configuration for every stage: loaded from YAML, overridden from the CLI, logged with every run.

The defaults are the paper's (../shared/CRLFT.md): class GPT4 (reward 1.0, the inference condition; ShareGPT models
"Model: GPT-4" and "gpt-4*") and class GPT3 (reward 0.1, the default class for everything else).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from crlft.errors import CrlftError


class Mode(StrEnum):
    """The paper's ablation modes: C-RLFT and its two halves, and plain SFT."""

    crlft = "crlft"  # condition in the prompt + reward-weighted loss
    conditioned = "conditioned"  # condition in the prompt, every reward 1
    weighted = "weighted"  # reward-weighted loss, no condition in the prompt
    sft = "sft"  # neither

    @property
    def uses_condition(self) -> bool:
        return self in (Mode.crlft, Mode.conditioned)

    @property
    def uses_reward(self) -> bool:
        return self in (Mode.crlft, Mode.weighted)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClassSpec(_Strict):
    """A data source class: its coarse reward, and rules that assign records to it.

    `match` maps a record field to glob patterns (fnmatch, case-insensitive); a record matches when any pattern of any
    field matches. An explicit `condition`/`class` field in the record always wins over rules.
    """

    reward: float = Field(gt=0.0, le=10.0)
    match: dict[str, list[str]] = Field(default_factory=dict)


def _default_classes() -> dict[str, ClassSpec]:
    return {
        "GPT4": ClassSpec(reward=1.0, match={"model": ["Model: GPT-4", "gpt-4*"]}),
        "GPT3": ClassSpec(reward=0.1),
    }


class TemplateConfig(_Strict):
    """The conditioned conversation template (crlft.template renders it; nothing else does)."""

    end_of_turn: str = "<|end_of_turn|>"
    # `{condition}` is left out (with its space) in modes without a condition in the prompt.
    role_prefix: str = "{condition} {role}:"
    user_role: str = "User"
    assistant_role: str = "Assistant"


class DataConfig(_Strict):
    max_len: int = Field(2048, ge=16, description="longest conversation in tokens; longer ones follow `overflow`")
    pack_len: int = Field(2048, ge=16, description="token budget of one packed bin (>= max_len)")
    overflow: Literal["truncate", "reject"] = Field(
        "truncate", description="over-long conversations: drop trailing turns (at a turn boundary) or reject"
    )
    per_sequence: bool = Field(
        False, description="divide each assistant message's weights by its length (the reference keeps it off)"
    )
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of conversations held out for validation")
    only_classes: list[str] | None = Field(None, description="keep only these classes (e.g. expert-only ablation)")
    seed: int = 0
    num_blocks: int = Field(8, ge=1, description="Ray Data read parallelism for small inputs")


class ModelConfig(_Strict):
    base_model: str = Field(
        ".crlft/models/tiny", description="HF model directory or hub id; the default is built locally"
    )
    preset: Literal["tiny", "small"] = "tiny"
    trust_remote_code: bool = False


class LoraConfig(_Strict):
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    merge: bool = Field(True, description="export the merged model (True) or keep the adapter (False)")


class TrainConfig(_Strict):
    mode: Mode = Mode.crlft
    epochs: int = Field(5, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps")
    lr: float | None = Field(None, gt=0, description="peak learning rate; None = the reference's auto rule")
    lr_floor: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of the peak")
    warmup: float = Field(0.05, ge=0, lt=1, description="warm-up fraction of the steps")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = Field(1, ge=1, description="micro-batches (packed bins) per optimiser step and worker")
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    gradient_checkpointing: bool = False
    lora: LoraConfig = Field(default_factory=LoraConfig)
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (0: only at the end)")
    num_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    storage_path: str = Field(".crlft/ray_results", description="Ray Train storage (shared storage on clusters)")
    seed: int = 0


class RegistryConfig(_Strict):
    tracking_uri: str | None = Field(None, description="MLflow URI; default MLFLOW_TRACKING_URI or the local SQLite")
    experiment: str = "crlft"
    model_name: str = "crlft-chat"
    alias: str = "champion"
    metric: str = "accuracy_expert"


class ServeConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = Field(None, description="name served at /v1/models (default: the model's own)")
    api_keys: list[str] = Field(default_factory=list)
    max_new_tokens: int = 256
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    cpus_per_replica: float = 0.5
    gpus_per_replica: float = 0.0
    max_ongoing_requests: int = 32
    max_queued_requests: int = 64
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.02


class Config(_Strict):
    classes: dict[str, ClassSpec] = Field(default_factory=_default_classes)
    default_class: str | None = Field("GPT3", description="class of records no rule matches (None: reject them)")
    inference_condition: str = "GPT4"
    template: TemplateConfig = Field(default_factory=TemplateConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    state_dir: str = Field(".crlft", description="project-local state: models, data, MLflow, checkpoints")

    @model_validator(mode="after")
    def _classes_are_consistent(self) -> Config:
        names = set(self.classes)
        if not names:
            raise ValueError("at least one class is needed")
        if self.inference_condition not in names:
            raise ValueError(
                f"inference_condition {self.inference_condition!r} is not a class; classes: {sorted(names)}"
            )
        if self.default_class is not None and self.default_class not in names:
            raise ValueError(f"default_class {self.default_class!r} is not a class; classes: {sorted(names)}")
        if self.data.pack_len < self.data.max_len:
            raise ValueError(f"data.pack_len ({self.data.pack_len}) must be >= data.max_len ({self.data.max_len})")
        for name in names:
            if not name or any(ch.isspace() for ch in name):
                raise ValueError(f"class name {name!r} must be a non-empty word (it is written into the prompt)")
        return self

    def reward(self, condition: str) -> float:
        """The training weight of a class under the configured mode (1.0 where the mode ignores rewards)."""
        return self.classes[condition].reward if self.train.mode.uses_reward else 1.0

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise CrlftError(f"override {dotted}: {key} is not a section")
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load YAML (or the defaults), apply `section.key: value` overrides, validate; errors name the field."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise CrlftError(f"config file {p} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise CrlftError(f"{p}: not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise CrlftError(f"{p}: the top level must be a mapping of sections")
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        where = f"{path}: " if path else ""
        lines = [f"{'.'.join(str(x) for x in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()]
        raise CrlftError(f"{where}invalid configuration: " + "; ".join(lines)) from None
