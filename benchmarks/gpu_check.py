"""The GPU path in one prepared run: C-RLFT training steps of a ~1B Llama in bf16 under each attention path, their
numerical agreement, and the serving engine's decode throughput; one table at the end.

    benchmarks/gpu_check.sh [--json FILE]          # on one GPU: about 2 minutes on an H100
    python -m benchmarks.gpu_check --cpu-smoke     # the same code on a tiny model on the CPU (CI: seconds)

It needs only torch, transformers and peft (no Ray, MLflow, pydantic or download: the model is built from a config
with random weights, the tokenizer is trained on crlft's built-in corpus, the conversations are random token ids with
the template's weights), and runs crlft's own pieces: packing and collate (crlft.data.pack), the step with the C-RLFT
loss (crlft.train.step.train_step), the attention choice (crlft.train.attention.set_attention), the precision
(crlft.train.precision.compute_dtype) and the generation engine (crlft.inference.generate.BatchGenerator).

1. Peak: a square bf16 matmul, timed in this run: the denominator of MFU (flops.matmul_flops).
2. Training, one packed bin a step (one conversation split by the FFD packer into 4096-token bins), fp32 weights
   and AdamW, bf16 autocast, for every attention path this machine has: sdpa (block-diagonal mask: computes the
   pairs across conversations, then masks them), flex_attention (BlockMask: skips those tiles; not on CPU, where
   it has no backward), flash_attention_2 (varlen, where flash_attn is installed); full fine-tune and LoRA.
   Supervised tokens/s and tokens/s (the collate inside the timed step, as in the Ray worker), MFU from
   flops.model_flops_per_token (useful FLOPs only: attention inside each conversation), peak memory.
3. Agreement, from the same weights on the same bins: one step's loss and gradient norm under each attention path
   against sdpa (on CPU flex_attention's forward loss only), and the packed bins' loss against the loss of their
   conversations collated one by one.
4. Serving: crlft's engine with bf16 weights, greedy, a fixed number of new tokens, at batch 1, 32 and 128, beside
   transformers' `generate` on the same prompts; output tokens/s, prefill included.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from benchmarks.flops import matmul_flops, model_flops_per_token
from crlft.data.pack import PackedRow, first_fit_decreasing, pack_bin
from crlft.errors import CrlftError
from crlft.inference.generate import BatchGenerator, GenerationRequest
from crlft.inference.sampling import SamplingParams
from crlft.train.attention import set_attention
from crlft.train.batches import collate_micro_batch
from crlft.train.precision import compute_dtype, native_bf16
from crlft.train.step import evaluate, train_step
from crlft.train.wrap import wrap_lora

CONDITIONS = ["GPT4", "GPT3"]
REWARDS = {"GPT4": 1.0, "GPT3": 0.1}
END_OF_TURN = "<|end_of_turn|>"
ATTENTION_PATHS = ("sdpa", "flex_attention", "flash_attention_2")


@dataclass(frozen=True)
class Scale:
    model: dict[str, Any]  # LlamaConfig kwargs
    pack_len: int
    conversation_lengths: tuple[int, int]  # log-uniform between these
    warmup: int  # steps left out of the rates (compilation, allocator)
    steps: int
    matmul_size: int
    matmul_seconds: float
    engine_batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    tolerance: float  # relative, for the agreement checks


GPU = Scale(  # TinyLlama-1.1B's shape
    model={"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 4096,
           "tie_word_embeddings": False},
    pack_len=4096, conversation_lengths=(64, 2048), warmup=3, steps=8, matmul_size=8192, matmul_seconds=3.0,
    engine_batches=(1, 32, 128), prompt_len=128, new_tokens=128, tolerance=2e-2,
)  # fmt: skip
SMOKE = Scale(
    model={"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
           "tie_word_embeddings": False},
    pack_len=256, conversation_lengths=(16, 128), warmup=1, steps=2, matmul_size=256, matmul_seconds=0.2,
    engine_batches=(1, 4), prompt_len=16, new_tokens=8, tolerance=2e-2,
)  # fmt: skip
@dataclass(frozen=True)
class Setup:
    """What every part of the check shares: the scale, the device, the initial weights and the data."""

    scale: Scale
    device: torch.device
    tokenizer: Any
    initial: dict[str, torch.Tensor]
    bins: list[PackedRow]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def fresh_model(self) -> nn.Module:
        model = build_model(self.scale, self.device)
        model.load_state_dict(self.initial)
        return model


LORA = SimpleNamespace(r=16, alpha=32, dropout=0.0, merge=True,  # crlft.config.LoraConfig's fields (no pydantic here)
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


# ---------------------------------------------------------------------------------------------------------------------
# Inputs


def build_tokenizer() -> Any:
    """What `crlft init-model` trains for the default model (BOS, EOS, pad and end-of-turn are special tokens)."""
    from crlft.presets import default_corpus, train_tokenizer

    return train_tokenizer(default_corpus(), end_of_turn=END_OF_TURN)


def build_model(scale: Scale, device: torch.device, seed: int = 0) -> nn.Module:
    """Random weights. The vocabulary is a real model's size, larger than the local tokenizer's: ids it lacks decode
    to nothing, which is all the engine needs of them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with device:
        return LlamaForCausalLM(LlamaConfig(**scale.model))


