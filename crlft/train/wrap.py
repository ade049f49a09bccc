"""The model as it trains: LoRA adapters through peft (merged into the weights for export), gradient checkpointing,
and FSDP2 (`fully_shard` per decoder layer, CPU/gloo and GPU/nccl alike). DDP is Ray's prepare_model, in the worker."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from crlft.errors import CrlftError

if TYPE_CHECKING:  # only annotations: crlft.config needs pydantic, which the GPU check's machine lacks
    from crlft.config import LoraConfig


def wrap_lora(model: nn.Module, lora: LoraConfig, token_ids: Sequence[int]) -> nn.Module:
    """The model with LoRA adapters on `lora.target_modules`; only the adapters train, and, for a model exported merged,
    the input and output embedding rows of `token_ids` (C-RLFT's end-of-turn token: without its own rows a token that
    started at the mean embedding is never learned). An adapter kept as such (`lora.merge` false) trains no rows: vLLM
    serves adapters on a shared vocabulary and refuses embedding rows in them, so the token keeps the rows of its
    base (copied from the base's own end of sequence by `crlft.model.add_end_of_turn`)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    token_ids = token_ids if lora.merge else ()

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
