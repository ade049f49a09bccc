"""The training step and everything around it that needs no Ray: the same code runs in a Ray Train worker, in a plain
single-process loop (benchmarks/train_throughput.py) and in unit tests.

- Learning rate (`choose_lr`, with its reason): the reference's auto rule `lr = 3e-4 * sqrt(supervised_tokens_per_step
  / 4e6)` where it fits (full fine-tuning on large batches), a rate from the model's size where it does not (small
  batches, small models, LoRA); a warning when the first epoch's loss has not moved. AdamW with the paper's
  betas/eps/decay; linear warm-up, cosine decay to a floor (a fraction of the peak).
- One optimiser step = `grad_accum` packed bins per rank. The loss of the step is normalised by the weight sum of ALL
  its micro-batches on ALL ranks (crlft.loss), known before the first backward; gradients are synchronised only on
  the last micro-batch.
- Parallelism: DDP (Ray's prepare_model) or FSDP2 (`fully_shard` per decoder layer, CPU/gloo and GPU/nccl alike),
  optional gradient checkpointing, LoRA through peft.
- Checkpoints: trainable weights, optimiser and scheduler state, the data position and every rank's RNG state, through
  torch.distributed.checkpoint's full state dicts, so DDP, FSDP and single-process runs save and load the same files.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
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
from crlft.loss import ClassLossSums, crlft_loss_from_ce, global_weight_sum, per_class_sums, token_cross_entropy
from crlft.pack import PackedRow, attention_mask_for, collate

if TYPE_CHECKING:  # only annotations: crlft.config needs pydantic, which the GPU check's machine lacks
    from crlft.config import LoraConfig, TrainConfig

REFERENCE_BASE_LR = 3e-4
REFERENCE_BASE_TOKENS = 4e6  # supervised tokens per step at which the reference's base lr applies

BF16_CPU_MIN_HIDDEN = 512  # bf16 autocast on CPU: 1.0-1.16x float32 at hidden 128, 1.45-1.71x at 576 (SmolLM2-135M)

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "trainer_state.json"


# ---------------------------------------------------------------------------------------------------------------------
# Learning rate, schedule, optimiser


def supervised_tokens_per_step(pack_len: int, world_size: int, grad_accum: int, supervised_ratio: float) -> float:
    """Expected supervised tokens in one optimiser step: every bin of the global batch times the supervised share.

    The reference computes `batch_max_len * world_size * supervised_ratio`; bins are its batches, and gradient
    accumulation multiplies the global batch the same way more ranks do.
    """
    return pack_len * world_size * grad_accum * supervised_ratio


def auto_lr(supervised_tokens: float) -> float:
    """The reference's rule: 3e-4 at 4M supervised tokens a step, scaled with the square root of the batch."""
    if supervised_tokens <= 0:
        raise CrlftError("the data has no supervised tokens (every weight is 0): nothing to train on")
    return REFERENCE_BASE_LR * math.sqrt(supervised_tokens / REFERENCE_BASE_TOKENS)


# Where the reference's rule does not fit (small batches, small models, LoRA), the peak rate follows the model's size:
# SCALE_LR at SCALE_PARAMS parameters, with the inverse square root of the size (about 1e-5 for 7B-13B models, 1e-4 at
# 100M, 1e-3 for a few-million-parameter toy), inside [MIN_LR, MAX_LR]. LoRA adapters start at zero and take a rate
# LORA_FACTOR times larger (1e-4 and up): the best LoRA rate is about 10x the best full fine-tuning rate (Biderman et
# al. 2024, arXiv 2405.09673; Schulman et al. 2025, "LoRA Without Regret").
SCALE_LR = 1e-4
SCALE_PARAMS = 1e8
MIN_LR, MAX_LR = 1e-5, 1e-3
LORA_FACTOR = 10.0
STALL_DROP = 0.02  # relative loss drop over the first epoch below which the run warns that it is not learning


@dataclass(frozen=True)
class LrChoice:
    lr: float
    reason: str  # one line: which rule chose it, from what


def size_lr(n_params: int) -> float:
    """A full fine-tuning rate for a model of n_params parameters (see SCALE_LR)."""
    return min(MAX_LR, max(MIN_LR, SCALE_LR * math.sqrt(SCALE_PARAMS / n_params)))