def random_bins(scale: Scale, count: int, seed: int = 0) -> list[PackedRow]:
    """`count` full bins of random conversations: a prompt with weight 0, then an answer weighted by its class's
    reward (what the template writes), packed first-fit-decreasing; the fullest bins first."""
    rng = random.Random(seed)
    low, high = scale.conversation_lengths
    conversations = []
    while sum(len(c[0]) for c in conversations) < (count + 2) * scale.pack_len:
        length = round(math.exp(rng.uniform(math.log(low), math.log(high))))
        condition = CONDITIONS[len(conversations) % 2]
        prompt = length // 3
        ids = [rng.randrange(4, scale.model["vocab_size"]) for _ in range(length)]
        conversations.append((ids, [0.0] * prompt + [REWARDS[condition]] * (length - prompt), condition))
    bins = first_fit_decreasing([len(c[0]) for c in conversations], scale.pack_len)
    return [pack_bin([conversations[i] for i in members]) for members in bins[:count]]


def unpacked(row: PackedRow) -> list[PackedRow]:
    """The bin's conversations, one row each."""
    rows, start = [], 0
    for length, condition in zip(row["seq_lens"], row["seq_conditions"], strict=True):
        end = start + length
        rows.append(PackedRow(input_ids=row["input_ids"][start:end], labels=row["labels"][start:end],
                              weights=row["weights"][start:end], position_ids=row["position_ids"][start:end],
                              seq_lens=[length], seq_conditions=[condition]))
        start = end
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Training


def attention_paths(device: torch.device) -> dict[str, str | None]:
    """Each attention path and why it is skipped here (None: it runs)."""
    flex = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    return {
        "sdpa": None,
        "flex_attention": None if flex else f"torch {torch.__version__} has no FlexAttention",
        "flash_attention_2": None if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
        else "flash_attn is not installed" if device.type == "cuda" else "flash attention needs a GPU",
    }  # fmt: skip


def prepare(setup: Setup, attention: str, lora: bool) -> tuple[nn.Module, str, torch.dtype | None]:
    """A fresh model as the Ray worker prepares it: attention path, LoRA (adapters and the end-of-turn rows), bf16."""
    model = setup.fresh_model()
    attn = set_attention(model, attention, setup.device)
    dtype = compute_dtype("bf16", setup.device, model.config.hidden_size)
    if lora:
        end_of_turn = setup.tokenizer.convert_tokens_to_ids(END_OF_TURN)
        model = wrap_lora(model, LORA, [end_of_turn])  # type: ignore[arg-type]
    return model, attn, dtype


