"""One typed configuration for every stage: loaded from YAML, overridden from the CLI, logged with every run.

The defaults are the OpenChat paper's: class GPT4 (reward 1.0, the inference condition; ShareGPT models
"Model: GPT-4" and "gpt-4*") and class GPT3 (reward 0.1, the default class for everything else).

Longer than other modules, and meant to be: every setting of every stage is declared here once, with its type, default
and description, from which the CLI's flags, `--help` and the README's reference derive.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

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
    """The conditioned conversation template (crlft.data.template renders it; nothing else does)."""

    end_of_turn: str = Field("<|end_of_turn|>", description="special token closing each turn (added to the vocabulary)")
    # `{condition}` is left out (with its space) in modes without a condition in the prompt.
    role_prefix: str = Field("{condition} {role}:", description="prefix of each turn; `{condition}` is the class")
    user_role: str = Field("User", description="`{role}` of user turns")
    assistant_role: str = Field("Assistant", description="`{role}` of assistant turns")


class ReplayConfig(_Strict):
    """Replay (self-distillation): the base model's own greedy answers to general prompts, mixed into the training data
    so that a fine-tune on narrow data keeps what the model knew (jobs/replay.py)."""

    enabled: bool | None = Field(
        None, description="mix in replay conversations; None: on for a pretrained base model, off for the embedded "
        "tiny one (it knows nothing to keep)"
    )
    prompts: str | None = Field(
        None, description="general prompts: JSONL (`{\"prompt\": ...}` a line) or TXT (one a line); None: the "
        "shipped set (crlft.eval.general_check.REPLAY_PROMPTS_FILE)"
    )
    ratio: float = Field(
        0.5, ge=0.0, description="replay conversations per accepted conversation of the inputs, capped at the number "
        "of prompts (a SmolLM2 LoRA fine-tune on new facts kept 0.891 of its general accuracy with 0.5 and no more, "
        "0.895, with 1.0, over 3 seeds each, and 0.80 with 0.25, one seed: RESULTS.md)"
    )
    condition: str | None = Field(None, description="class of the replay conversations; None: inference_condition")
    max_new_tokens: int = Field(192, ge=1, description="longest replay answer in tokens")


class FeedbackConfig(_Strict):
    """How stored completions train (`crlft data build STORE`): the class of each kind of feedback."""

    rated_up: str | None = Field(None, description="class of answers rated up; None: inference_condition")
    corrected: str | None = Field(
        None, description="class of corrected answers (the correction trained as the answer); None: inference_condition"
    )
    unrated: str | None = Field(None, description="class of answers no one rated; None: the lowest-reward class")
    rated_down: str | None = Field(None, description="class of answers rated down; None: not trained on")


class DataConfig(_Strict):
    max_len: int = Field(2048, ge=16, description="longest conversation in tokens; longer ones follow `overflow`")
    pack_len: int | None = Field(
        None, ge=16, description="token budget of one packed bin (set: >= max_len); None: max_len, shortened for a "
        "small training set so that it packs into at least 64 bins (64 optimiser steps an epoch for one worker), never "
        "below its longest conversation (crlft/data/pack.py auto_pack_len)"
    )
    overflow: Literal["truncate", "reject"] = Field(
        "truncate", description="over-long conversations: drop trailing turns (at a turn boundary) or reject"
    )
    per_sequence: bool = Field(
        False, description="divide each assistant message's weights by its length (the reference keeps it off)"
    )
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of conversations held out for validation")
    only_classes: list[str] | None = Field(None, description="keep only these classes (e.g. expert-only ablation)")
    seed: int = Field(0, description="seed of the validation split and the packing order")
    num_blocks: int = Field(8, ge=1, description="Ray Data read parallelism for small inputs")
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)


class ModelConfig(_Strict):
    base_model: str = Field(
        ".crlft/models/tiny", description="HF model directory or hub id; the default is built locally"
    )
    preset: Literal["tiny", "small"] = Field("tiny", description="size of the embedded default model")
    trust_remote_code: bool = Field(False, description="run code shipped with a hub model (off unless you trust it)")


class LoraConfig(_Strict):
    enabled: bool = Field(False, description="train LoRA adapters instead of every weight")
    r: int = Field(8, description="LoRA rank")
    alpha: int = Field(16, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, description="LoRA dropout")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="modules to adapt: names, or all-linear (every linear layer but the output head: "
        "LoRA on the MLPs too learns more for the same forgetting, Biderman et al. 2024, arXiv 2405.09673)"
    )
    merge: bool = Field(True, description="export the merged model (True) or keep the adapter (False)")


class TrainConfig(_Strict):
    mode: Mode = Field(Mode.crlft, description="crlft: condition + reward; conditioned; weighted; sft")
    epochs: int = Field(5, ge=1, description="passes over the training set (the paper: 5)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps")
    lr: float | None = Field(None, gt=0, description="peak learning rate; None = the reference's auto rule")
    lr_floor: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of the peak")
    warmup: float = Field(0.05, ge=0, lt=1, description="warm-up fraction of the steps")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    eps: float = Field(1e-5, description="AdamW epsilon")
    weight_decay: float = Field(0.1, description="AdamW weight decay")
    grad_clip: float = Field(1.0, description="gradient norm clipping")
    grad_accum: int = Field(1, ge=1, description="micro-batches (packed bins) per optimiser step and worker")
    workers: int = Field(1, ge=1, description="data-parallel Ray Train workers")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per worker (fractional on small machines)")
    use_gpu: bool = Field(False, description="one GPU per worker, nccl")
    attention: Literal["auto", "sdpa", "flex_attention", "flash_attention_2"] = Field(
        "auto", description="attention over packed bins: sdpa (computes the pairs across conversations, then masks "
        "them), flex_attention (GPU; skips them), flash_attention_2 (GPU, flash_attn installed; varlen, skips them); "
        "auto: flash_attention_2 where installed on GPU, else sdpa"
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="compute dtype: bf16 autocast (float32 weights, optimiser and loss), fp32, or auto: bf16 "
        "on GPUs with bf16 and, for models of hidden size >= 512, on CPUs with AVX512-BF16 or AMX; else fp32"
    )
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="data parallelism: replicate (ddp) or shard (fsdp)")
    gradient_checkpointing: bool = Field(False, description="recompute activations to save memory")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (0: only at the end)")
    num_to_keep: int = Field(2, ge=1, description="checkpoints kept per run")
    max_failures: int = Field(2, ge=0, description="worker failures recovered from the latest checkpoint")
    storage_path: str | None = Field(
        None, description="Ray Train storage (shared storage on clusters); default: <state_dir>/ray_results"
    )
    seed: int = Field(0, description="seed of initialisation, data order and dropout")
    replay_kl: float = Field(
        1.0, ge=0, description="weight of self-distillation on the replay answers: KL(base model in its own template "
        "|| fine-tune) a replay answer token, added to the loss (crlft/train/distill.py; LoRA only: the base is the "
        "model with its adapters off); 0: cross-entropy alone (SmolLM2 kept 0.948 of its general accuracy with 1.0, "
        "0.891 with 0, over 3 seeds each: RESULTS.md)"
    )


LoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]  # the adapter ranks vLLM sizes its adapter slots to


class InferenceConfig(_Strict):
    """The engine that generates and its size, one for every stage that decodes: `crlft serve`'s replicas, `crlft
    eval` and replay (crlft/inference/decoding.py), so what evaluation measures and replay trains on is what users
    get. What only the HTTP endpoint has (admission, autoscaling, replicas) is `serve`'s."""

    engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="what generates: vllm (vLLM's engine; `pip install 'crlft[vllm]'`), transformers "
        "(crlft's continuous batching over Hugging Face forward passes; starts in seconds), auto: vllm where "
        "installed for the device (its CPU build on CPUs, where it measured faster too), else transformers"
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="number type the engine generates in: auto is bf16 on GPUs, fp32 on CPUs"
    )
    vllm_kv_cache_gib: float = Field(
        1.0, gt=0, description="vLLM on CPU: memory for the KV cache per engine (GiB); on GPUs vLLM uses what is free"
    )
    max_batch_size: int = Field(
        16, description="sequences generated together (evaluation decodes eval.batch_size at a time)"
    )
    batch_wait_timeout_s: float = Field(
        0.02, description="crlft's engine: wait for more requests before a batch starts"
    )
    max_loras: int = Field(
        4, ge=1, description="vLLM serving adapters (serve.adapters): adapters in one batch, and in the engine at once"
    )
    max_lora_rank: LoraRank | None = Field(
        None, description="vLLM serving adapters: the rank of its adapter slots, one of vLLM's sizes (None: the "
        "smallest that holds every adapter served; an adapter of a higher rank, promoted later, reopens the engine)"
    )


class EvalConfig(_Strict):
    """How `crlft eval` (and the pipeline's evaluate stage) asks a model: how many answers at once, how long, and how
    many prompts of each check. The decoder is serving's (the `inference` section)."""

    batch_size: int = Field(16, ge=1, description="sequences decoded together")
    max_new_tokens: int = Field(16, ge=1, description="answer length on verifiable suites")
    bench_max_new_tokens: int = Field(256, ge=1, description="answer length on benchmarks (MT-bench, Vicuna)")
    max_per_class: int = Field(
        200, ge=1, description="conversations per condition in the representation check (the paper used 2000)"
    )
    bench_limit: int | None = Field(None, ge=1, description="only the first N questions of each benchmark (None: all)")
    retention_limit: int | None = Field(
        None, ge=1, description="only N prompts of the general check, spread over its kinds (None: all)"
    )
    open_limit: int = Field(
        40, ge=0, description="open prompts (Vicuna and MT-bench first turns) for agreement with the base model's "
        "answers; 0 skips agreement"
    )


class RegistryConfig(_Strict):
    tracking_uri: str | None = Field(None, description="MLflow URI; default MLFLOW_TRACKING_URI or the local SQLite")
    experiment: str = Field("crlft", description="MLflow experiment of training and evaluation runs")
    model_name: str = Field("crlft-chat", description="registered model name")
    base_model_name: str = Field(
        "crlft-base", description="registered model holding the crlft bases of adapters (train.lora.merge false): "
        "each base registered once, found by its fingerprint"
    )
    alias: str = Field("champion", description="alias of the model to serve")
    metric: str = Field("accuracy_expert", description="metric promotion compares (higher is better)")
    min_retention: float = Field(
        0.9, ge=0, description="promotion refuses a candidate whose retention (general accuracy / its base model's, "
        "`crlft eval`) is below this; 0 turns the gate off; candidates without a retention figure are not gated"
    )


class StoreConfig(_Strict):
    """Stored completions (OpenAI's `store`): what the endpoint answered, kept with users' feedback for training."""

    uri: str | None = Field(
        None, description="folder or URI (s3://, gs://) of the completion store; None: nothing is stored and "
        "requests asking `store: true` are refused"
    )
    by_default: bool = Field(False, description="store requests that do not say `store` (OpenAI's default: not)")
    queue: int = Field(10000, ge=1, description="completions a replica holds unwritten; beyond, dropped and counted")
    flush_s: float = Field(2.0, gt=0, description="seconds between a replica's writes to the store")


class ServeConfig(_Strict):
    host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 to serve other machines)")
    port: int = Field(8000, description="HTTP port")
    model_name: str | None = Field(None, description="name served at /v1/models (default: the model's own)")
    api_keys: list[str] = Field(default_factory=list, description="accepted API keys (empty: no auth)")
    max_new_tokens: int = Field(256, description="default answer length limit")
    adapters: list[str] = Field(
        default_factory=list, description="adapters served beside the model, on its base, each under its own name: "
        "registered names (their champion, followed as it moves), models:/ URIs or adapter folders; `*`: the "
        "champion of every registered name whose champion is an adapter on that base, names joining and leaving as "
        "champions move (`*` alone, without a model: the one base the champions are on) (vLLM only)"
    )
    ingress: Literal["haproxy", "serve-proxy"] = Field(
        "haproxy", description="what takes HTTP in front of the replicas in a Ray that crlft starts: haproxy (Ray "
        "Serve's HAProxy ingress, in C, straight to the replicas' own ports; faster than Serve's proxy under many "
        "streams, benchmarks/RESULTS.md) or serve-proxy (Serve's Python proxy). A running cluster keeps its own: "
        "RAY_SERVE_ENABLE_HA_PROXY=1 on its nodes (k8s/, cluster/cluster.yaml)"
    )
    min_replicas: int = Field(1, description="autoscaling lower bound")
    max_replicas: int = Field(2, description="autoscaling upper bound")
    target_ongoing_requests: float = Field(4.0, description="autoscaling target per replica")
    upscale_delay_s: float = Field(5.0, description="autoscaling delay before adding replicas")
    downscale_delay_s: float = Field(30.0, description="autoscaling delay before removing replicas")
    autoscaling_window_s: float = Field(
        30.0, gt=0, description="autoscaling averages the requests per replica over this window"
    )
    cpus_per_replica: float = Field(0.5, description="CPUs per replica")
    gpus_per_replica: float = Field(0.0, description="GPUs per replica (clusters)")
    max_ongoing_requests: int = Field(32, description="requests a replica takes at once")
    max_queued_requests: int = Field(64, description="requests a replica holds waiting; beyond: 429 + Retry-After")
    access_log: bool = Field(True, description="log every request (the demo recipe turns it off to stay readable)")
    store: StoreConfig = Field(default_factory=StoreConfig)


class Config(_Strict):
    classes: dict[str, ClassSpec] = Field(
        default_factory=_default_classes, description="class name -> {reward, match: {record field: [glob, ...]}}"
    )
    default_class: str | None = Field("GPT3", description="class of records no rule matches (None: reject them)")
    inference_condition: str = Field("GPT4", description="class the model is prompted with at inference")
    template: TemplateConfig = Field(default_factory=TemplateConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
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
        replay_condition = self.data.replay.condition
        if replay_condition is not None and replay_condition not in names:
            raise ValueError(f"data.replay.condition {replay_condition!r} is not a class; classes: {sorted(names)}")
        for kind, name in self.data.feedback.model_dump().items():
            if name is not None and name not in names:
                raise ValueError(f"data.feedback.{kind} {name!r} is not a class; classes: {sorted(names)}")
        if self.data.pack_len is not None and self.data.pack_len < self.data.max_len:
            raise ValueError(f"data.pack_len ({self.data.pack_len}) must be >= data.max_len ({self.data.max_len})")
        for name in names:
            if not name or any(ch.isspace() for ch in name):
                raise ValueError(f"class name {name!r} must be a non-empty word (it is written into the prompt)")
        return self

    @property
    def suboptimal_condition(self) -> str:
        """The sub-optimal class (`suboptimal_of`); the inference class itself when it is the only one."""
        rewards = {name: spec.reward for name, spec in self.classes.items()}
        return suboptimal_of(rewards, self.inference_condition) or self.inference_condition

    def reward(self, condition: str) -> float:
        """The training weight of a class under the configured mode (1.0 where the mode ignores rewards)."""
        return self.classes[condition].reward if self.train.mode.uses_reward else 1.0

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested configuration (or any JSON-able tree) as `section.key -> text`: MLflow's parameters, and what an
    ablation compares to go on with one."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if not isinstance(value, str) else value
    return flat


def suboptimal_of(rewards: Mapping[str, float], inference_condition: str) -> str | None:
    """The lowest-reward class other than the inference (expert) one, ties broken by name; None when there is none.
    The one definition for configs and exported models (crlft.json's conditions)."""
    others = [name for name in rewards if name != inference_condition]
    return min(others, key=lambda name: (rewards[name], name)) if others else None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise CrlftError(f"override {dotted}: {key} is not a section")
    node[leaf] = value


# Keys that moved to another section: a config or --set still naming one is told where it went.
MOVED_KEYS = {
    "serve.engine": "inference.engine",
    "serve.precision": "inference.precision",
    "serve.vllm_kv_cache_gib": "inference.vllm_kv_cache_gib",
    "serve.max_batch_size": "inference.max_batch_size",
    "serve.batch_wait_timeout_s": "inference.batch_wait_timeout_s",
}


def _has_dotted(tree: dict[str, Any], dotted: str) -> bool:
    *parents, leaf = dotted.split(".")
    node: Any = tree
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    return isinstance(node, dict) and leaf in node


# Recipes shipped with the package: the synthetic suite on the tiny model, and on a real --base-model with LoRA.
RECIPES = Path(__file__).resolve().parent / "recipes"
SYNTH_RECIPE = RECIPES / "tiny_synth.yaml"
REAL_MODEL_SYNTH_RECIPE = RECIPES / "lora_synth.yaml"


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
    return _validated(tree, overrides, f"{path}: " if path else "")


def overridden(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A copy of `cfg` with `section.key: value` overrides applied and validated, as `load_config` applies them."""
    return _validated(cfg.model_dump(mode="json"), overrides, "")


def _validated(tree: dict[str, Any], overrides: dict[str, Any] | None, where: str) -> Config:
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    moved = [f"{old} moved to {new}" for old, new in MOVED_KEYS.items() if _has_dotted(tree, old)]
    if moved:
        raise CrlftError(f"{where}invalid configuration: " + "; ".join(moved))
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(x) for x in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()]
        raise CrlftError(f"{where}invalid configuration: " + "; ".join(lines)) from None


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " or ".join(f"`{a}`" for a in get_args(annotation))
    if type(None) in get_args(annotation):  # X | None
        return " or ".join([*(_type_name(a) for a in get_args(annotation) if a is not type(None)), "None"])
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return " or ".join(f"`{m.value}`" for m in annotation)
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", text or str(annotation)).replace("|", "or")


def reference_markdown() -> str:
    """The configuration reference (README "Configuration"), generated from the model so it cannot drift."""
    lines: list[str] = []

    def section(model: type[BaseModel], defaults: dict[str, Any], prefix: str) -> None:
        rows, nested = [], []
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                nested.append((annotation, defaults[name], f"{prefix}{name}."))
                continue
            cells = [f"`{prefix}{name}`", _type_name(annotation), f"`{json.dumps(defaults[name])}`",
                     info.description or ""]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append(f"\n**{prefix.rstrip('.') or 'top level'}**\n")
        lines.append("| key | type | default | meaning |\n| --- | --- | --- | --- |")
        lines.extend(rows)
        for child, child_defaults, child_prefix in nested:
            section(child, child_defaults, child_prefix)

    section(Config, Config().model_dump(mode="json"), "")
    return "\n".join(lines).strip() + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