def choose_lr(train: TrainConfig, supervised_tokens: float, n_params: int) -> LrChoice:
    """The peak learning rate and why: train.lr when set; for full fine-tuning the reference's rule unless the
    model's size calls for more (small batches and small models); for LoRA a size-based adapter rate."""
    if train.lr is not None:
        return LrChoice(train.lr, "train.lr")
    size_rate = size_lr(n_params)
    if train.lora.enabled:
        lr = min(MAX_LR, max(1e-4, LORA_FACTOR * size_rate))
        return LrChoice(lr, f"LoRA on a {n_params / 1e6:,.0f}M-parameter model: adapters start at zero and need 1e-4 "
                        "and up (the reference's rule is for full fine-tuning); set train.lr to choose another")
    reference = auto_lr(supervised_tokens)
    rule = f"the reference's rule 3e-4 * sqrt(T / 4e6) at T = {supervised_tokens:,.0f} supervised tokens a step"
    if reference >= size_rate:
        return LrChoice(reference, rule)
    return LrChoice(size_rate, f"{rule} gives {reference:.1e}, too small to learn on a batch this size (it is "
                    f"calibrated for millions of tokens a step): using the rate for a {n_params / 1e6:,.0f}M-parameter "
                    "model instead; set train.lr to choose another")


def stalled_loss_warning(epoch_losses: Sequence[float], lr: LrChoice) -> str | None:
    """A warning when the loss of the first epoch (its step losses, in order) did not fall by STALL_DROP: the mean of
    the last quarter of its steps against the mean of the first quarter."""
    if len(epoch_losses) < 2:
        return None
    quarter = max(1, len(epoch_losses) // 4)
    start, end = np.mean(epoch_losses[:quarter]), np.mean(epoch_losses[-quarter:])
    if end <= start * (1.0 - STALL_DROP):
        return None
    return (f"the loss has not moved in the first epoch ({start:.4f} -> {end:.4f} over {len(epoch_losses)} steps): "
            f"the model is not learning at lr {lr.lr:.2e} ({lr.reason}); try a larger train.lr, more data per step "
            "or more epochs")


def warmup_steps(total_steps: int, warmup_fraction: float) -> int:
    return math.ceil(total_steps * warmup_fraction)


def lr_factor(step: int, total_steps: int, warmup: int, floor: float) -> float:
    """Multiplier of the peak lr for optimiser step `step` (0-based): linear warm-up ending at 1.0 on the last warm-up
    step, then cosine from 1.0 down to `floor`, reached on the last step."""
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = total_steps - warmup - 1
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup) / decay_steps)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, train: TrainConfig, lr: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, vectors (norms, biases) do not, as usual for LLMs."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    if not decay and not no_decay:
        raise CrlftError("the model has no trainable parameter (check train.lora.target_modules)")
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=train.betas, eps=train.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, train: TrainConfig) -> LambdaLR:
    warmup = warmup_steps(total_steps, train.warmup)
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, train.lr_floor))


@dataclass(frozen=True)
class StepPlan:
    """How many optimiser steps the run takes. Each rank gets `bins // world_size` bins per epoch (Ray Train splits
    datasets with equal=True, dropping the remainder) and takes one step per `grad_accum` of them, the last one
    possibly with fewer."""

    bins_per_rank: int
    steps_per_epoch: int
    total_steps: int
    epochs: int  # epochs started, the last one possibly cut by max_steps


def plan_steps(bins: int, world_size: int, grad_accum: int, epochs: int, max_steps: int | None) -> StepPlan:
    bins_per_rank = bins // world_size
    if bins_per_rank == 0:
        raise CrlftError(
            f"the training data has {bins} packed bins, fewer than the {world_size} workers: use fewer workers, "
            "a smaller data.pack_len or more data"
        )
    per_epoch = math.ceil(bins_per_rank / grad_accum)
    total = per_epoch * epochs if max_steps is None else min(max_steps, per_epoch * epochs)
    return StepPlan(bins_per_rank, per_epoch, total, math.ceil(total / per_epoch))


# ---------------------------------------------------------------------------------------------------------------------
# Data: packed rows -> micro-batches