def optimizer_for(model: nn.Module, lr: float) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with the paper's betas and a constant schedule (crlft's own builders read crlft.config)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def run_steps(setup: Setup, model: nn.Module, attn: str, dtype: torch.dtype | None) -> dict[str, Any]:
    """train_step over the bins, one a step, the collate inside the timed step; rates without the warm-up steps."""
    device = setup.device
    optimizer, scheduler = optimizer_for(model, lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens = supervised = 0
    seconds = 0.0
    losses, step_seconds = [], []
    for step, row in enumerate(setup.bins):
        start = time.perf_counter()
        batch = collate_micro_batch(row, setup.pad_id, CONDITIONS, attn, device)
        stats = train_step(model, [batch], optimizer, scheduler, n_classes=len(CONDITIONS), grad_clip=1.0,
                              world_size=1, attn_implementation=attn, autocast_dtype=dtype)
        elapsed = time.perf_counter() - start  # train_step ends by copying its totals to the host: synchronised
        losses.append(stats.loss)
        step_seconds.append(elapsed)
        if step >= setup.scale.warmup:
            tokens, supervised, seconds = tokens + stats.tokens, supervised + stats.supervised_tokens, seconds + elapsed
    peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"tokens_per_s": tokens / seconds, "supervised_tokens_per_s": supervised / seconds, "losses": losses,
            "step_seconds": step_seconds,
            "peak_memory_gib": None if peak_memory is None else peak_memory / 2**30}


