"""Training throughput: the Ray Train loop against a plain PyTorch loop, packed against padded batches, and achieved
FLOP/s against the machine's measured matmul FLOP/s.

    python -m benchmarks.train_throughput [DATA] [--preset tiny] [--pack-len 1024] [--threads N] [--json FILE]
    python -m benchmarks.train_throughput --precision [--base-model smollm2] [--steps N] [--lr LR] [--json FILE]

1. Plain loop: one process, `--threads` torch threads, crlft.train.step.train_step over the packed bins (one bin per
   step), and over naive padded batches of the same conversations (batch size: the bins' mean conversation count).
2. Ray loop: `jobs.train.train` with one worker of `--threads` CPUs on the same bins (Ray Data shard, Ray Train
   worker, MLflow logging); its per-step rates come back from MLflow. Ray overhead = plain rate / Ray rate.
   Rates are steady state: the first `--warmup` steps of each loop are left out, and so is the worker start-up
   (reported separately as the fit's wall time); each loop makes `--passes` passes and the fastest counts.
   On a shared machine wall-clock rates measure the neighbours too: every rate is also given per CPU second of the
   process that trains (the Ray worker's CPU time includes Ray's threads in it), and those ratios are the steady ones.
3. FLOPs: useful model FLOPs per real token = 6 x (matmul parameters) + 12 x layers x hidden x (mean causal context
   inside the token's conversation): padding, and the masked-out attention across the conversations of a packed bin
   (sdpa with a block mask still computes it), count as waste.
   Peak: a large square float32 matmul with the same thread count; both per CPU second.
4. Precision (`--precision`, instead of 1-3): the plain packed loop in float32 and with bf16 autocast, passes
   alternating from the same initial weights; rates per CPU second and wall, every step's loss of both curves, and
   the held-out loss of the trained weights with a float32 forward (the bf16 curve is measured through a bf16
   forward, which rounds the weights).
5. GPU (only when CUDA is available): a larger Llama in bf16, plain single-GPU loop and Ray Train with FSDP over every
   GPU; tokens/s/GPU and MFU against the measured bf16 matmul peak.

Conversations: DATA (default: the FastChat dummy conversations), with a tokenizer trained on them, as
`crlft init-model --corpus DATA` builds it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.flops import matmul_flops, model_flops_per_token
from crlft.config import Config, load_config
from crlft.data.pack import PackedRow, collate, first_fit_decreasing, pack_bin
from crlft.data.readers import iter_file
from crlft.data.records import ClassRules, Conversation
from crlft.data.template import Template, TemplateTokenizer, TokenizedConversation
from crlft.environ import set_offline_defaults
from crlft.train.precision import native_bf16
from crlft.train.schedule import build_optimizer, build_scheduler
from crlft.train.step import evaluate, train_step

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT / "tests" / "fixtures" / "fastchat" / "dummy_conversation.json"  # FastChat sample
HELD_OUT_BINS = 8  # --precision: bins after the trained ones, to compare what each precision learned
GPU_MODEL = {  # a ~0.4B-parameter Llama: big enough for the GPU to be busy, small enough for any GPU
    "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_key_value_heads": 16, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}  # fmt: skip


def tokenized_conversations(data: Path, tokenizer_dir: Path, cfg: Config) -> list[TokenizedConversation]:
    from crlft.model import load_tokenizer

    template_tokenizer = TemplateTokenizer(Template.from_config(cfg), load_tokenizer(str(tokenizer_dir)))
    rewards = {name: cfg.reward(name) for name in cfg.classes}
    out = []
    for record in iter_file(data, ClassRules.from_config(cfg)):
        if isinstance(record, Conversation):
            try:
                out.append(template_tokenizer.tokenize_conversation(record, rewards, max_len=cfg.data.max_len))
            except ValueError:
                continue
    return out


def packed_rows(conversations: Sequence[TokenizedConversation], pack_len: int) -> list[PackedRow]:
    bins = first_fit_decreasing([len(c.input_ids) for c in conversations], pack_len)
    return [pack_bin([conversations[i] for i in members]) for members in bins]


def padded_rows(conversations: Sequence[TokenizedConversation], batch_size: int, seed: int) -> list[list[PackedRow]]:
    """Naive batching: conversations in random order, `batch_size` a batch, each padded to its longest."""
    order = list(conversations)
    random.Random(seed).shuffle(order)
    rows = [pack_bin([c]) for c in order]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def plain_loop(model: torch.nn.Module, batches: Sequence[Sequence[PackedRow]], cfg: Config, warmup: int,
               device: torch.device, autocast: torch.dtype | None = None) -> dict[str, float]:
    """Steady-state rates of train_step in this process, one batch of rows per step."""
    model.to(device)
    optimizer = build_optimizer(model, cfg.train, lr=cfg.train.lr or 1e-3)
    scheduler = build_scheduler(optimizer, len(batches), cfg.train)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tokens = supervised = 0
    elapsed = cpu_elapsed = 0.0
    losses = []
    for step, rows in enumerate(batches):
        batch = {k: v.to(device) for k, v in collate(rows, None, 0, list(cfg.classes)).items()}
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        stats = train_step(model, [batch], optimizer, scheduler, n_classes=len(cfg.classes), grad_clip=1.0,
                              world_size=1, autocast_dtype=autocast)
        sync()
        losses.append(stats.loss)
        if step >= warmup:
            elapsed += time.perf_counter() - start
            cpu_elapsed += time.process_time() - cpu_start
            tokens += stats.tokens
            supervised += stats.supervised_tokens
    # CPU seconds do not count the time other processes held the cores: steadier than wall time on a shared machine.
    return {"tokens_per_s": tokens / elapsed, "supervised_tokens_per_s": supervised / elapsed,
            "tokens_per_cpu_s": tokens / cpu_elapsed, "supervised_tokens_per_cpu_s": supervised / cpu_elapsed,
            "steps": len(batches) - warmup, "seconds": elapsed, "losses": losses}


def write_data(out: Path, rows: Sequence[PackedRow], conversations: Sequence[TokenizedConversation],
               tokenizer_dir: Path, cfg: Config) -> Path:
    """A data folder as the data stage writes it (train/*.parquet + stats.json), for the Ray loop."""
    from crlft.model import load_tokenizer

    (out / "train").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(list(rows)), out / "train" / "train-00000.parquet")
    per_class: dict[str, dict[str, int]] = {c: {"records": 0, "tokens": 0, "supervised_tokens": 0} for c in cfg.classes}
    for conversation in conversations:
        counts = per_class[conversation.condition]
        counts["records"] += 1
        counts["tokens"] += len(conversation.input_ids)
        counts["supervised_tokens"] += sum(w > 0 for w in conversation.weights)
    template_tokenizer = TemplateTokenizer(Template.from_config(cfg), load_tokenizer(str(tokenizer_dir)))
    stats = {
        "mode": cfg.train.mode.value, "conditions": list(cfg.classes),
        "rewards": {c: cfg.reward(c) for c in cfg.classes}, "pack_len": cfg.data.pack_len, "bins": len(rows),
        "per_class": per_class, "tokenizer": str(tokenizer_dir),
        "fingerprints": {"tokenizer_template": template_tokenizer.fingerprint()},
    }  # fmt: skip
    (out / "stats.json").write_text(json.dumps(stats))
    return out


def ray_loop(data: Path, model_dir: Path, cfg: Config, warmup: int, scratch: Path) -> list[dict[str, float]]:
    """Steady-state rates of each epoch of the Ray Train loop (from its MLflow step metrics), and the fit's wall time.

    The first epoch leaves out `warmup` steps; later epochs count every step, their Ray Data start included."""
    from mlflow.tracking import MlflowClient

    from jobs.train import train

    start = time.perf_counter()
    result = train(data, str(model_dir), scratch / "out", cfg)
    wall = time.perf_counter() - start
    client = MlflowClient(cfg.registry.tracking_uri)

    def history(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(result.mlflow_run_id, key), key=lambda m: m.step)]

    supervised, step_s, step_cpu_s = history("supervised_tokens"), history("step_s"), history("step_cpu_s")
    tokens_rate, epochs = history("tokens_per_s"), history("epoch")
    passes = []
    for epoch in sorted(set(epochs)):
        steps = [i for i, e in enumerate(epochs) if e == epoch][0 if epoch else warmup :]
        elapsed, cpu_elapsed = sum(step_s[i] for i in steps), sum(step_cpu_s[i] for i in steps)
        tokens, supervised_tokens = sum(tokens_rate[i] * step_s[i] for i in steps), sum(supervised[i] for i in steps)
        passes.append({"tokens_per_s": tokens / elapsed, "supervised_tokens_per_s": supervised_tokens / elapsed,
                       "supervised_tokens_per_cpu_s": supervised_tokens / cpu_elapsed, "steps": len(steps),
                       "seconds": elapsed, "fit_wall_s": wall})
    return passes


def best(passes: Sequence[dict[str, float]]) -> dict[str, float]:
    """The fastest pass: on a shared machine the slower ones measure the neighbours, not the loop."""
    return {**max(passes, key=lambda p: p["supervised_tokens_per_s"]), "passes": len(passes),
            "all_supervised_tokens_per_s": [round(p["supervised_tokens_per_s"], 1) for p in passes]}


def cpu_section(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    from crlft.commands.init_model import build_default_model
    from crlft.model import load_model_and_tokenizer

    torch.set_num_threads(args.threads)
    cfg = load_config(None, {
        "data.pack_len": args.pack_len, "data.max_len": args.pack_len, "model.preset": args.preset,
        "state_dir": str(scratch / "state"), "registry.tracking_uri": f"sqlite:///{scratch / 'mlflow.db'}",
        "train.storage_path": str(scratch / "ray_results"), "train.workers": 1,
        "train.cpus_per_worker": float(args.threads), "train.lr": 1e-3, "train.epochs": args.passes,
    })  # fmt: skip
    model_dir = build_default_model(scratch / "model", cfg, [args.data])
    conversations = tokenized_conversations(args.data, model_dir, cfg)
    rows = packed_rows(conversations, args.pack_len)
    per_bin = max(1, round(len(conversations) / len(rows)))
    padded = padded_rows(conversations, per_bin, seed=0)

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(0)
        return load_model_and_tokenizer(str(model_dir))[0]

    cpu = torch.device("cpu")
    model = fresh_model()
    flops_per_token = model_flops_per_token(model, [len(c.input_ids) for c in conversations])
    load_before = os.getloadavg()[0]
    # One plain pass before the Ray fit and the others after it, so that both loops meet the machine alike.
    def plain_passes(count: int) -> None:
        for _ in range(count):
            packed_passes.append(plain_loop(fresh_model(), [[row] for row in rows], cfg, args.warmup, cpu))
            padded_passes.append(plain_loop(fresh_model(), padded, cfg, args.warmup, cpu))

    packed_passes: list[dict[str, float]] = []
    padded_passes: list[dict[str, float]] = []
    plain_passes(1)
    ray_passes = ray_loop(write_data(scratch / "data", rows, conversations, model_dir, cfg), model_dir, cfg,
                          args.warmup, scratch)
    ray = best(ray_passes)
    plain_passes(args.passes - 1)
    packed_plain, padded_plain = best(packed_passes), best(padded_passes)
    peak = matmul_flops(cpu, torch.float32, args.matmul_size)
    achieved = max(p["tokens_per_cpu_s"] for p in packed_passes) * flops_per_token
    return {
        "preset": args.preset,
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": args.threads,
        "conversations": len(conversations),
        "pack_len": args.pack_len,
        "bins": len(rows),
        "packing_efficiency": sum(len(r["input_ids"]) for r in rows) / (len(rows) * args.pack_len),
        "padded_batch_size": per_bin,
        "padded_efficiency": sum(len(c.input_ids) for c in conversations)
        / sum(len(b) * max(len(r["input_ids"]) for r in b) for b in padded),
        "plain_packed": packed_plain,
        "plain_padded": padded_plain,
        "ray_packed": ray,
        "ray_overhead": packed_plain["supervised_tokens_per_s"] / ray["supervised_tokens_per_s"],
        "ray_overhead_cpu_time": max(p["supervised_tokens_per_cpu_s"] for p in packed_passes)
        / max(p["supervised_tokens_per_cpu_s"] for p in ray_passes),
        "packed_over_padded": packed_plain["supervised_tokens_per_s"] / padded_plain["supervised_tokens_per_s"],
        "packed_over_padded_cpu_time": max(p["supervised_tokens_per_cpu_s"] for p in packed_passes)
        / max(p["supervised_tokens_per_cpu_s"] for p in padded_passes),
        "model_flops_per_token": flops_per_token,
        "achieved_flops": achieved,
        "matmul_flops": peak,
        "flops_fraction": achieved / peak,
        "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }


def precision_section(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """bf16 autocast against float32 in the plain loop: the same bins, the same initial weights, passes alternating
    fp32, bf16, fp32, bf16, ... (the machine's load meets both alike); every step's loss is kept to compare the curves.
    The model: `--base-model` (a folder, GGUF file or bundled name, e.g. smollm2), else the `--preset` model."""
    from crlft.commands.init_model import build_default_model
    from crlft.model import load_model_and_tokenizer, resolve_model_source

    torch.set_num_threads(args.threads)
    cfg = load_config(None, {"data.pack_len": args.pack_len, "data.max_len": args.pack_len,
                             "model.preset": args.preset, "train.lr": args.lr})
    source = resolve_model_source(args.base_model) if args.base_model else str(
        build_default_model(scratch / "model", cfg, [args.data]))
    model = load_model_and_tokenizer(source)[0]
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    conversations = tokenized_conversations(args.data, Path(source), cfg)
    every_bin = packed_rows(conversations, args.pack_len)
    steps = args.steps or len(every_bin) - HELD_OUT_BINS
    rows, held_out = every_bin[:steps], every_bin[steps : steps + HELD_OUT_BINS]
    cpu = torch.device("cpu")
    held_out_batches = [collate([row], None, 0, list(cfg.classes)) for row in held_out]
    passes: dict[str, list[dict[str, Any]]] = {"fp32": [], "bf16": []}
    for _ in range(args.passes):
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            model.load_state_dict(initial)
            load = os.getloadavg()[0]
            rates = plain_loop(model, [[row] for row in rows], cfg, args.warmup, cpu, dtype)
            # The trained float32 weights on bins it never saw, with a float32 forward: what each precision learned.
            held = evaluate(model, held_out_batches, n_classes=len(cfg.classes), device=cpu).loss
            passes[name].append({**rates, "held_out_loss_fp32_forward": held, "load_average_1min": round(load, 1)})
    fp32, bf16 = passes["fp32"][0]["losses"], passes["bf16"][0]["losses"]
    rate = {name: max(p["supervised_tokens_per_cpu_s"] for p in runs) for name, runs in passes.items()}
    wall = {name: max(p["supervised_tokens_per_s"] for p in runs) for name, runs in passes.items()}
    return {
        "model": args.base_model or args.preset,
        "parameters": sum(p.numel() for p in model.parameters()),
        "native_bf16": native_bf16(cpu),
        "threads": args.threads, "pack_len": args.pack_len, "steps": len(rows), "lr": args.lr,
        "supervised_tokens_per_cpu_s": rate, "supervised_tokens_per_s": wall,
        "bf16_over_fp32_cpu_time": rate["bf16"] / rate["fp32"],
        "bf16_over_fp32_wall": wall["bf16"] / wall["fp32"],
        "all_bf16_over_fp32_cpu_time": [round(b["supervised_tokens_per_cpu_s"] / f["supervised_tokens_per_cpu_s"], 2)
                                        for f, b in zip(passes["fp32"], passes["bf16"], strict=True)],
        "losses": {"fp32": fp32, "bf16": bf16},
        "max_relative_loss_gap": max(abs(b - f) / f for f, b in zip(fp32, bf16, strict=True)),
        "held_out_loss_fp32_forward": {name: runs[0]["held_out_loss_fp32_forward"] for name, runs in passes.items()},
        "passes": passes,
    }  # fmt: skip


def gpu_section(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """bf16 on CUDA: plain single-GPU loop, then Ray Train with FSDP on every GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from crlft.commands.init_model import build_default_model
    from crlft.model import load_model_and_tokenizer

    gpus = torch.cuda.device_count()
    pack_len = args.gpu_pack_len
    cfg = load_config(None, {
        "data.pack_len": pack_len, "data.max_len": pack_len, "state_dir": str(scratch / "gpu_state"),
        "registry.tracking_uri": f"sqlite:///{scratch / 'gpu_mlflow.db'}",
        "train.storage_path": str(scratch / "gpu_ray_results"), "train.workers": gpus, "train.use_gpu": True,
        "train.strategy": "fsdp", "train.cpus_per_worker": 1.0, "train.lr": 1e-4, "train.epochs": 1,
    })  # fmt: skip
    tokenizer_dir = build_default_model(scratch / "gpu_tokenizer", cfg, [args.data])
    _, tokenizer = load_model_and_tokenizer(str(tokenizer_dir))
    model_dir = scratch / "gpu_model"
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **GPU_MODEL)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    conversations = tokenized_conversations(args.data, model_dir, cfg)
    rows = packed_rows(conversations, pack_len)
    rows = (rows * math.ceil(args.gpu_steps * gpus / len(rows)))[: args.gpu_steps * gpus]
    model = load_model_and_tokenizer(str(model_dir))[0]
    flops_per_token = model_flops_per_token(model, [len(c.input_ids) for c in conversations])
    device = torch.device("cuda")
    plain = plain_loop(model, [[row] for row in rows[: args.gpu_steps]], cfg, args.warmup, device, torch.bfloat16)
    del model
    torch.cuda.empty_cache()
    peak = matmul_flops(device, torch.bfloat16, 8192)
    ray = best(ray_loop(write_data(scratch / "gpu_data", rows, conversations, model_dir, cfg), model_dir, cfg,
                        args.warmup, scratch / "gpu"))
    return {
        "device": torch.cuda.get_device_name(0),
        "gpus": gpus,
        "parameters": sum(p.numel() for p in LlamaForCausalLM(config).parameters()),
        "pack_len": pack_len,
        "plain_tokens_per_s_per_gpu": plain["tokens_per_s"],
        "plain_mfu": plain["tokens_per_s"] * flops_per_token / peak,
        "fsdp_tokens_per_s_per_gpu": ray["tokens_per_s"] / gpus,
        "fsdp_mfu": ray["tokens_per_s"] / gpus * flops_per_token / peak,
        "bf16_matmul_flops": peak,
        "plain": plain,
        "fsdp": ray,
    }


def _report(results: dict[str, Any], echo: Callable[[str], None]) -> None:
    cpu = results["cpu"]
    plain, padded, ray = cpu["plain_packed"], cpu["plain_padded"], cpu["ray_packed"]
    echo(f"model {cpu['preset']} ({cpu['parameters'] / 1e6:.2f}M params), {cpu['threads']} threads, "
         f"load {cpu['load_average_1min']}, {cpu['conversations']} conversations -> {cpu['bins']} bins of "
         f"{cpu['pack_len']} "
         f"(packing {cpu['packing_efficiency']:.3f}; padded batches of {cpu['padded_batch_size']}: "
         f"{cpu['padded_efficiency']:.3f})")
    echo(f"plain packed: {plain['supervised_tokens_per_s']:.0f} supervised tok/s, {plain['tokens_per_s']:.0f} tok/s")
    echo(f"plain padded: {padded['supervised_tokens_per_s']:.0f} supervised tok/s -> packed/padded "
         f"{cpu['packed_over_padded']:.2f}x (per CPU second: {cpu['packed_over_padded_cpu_time']:.2f}x)")
    echo(f"ray packed:   {ray['supervised_tokens_per_s']:.0f} supervised tok/s (fit wall {ray['fit_wall_s']:.1f} s) "
         f"-> plain/ray {cpu['ray_overhead']:.3f} (per CPU second of the worker: {cpu['ray_overhead_cpu_time']:.3f})")
    echo(f"FLOP/s per CPU second: {cpu['achieved_flops'] / 1e9:.2f} GFLOP/s achieved (packed) / "
         f"{cpu['matmul_flops'] / 1e9:.2f} GFLOP/s matmul = {cpu['flops_fraction']:.3f}")
    if "gpu" in results:
        gpu = results["gpu"]
        echo(f"GPU {gpu['device']} x{gpu['gpus']}: plain bf16 {gpu['plain_tokens_per_s_per_gpu']:.0f} tok/s/GPU "
             f"(MFU {gpu['plain_mfu']:.3f}); Ray FSDP {gpu['fsdp_tokens_per_s_per_gpu']:.0f} tok/s/GPU "
             f"(MFU {gpu['fsdp_mfu']:.3f})")


def _report_precision(result: dict[str, Any], echo: Callable[[str], None]) -> None:
    rate, wall = result["supervised_tokens_per_cpu_s"], result["supervised_tokens_per_s"]
    loads = [p["load_average_1min"] for runs in result["passes"].values() for p in runs]
    echo(f"model {result['model']} ({result['parameters'] / 1e6:.1f}M params), {result['threads']} threads, "
         f"{result['steps']} bins of {result['pack_len']}, native bf16: {result['native_bf16']}, "
         f"load {min(loads)}-{max(loads)}")
    echo(f"supervised tok/s per CPU second: fp32 {rate['fp32']:.1f}, bf16 {rate['bf16']:.1f} -> "
         f"bf16/fp32 {result['bf16_over_fp32_cpu_time']:.2f}x (per pass pair {result['all_bf16_over_fp32_cpu_time']})")
    echo(f"best wall supervised tok/s: fp32 {wall['fp32']:.1f}, bf16 {wall['bf16']:.1f} -> "
         f"{result['bf16_over_fp32_wall']:.2f}x")
    fp32, bf16 = result["losses"]["fp32"], result["losses"]["bf16"]
    echo("loss per step (first pass), fp32 / bf16: "
         + ", ".join(f"{f:.3f}/{b:.3f}" for f, b in zip(fp32, bf16, strict=True)))
    echo(f"largest relative gap between the curves: {result['max_relative_loss_gap']:.4f}")
    held = result["held_out_loss_fp32_forward"]
    echo(f"held-out loss of the trained weights (float32 forward, {HELD_OUT_BINS} unseen bins): fp32-trained "
         f"{held['fp32']:.4f}, bf16-trained {held['bf16']:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help="conversations (JSON/JSONL/Parquet)")
    parser.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--pack-len", type=int, default=1024)
    # One thread by default: OpenMP threads spin, and with more threads than free cores (a shared machine) a step
    # can take 20x longer; on a dedicated machine pass --threads $(nproc).
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both loops (Ray: CPUs per worker)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of each rate")
    parser.add_argument("--passes", type=int, default=3, help="passes over the data per loop (the fastest counts)")
    parser.add_argument("--matmul-size", type=int, default=1024)
    parser.add_argument("--gpu-pack-len", type=int, default=4096)
    parser.add_argument("--gpu-steps", type=int, default=40)
    parser.add_argument("--precision", action="store_true",
                        help="only compare bf16 autocast with float32 (plain loop, passes alternating)")
    parser.add_argument("--base-model", metavar="SOURCE",
                        help="with --precision: a model folder, GGUF file or bundled name (smollm2), not --preset")
    parser.add_argument("--steps", type=int, help="with --precision: bins (steps) per pass (default: all)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the plain loops")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    set_offline_defaults()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    logging.getLogger("ray").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        results: dict[str, Any] = {"command": " ".join(["python", *sys.argv])}
        if args.precision:
            results["precision"] = precision_section(args, scratch)
            _report_precision(results["precision"], print)
        else:
            results["cpu"] = cpu_section(args, scratch)
            if torch.cuda.is_available():
                results["gpu"] = gpu_section(args, scratch)
            _report(results, print)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