def applied_rewards(mode_uses_reward: bool, rewards: Mapping[str, float]) -> dict[str, float]:
    """The weights a mode writes for each class: its reward, or 1.0 when the mode ignores rewards."""
    return {name: (float(reward) if mode_uses_reward else 1.0) for name, reward in rewards.items()}


def reward_scale(data_rewards: Mapping[str, float], train_rewards: Mapping[str, float]) -> dict[str, float]:
    """Per class, what turns the weights baked into the data into the weights of the training mode.

    Token weights are reward * message weight, so crlft and conditioned (or weighted and sft) data differ only by this
    factor: one tokenized dataset serves both modes of the same template.
    """
    missing = sorted(set(data_rewards) - set(train_rewards))
    if missing:
        raise CrlftError(f"the data has classes {missing} that the configuration does not define")
    return {name: train_rewards[name] / reward for name, reward in data_rewards.items()}


def rescale_row(row: PackedRow, scale: Mapping[str, float]) -> PackedRow:
    """The row with each conversation's weights multiplied by its class's factor (unchanged when all are 1)."""
    factors = [scale[name] for name in row["seq_conditions"]]
    if all(factor == 1.0 for factor in factors):
        return row
    weights = [
        w * factor
        for factor, start, length in zip(factors, _starts(row["seq_lens"]), row["seq_lens"], strict=True)
        for w in row["weights"][start : start + length]
    ]
    return {**row, "weights": weights}


def _starts(lengths: Sequence[int]) -> list[int]:
    return [sum(lengths[:i]) for i in range(len(lengths))]


def as_packed_row(record: Mapping[str, Any]) -> PackedRow:
    """A row as Ray Data / pyarrow yield it (numpy arrays) as the plain lists crlft.pack.collate takes."""
    return PackedRow(
        input_ids=_as_list(record["input_ids"]),
        labels=_as_list(record["labels"]),
        weights=_as_list(record["weights"]),
        position_ids=_as_list(record["position_ids"]),
        seq_lens=_as_list(record["seq_lens"]),
        seq_conditions=[str(c) for c in record["seq_conditions"]],
    )


def _as_list(values: Any) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def set_attention(model: nn.Module, requested: str, device: torch.device) -> str:
    """Give `model` the attention implementation of `train.attention` on `device`; return its name.

    auto takes varlen flash attention on GPU where flash_attn is installed, else keeps the model's own (sdpa for
    Llama); flex_attention, which also skips the pairs across conversations, is not chosen for you: it has not been
    measured against sdpa on a GPU yet."""
    if requested == "auto":
        if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
            with contextlib.suppress(ImportError, ValueError):  # a model without flash attention keeps its own
                model.set_attn_implementation("flash_attention_2")
        return model.config._attn_implementation
    if requested == "flex_attention" and device.type != "cuda":
        raise CrlftError("train.attention flex_attention needs a GPU: FlexAttention has no backward pass on CPU")
    try:
        model.set_attn_implementation(requested)
    except (ImportError, ValueError) as error:
        raise CrlftError(f"train.attention {requested} is not available here: {error}") from None
    return requested


def model_inputs(batch: Mapping[str, torch.Tensor], attn_implementation: str) -> dict[str, torch.Tensor]:
    """Keyword arguments of the model's forward. Flash attention takes packed sequences from the position ids
    (varlen kernels); the other implementations take the block-diagonal mask."""
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if not attn_implementation.startswith("flash"):
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


def collate_micro_batch(
    row: PackedRow, pad_id: int, conditions: Sequence[str], attn_implementation: str, device: torch.device
) -> dict[str, torch.Tensor]:
    """One packed bin as a batch of one, on `device`, with the attention mask built there (none for flash attention,
    which reads the conversations from the position ids)."""
    batch = {
        name: tensor.to(device, non_blocking=True)
        for name, tensor in collate([row], None, pad_id, conditions, attn_implementation=None).items()
    }
    if not attn_implementation.startswith("flash"):
        batch["attention_mask"] = attention_mask_for(batch["sequence_ids"], attn_implementation, torch.float32)
    return batch


# ---------------------------------------------------------------------------------------------------------------------
# The step