def training(setup: Setup, peak: float, echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """One row per attention path x (full, LoRA): rates, MFU and memory, or why the path was skipped or failed.

    A full fine-tune under sdpa runs once untimed first: on the H100 the first variant's steps ran 3x slower than the
    same variant later in the run (its warm-up steps were not enough), which made the first row look slow."""
    model, attn, dtype = prepare(setup, "sdpa", lora=False)
    run_steps(setup, model, attn, dtype)
    del model
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    rows = []
    for attention, skipped in attention_paths(setup.device).items():
        for lora in (False, True):
            row: dict[str, Any] = {"attention": attention, "lora": lora}
            if skipped is not None:
                row["skipped"] = skipped
            else:
                row.update(_guarded(lambda path=attention, adapters=lora: train_variant(setup, path, adapters, peak)))
            echo(json.dumps(_rounded(row)))
            rows.append(row)
    return rows


def train_variant(setup: Setup, attention: str, lora: bool, peak: float) -> dict[str, Any]:
    model, attn, dtype = prepare(setup, attention, lora)
    result = run_steps(setup, model, attn, dtype)
    flops = model_flops_per_token(model, [n for row in setup.bins for n in row["seq_lens"]])
    del model
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    return {**result, "mfu": result["tokens_per_s"] * flops / peak, "flops_per_token": flops}


def _guarded(part: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The part's results; a path this machine refuses is skipped, any other error is recorded as a failure (the one
    run on a lent GPU still prints the rest of the table)."""
    try:
        return part()
    except CrlftError as error:
        return {"skipped": str(error)}
    except Exception as error:  # noqa: BLE001
        return {"failed": f"{type(error).__name__}: {error}"}


# ---------------------------------------------------------------------------------------------------------------------
# Agreement


def step_numbers(setup: Setup, bins: Sequence[PackedRow], attention: str) -> dict[str, float]:
    """From the initial weights, the bins as one step's micro-batches: the step's loss and gradient norm (nothing is
    updated: lr 0). FlexAttention on CPU has no backward: there, the loss of a forward only."""
    if setup.device.type == "cpu" and attention == "flex_attention":  # set_attention refuses it
        model = setup.fresh_model()
        model.set_attn_implementation(attention)
        dtype = compute_dtype("bf16", setup.device, model.config.hidden_size)
        batches = [collate_micro_batch(row, setup.pad_id, CONDITIONS, attention, setup.device) for row in bins]
        return {"loss": evaluate(model, batches, n_classes=len(CONDITIONS), device=setup.device,
                                    attn_implementation=attention, autocast_dtype=dtype).loss}
    # One train-mode step, never an eval-mode forward: transformers compiles FlexAttention anew at each switch.
    model, attn, dtype = prepare(setup, attention, lora=False)
    batches = [collate_micro_batch(row, setup.pad_id, CONDITIONS, attn, setup.device) for row in bins]
    optimizer, scheduler = optimizer_for(model, lr=0.0)
    stats = train_step(model, batches, optimizer, scheduler, n_classes=len(CONDITIONS), grad_clip=1e9,
                          world_size=1, attn_implementation=attn, autocast_dtype=dtype)
    return {"loss": stats.loss, "grad_norm": stats.grad_norm}


def agreement(setup: Setup, paths: Sequence[str]) -> list[dict[str, Any]]:
    """On two bins: each attention path against sdpa, and packed against one conversation a row (sdpa)."""
    bins = setup.bins[:2]
    reference = step_numbers(setup, bins, "sdpa")
    checks = []
    for attention in paths:
        if attention != "sdpa":
            numbers = _guarded(lambda path=attention: step_numbers(setup, bins, path))
            if "failed" in numbers:
                checks.append({"check": f"{attention} vs sdpa", "failed": numbers["failed"], "ok": False})
                continue
            checks += [_check(f"{attention} vs sdpa: {key}", value, reference[key], setup.scale.tolerance)
                       for key, value in numbers.items()]
    alone = step_numbers(setup, [row for packed in bins for row in unpacked(packed)], "sdpa")
    checks += [_check(f"packed vs one conversation a row: {key}", reference[key], alone[key], setup.scale.tolerance)
               for key in reference]
    return checks


def _check(name: str, value: float, reference: float, tolerance: float) -> dict[str, Any]:
    difference = abs(value - reference) / abs(reference)
    return {"check": name, "value": value, "reference": reference, "relative_difference": difference,
            "tolerance": tolerance, "ok": difference <= tolerance}


# ---------------------------------------------------------------------------------------------------------------------
# Serving


def serving(setup: Setup, echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """Output tokens/s of crlft's engine and of transformers' generate, same prompts, greedy, fixed length."""
    scale, device, vocab_size = setup.scale, setup.device, setup.scale.model["vocab_size"]
    model = setup.fresh_model().to(torch.bfloat16 if native_bf16(device) else torch.float32).eval()
    model.generation_config.eos_token_id = None  # every request generates exactly new_tokens
    model.generation_config.pad_token_id = setup.pad_id
    rng = random.Random(1)
    rows = []
    for batch in scale.engine_batches:
        prompts = [[rng.randrange(4, vocab_size) for _ in range(scale.prompt_len)] for _ in range(batch)]
        row: dict[str, Any] = {"batch": batch}
        row.update(_guarded(lambda p=prompts: {
            "engine_tokens_per_s": engine_rate(model, setup.tokenizer, p, scale.new_tokens, device),
            "generate_tokens_per_s": generate_rate(model, p, scale.new_tokens, device)}))
        echo(json.dumps(_rounded(row)))
        rows.append(row)
    return rows


def engine_rate(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], new_tokens: int,
                device: torch.device) -> float:
    engine = BatchGenerator(model, tokenizer, stop_token_ids=[], max_batch_size=len(prompts))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    engine.generate([GenerationRequest(prompts[0], params)])  # warm-up
    _sync(device)
    start = time.perf_counter()
    completions = engine.generate([GenerationRequest(p, params) for p in prompts])
    _sync(device)
    return sum(c.completion_tokens for c in completions) / (time.perf_counter() - start)


@torch.inference_mode()
def generate_rate(model: nn.Module, prompts: Sequence[Sequence[int]], new_tokens: int, device: torch.device) -> float:
    ids = torch.tensor(prompts, device=device)
    kwargs = {"max_new_tokens": new_tokens, "do_sample": False}
    model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), **kwargs)  # warm-up
    _sync(device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    _sync(device)
    return (out.shape[1] - ids.shape[1]) * len(prompts) / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------------
# The run


def check(scale: Scale, device: torch.device, echo: Callable[[str], None]) -> dict[str, Any]:
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_model(scale, device)
    setup = Setup(scale, device, tokenizer, {k: v.detach().clone() for k, v in model.state_dict().items()},
                  random_bins(scale, scale.warmup + scale.steps))
    del model
    peak = matmul_flops(device, torch.bfloat16, scale.matmul_size, scale.matmul_seconds)
    echo(f"bf16 matmul {scale.matmul_size}^2: {peak / 1e12:.3f} TFLOP/s")
    paths = [name for name, skipped in attention_paths(device).items() if skipped is None]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "parameters": sum(v.numel() for v in setup.initial.values()),
        "pack_len": scale.pack_len,
        "bf16_matmul_flops": peak,
        "training": training(setup, peak, echo),
        "agreement": agreement(setup, paths),
        "serving": serving(setup, echo),
    }
    result["seconds"] = time.perf_counter() - start
    return result


def _version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name)


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()
            if k not in ("losses", "step_seconds")}


def report(result: dict[str, Any], echo: Callable[[str], None]) -> None:
    """The one table: training, agreement, serving."""
    echo(f"\n{result['device']}, torch {result['torch']}, transformers {result['transformers']}; Llama "
         f"{result['parameters'] / 1e6:,.1f}M parameters, bins of {result['pack_len']} tokens; bf16 matmul "
         f"{result['bf16_matmul_flops'] / 1e12:.1f} TFLOP/s; {result['seconds']:.0f} s\n")
    echo("| training step | supervised tok/s | tok/s | MFU | peak memory GiB |")
    echo("| --- | ---: | ---: | ---: | ---: |")
    for row in result["training"]:
        name = f"{row['attention']}, {'LoRA' if row['lora'] else 'full'}"
        if "skipped" in row or "failed" in row:
            echo(f"| {name} | {_not_run(row)} | | | |")
            continue
        memory = "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.1f}"
        echo(f"| {name} | {row['supervised_tokens_per_s']:,.0f} | {row['tokens_per_s']:,.0f} | {row['mfu']:.1%} "
             f"| {memory} |")
    echo("\n| agreement | value | reference | relative difference | within tolerance |")
    echo("| --- | ---: | ---: | ---: | --- |")
    for row in result["agreement"]:
        if "failed" in row:
            echo(f"| {row['check']} | {_not_run(row)} | | | NO |")
            continue
        echo(f"| {row['check']} | {row['value']:.5f} | {row['reference']:.5f} | {row['relative_difference']:.2e} "
             f"| {'yes' if row['ok'] else 'NO'} (<= {row['tolerance']:g}) |")
    echo("\n| decode, batch | crlft engine tok/s | transformers generate tok/s |")
    echo("| ---: | ---: | ---: |")
    for row in result["serving"]:
        if "failed" in row:
            echo(f"| {row['batch']} | {_not_run(row)} | |")
            continue
        echo(f"| {row['batch']} | {row['engine_tokens_per_s']:,.0f} | {row['generate_tokens_per_s']:,.0f} |")


def _not_run(row: dict[str, Any]) -> str:
    return f"skipped: {row['skipped']}" if "skipped" in row else f"FAILED: {row['failed']}"


def passed(result: dict[str, Any]) -> bool:
    """Every check within tolerance and nothing failed (a path this machine lacks is skipped, not failed)."""
    rows = result["training"] + result["agreement"] + result["serving"]
    return all(row.get("ok", True) and "failed" not in row for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU (tests the script itself)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or --cpu-smoke")
    scale, device = (SMOKE, torch.device("cpu")) if args.cpu_smoke else (GPU, torch.device("cuda"))
    if args.cpu_smoke:
        torch.set_num_threads(1)
        # transformers compiles FlexAttention with torch.compile (read at each compile): on a CPU that is a minute of
        # C++ compilation for a tiny forward. The smoke runs FlexAttention's reference kernel instead.
        os.environ["TORCHDYNAMO_DISABLE"] = "1"
    result = check(scale, device, lambda line: print(line, flush=True))
    report(result, print)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if passed(result) else 1


if __name__ == "__main__":
    raise SystemExit(main())