@dataclass(frozen=True)
class StepStats:
    """What one optimiser step did, summed over all ranks."""

    loss: float  # the step's C-RLFT loss: sum(w * CE) / sum(w) over the global batch
    class_sums: ClassLossSums  # per class: CE sum and supervised token count (for the per-class mean CE)
    supervised_tokens: int
    tokens: int
    grad_norm: float
    lr: float  # the learning rate the step used


def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce of DDP / FSDP2 for micro-batches that are not the last one of the step."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def fsdp_no_sync() -> Iterator[None]:
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return fsdp_no_sync()
    return contextlib.nullcontext()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 matmuls in hardware: a CUDA GPU with bf16 support, or a CPU with AVX512-BF16
    or AMX (oneDNN's bf16 kernels); elsewhere bf16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def compute_dtype(precision: str, device: torch.device, hidden_size: int) -> torch.dtype | None:
    """The autocast dtype of `train.precision` for a model of `hidden_size` on `device` (None: float32). Weights,
    gradients, the optimiser and the loss stay in float32 either way (crlft.loss takes the cross-entropy in float32).

    auto is bf16 on GPUs with bf16, and on CPUs with bf16 in hardware for models of at least BF16_CPU_MIN_HIDDEN:
    below that the matmuls are too small a share of the step for bf16 to pay for its casts (benchmarks/RESULTS.md,
    "Precision")."""
    native = native_bf16(device) and (device.type == "cuda" or hidden_size >= BF16_CPU_MIN_HIDDEN)
    if precision == "bf16" or (precision == "auto" and native):
        return torch.bfloat16
    if precision in ("auto", "fp32"):
        return None
    raise ValueError(f"unknown precision {precision!r}: auto, bf16 or fp32")


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _scalar(value: torch.Tensor | float) -> float:
    full = value.full_tensor() if hasattr(value, "full_tensor") else value  # FSDP2 returns a DTensor norm
    return float(full)


def train_step(
    model: nn.Module,
    micro_batches: Sequence[Mapping[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    *,
    n_classes: int,
    grad_clip: float,
    world_size: int,
    attn_implementation: str = "sdpa",
    autocast_dtype: torch.dtype | None = None,
) -> StepStats:
    """One optimiser step over this rank's micro-batches (all ranks call it with the same number of them).

    The normaliser is the weight sum of every micro-batch on every rank, all-reduced before the first backward;
    each micro-batch's loss is already its share of the step's loss, so the accumulated gradients are not divided
    by the number of micro-batches (crlft.loss explains the world_size factor).
    """
    if not micro_batches:
        raise ValueError("a step needs at least one micro-batch")
    device = micro_batches[0]["input_ids"].device
    local_weight_sum = torch.stack([batch["weights"].sum() for batch in micro_batches]).sum()
    weight_sum = global_weight_sum(local_weight_sum.to(device))
    ce_sum = torch.zeros(n_classes, device=device)
    class_tokens = torch.zeros(n_classes, device=device)
    local_loss = torch.zeros((), device=device)
    supervised = torch.zeros((), device=device)
    lr = optimizer.param_groups[0]["lr"]
    model.train()
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with gradient_sync(model, enabled=last):
            with _autocast(device, autocast_dtype):
                logits = model(**model_inputs(batch, attn_implementation), use_cache=False).logits
            ce = token_cross_entropy(logits, batch["labels"])
            loss = crlft_loss_from_ce(ce, batch["weights"], weight_sum, world_size)
            loss.backward()
        with torch.no_grad():
            sums = per_class_sums(ce.detach(), batch["weights"], batch["class_ids"], n_classes)
            ce_sum += sums.ce_sum
            class_tokens += sums.supervised_tokens
            local_loss += loss.detach() / world_size
            supervised += (batch["weights"] > 0).sum()
        del logits, ce, loss
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(batch["sequence_ids"].ge(0).sum()) for batch in micro_batches)
    totals = global_weight_sum(
        torch.cat([local_loss.reshape(1), supervised.reshape(1).float(), torch.tensor([float(tokens)], device=device),
                   ce_sum, class_tokens])
    ).cpu()
    return StepStats(
        loss=float(totals[0]),
        class_sums=ClassLossSums(totals[3 : 3 + n_classes], totals[3 + n_classes :]),
        supervised_tokens=int(totals[1]),
        tokens=int(totals[2]),
        grad_norm=_scalar(grad_norm),
        lr=lr,
    )


@dataclass(frozen=True)
class EvalStats:
    loss: float  # sum(w * CE) / sum(w) over the evaluated data of all ranks
    class_sums: ClassLossSums


@torch.no_grad()
def evaluate(
    model: nn.Module,
    micro_batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    n_classes: int,
    device: torch.device,
    attn_implementation: str = "sdpa",
    autocast_dtype: torch.dtype | None = None,
) -> EvalStats:
    """Weighted loss and per-class CE sums over every batch of every rank (all ranks must call it)."""
    model.eval()
    weighted = torch.zeros(2, device=device)  # sum(w * CE), sum(w)
    ce_sum = torch.zeros(n_classes, device=device)
    class_tokens = torch.zeros(n_classes, device=device)
    for batch in micro_batches:
        with _autocast(device, autocast_dtype):
            logits = model(**model_inputs(batch, attn_implementation), use_cache=False).logits
        ce = token_cross_entropy(logits, batch["labels"])
        weighted += torch.stack([(batch["weights"] * ce).sum(), batch["weights"].sum()])
        sums = per_class_sums(ce, batch["weights"], batch["class_ids"], n_classes)
        ce_sum += sums.ce_sum
        class_tokens += sums.supervised_tokens
    totals = global_weight_sum(torch.cat([weighted, ce_sum, class_tokens])).cpu()
    loss = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
    return EvalStats(loss, ClassLossSums(totals[2 : 2 + n_classes], totals[2 + n_classes :]))


# ---------------------------------------------------------------------------------------------------------------------
# Model wrapping: LoRA, gradient checkpointing, FSDP


def wrap_lora(model: nn.Module, lora: LoraConfig, token_ids: Sequence[int]) -> nn.Module:
    """The model with LoRA adapters on `lora.target_modules`; only the adapters train, and the input and output
    embedding rows of `token_ids` (C-RLFT's end-of-turn token: a new token starts at the mean embedding, and without
    its own rows the model never learns to stop)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules),
        trainable_token_indices=embedding_rows(model, token_ids) if token_ids else None,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as error:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise CrlftError(
            f"train.lora.target_modules {lora.target_modules} do not fit this model ({error}); "
            f"its linear layers are named {linear}"
        ) from None


def embedding_rows(model: nn.Module, token_ids: Sequence[int]) -> dict[str, list[int]]:
    """PEFT's `trainable_token_indices`: the rows of `token_ids` in the input embeddings, and in the output
    embeddings unless they are tied to the input ones (then PEFT trains the shared row once)."""
    names = {module: name for name, module in model.named_modules()}
    layers = [model.get_input_embeddings()]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not layers[0].weight:
        layers.append(output)
    return {names[layer]: list(token_ids) for layer in layers}


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain model with the adapters folded into its weights (the trained token rows written into the
    embeddings)."""
    return model.merge_and_unload()


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass (non-reentrant: works with frozen inputs, LoRA and FSDP)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def transformer_layer_classes(model: nn.Module) -> set[str]:
    """Class names of the repeated blocks (Hugging Face's `_no_split_modules`): FSDP shards each one on its own."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def shard_fsdp(model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: shard every decoder layer, then the root; parameters in `param_dtype` for compute, reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    layer_classes = transformer_layer_classes(model)
    if not layer_classes:
        raise CrlftError("FSDP needs a Hugging Face model that names its layers (_no_split_modules); use DDP")
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# RNG and checkpoints


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generator states, in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # uint32 tensors do not pickle through all_gather_object: widen the Mersenne Twister keys to int64.
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (only this rank's without torch.distributed)."""
    state = capture_rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


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


class Stopwatch:
    """Wall and process-CPU seconds since the last lap (CPU time counts every thread of this process, Ray's own
    included, but not the time other processes held the cores)."""

    def __init__(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        elapsed = (wall - self._wall, cpu - self._cpu)
        self._wall, self._cpu = wall, cpu
        return elapsed
