"""Replay for `crlft data build`: the base model answers general prompts, on Ray Data, and its answers become
conversations of a known class (crlft.data.replay says which prompts and why).

    prompts (data.replay.prompts) -> the first round(ratio x accepted) of a seeded shuffle
      -> ids of the base model's own chat template, on the driver (crlft.data.replay says why)
      -> ray.data.from_items -> one actor holding the model answers them greedily, a batch at a time
      -> answers cut at the limit back to their last sentence, empty ones dropped
      -> conversations of the replay class -> <state_dir>/replay/<fingerprint>.jsonl (the cache) -> <out>/replay.jsonl

The engine is the one `crlft serve` would serve with here (crlft/inference/decoding.py: inference.engine,
inference.precision):
- vLLM: `ray.data.llm` (vLLMEngineProcessorConfig, build_processor), which runs on CPUs too with vLLM's CPU build:
  its engine stage asks Ray for GPUs only by default, so on CPUs it gets a placement group of CPU bundles instead.
  It takes prompt ids and gives token ids (vLLM's tokenizer is not loaded), with the replica's engine arguments
  (crlft.inference.vllm_engine.engine_arguments), thread placement and stop tokens, greedy; crlft turns the ids into
  text.
- transformers: a `map_batches` actor loads the model once as that engine serves it
  (crlft.inference.decoding.load_model) and answers with `crlft.eval.answers.generate`, evaluation's decoder.
Both fit prompts to the context as `generate` does (`crlft.eval.answers.fit_prompts`).

The answers of the same model, prompts, template, class, length, engine and number type are cached: the fingerprint
of all of them names the cache file, so a second build reuses it byte for byte and a change of any regenerates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from crlft.config import Config
from crlft.data.replay import (
    ReplayPlan,
    answering_prompt,
    choose_prompts,
    complete_answer,
    replay_condition,
    replay_line,
)
from crlft.environ import set_offline_defaults
from crlft.inference.decoding import dtype_name, engine_settings
from crlft.storage import folder_revision, write_whole

if TYPE_CHECKING:  # torch and transformers come with these: imported where the model runs
    from crlft.data.template import Template, TemplateTokenizer
    from crlft.export import ExportedModel
    from crlft.inference.engine import EngineSettings

REPLAY_FILE = "replay.jsonl"
BATCHES_PER_CALL = 4  # prompts per actor call, in engine batches: continuous batching refills slots as answers end


@dataclasses.dataclass(frozen=True)
class Replay:
    lines: list[str]  # the conversations, as JSON lines (replay.jsonl)
    stats: dict[str, Any]  # stats.json's `replay` section


def make_replay(cfg: Config, plan: ReplayPlan | None, template_tokenizer: TemplateTokenizer, accepted: int) -> Replay:
    """The replay conversations of `plan` (crlft.data.replay.plan_replay; None: no replay) for a build of `accepted`
    conversations; from the cache when it holds them."""
    started = time.monotonic()
    if plan is None:
        why = "data.replay.enabled is false" if cfg.data.replay.enabled is False else "auto: not a pretrained model"
        return Replay([], {"enabled": False, "why": why, "conversations": 0})
    settings, model, path, prompts = cfg.data.replay, plan.model, plan.prompts_file, plan.prompts
    chosen, wanted = choose_prompts(prompts, accepted, settings.ratio, cfg.data.seed)
    if wanted > len(chosen):
        _log(f"{wanted} replay conversations wanted ({settings.ratio} x {accepted}), capped at the {len(prompts)} "
             f"prompts of {path}")
    engine = engine_settings(cfg, cfg.inference.max_batch_size)
    fingerprint = _fingerprint(cfg, model, path, chosen, template_tokenizer, engine)
    cache = Path(cfg.state_dir).resolve() / "replay" / f"{fingerprint}.jsonl"
    cached = cache.is_file()
    if cached:
        lines = cache.read_text(encoding="utf-8").splitlines()
    else:
        lines = _generate(cfg, model, template_tokenizer, chosen, engine, cache) if chosen else []
    dropped = len(chosen) - len(lines)
    stats = {
        "enabled": True, "prompts_file": str(path), "prompts_available": len(prompts), "wanted": wanted,
        "answered": len(chosen), "conversations": len(lines), "dropped": dropped,
        "condition": replay_condition(cfg), "ratio": settings.ratio, "max_new_tokens": settings.max_new_tokens,
        "engine": engine.kind, "dtype": dtype_name(engine), "cached": cached, "fingerprint": fingerprint,
        "seconds": round(time.monotonic() - started, 3), "file": REPLAY_FILE,
    }  # fmt: skip
    how = f"reused from {cache}" if cached else f"answered by {engine.kind} ({stats['dtype']})"
    _log(f"{len(chosen)} replay prompts {how} in {stats['seconds']:.1f} s: {len(lines)} conversations of class "
         f"{stats['condition']}, {dropped} answers dropped (empty, or cut at the length limit with no whole sentence)")
    return Replay(lines, stats)


def _fingerprint(cfg: Config, model: str, path: Path, chosen: list[str], template_tokenizer: TemplateTokenizer,
                 engine: EngineSettings) -> str:
    """What the answers depend on: the model's files, the prompts file and the prompts chosen from it, the templates
    (crlft's and the model's own) and tokenizer, the class, the answer length, the engine and its number type."""

    folder = Path(model).expanduser()
    parts = {
        "model": folder_revision(folder) if folder.is_dir() else model,
        "prompts_file": hashlib.sha256(path.read_bytes()).hexdigest(),
        "prompts": hashlib.sha256(json.dumps(chosen).encode()).hexdigest(),
        "template_tokenizer": template_tokenizer.fingerprint(), "condition": replay_condition(cfg),
        "max_new_tokens": cfg.data.replay.max_new_tokens, "engine": engine.kind, "dtype": dtype_name(engine),
        "own_template": json.dumps(template_tokenizer.tokenizer.chat_template, sort_keys=True),
        "max_len": cfg.data.max_len, "kept": "whole sentences",
    }  # fmt: skip
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _generate(cfg: Config, model: str, template_tokenizer: TemplateTokenizer, chosen: list[str],
              engine: EngineSettings, cache: Path) -> list[str]:
    """Answer the prompts, keep the whole answers as conversations, write them to the cache (whole or not at all: a
    build stopped halfway leaves no cache to reuse)."""
    from crlft.data.records import Message

    condition = replay_condition(cfg)
    tokenizer = template_tokenizer.tokenizer
    trained = [template_tokenizer.tokenize_prompt([Message("user", p)], condition=condition) for p in chosen]
    ids = [answering_prompt(template_tokenizer, p, condition) for p in chosen]
    # The trained conversation (crlft's prompt, the answer, the end of turn) must fit data.max_len.
    max_new_tokens = max(1, min(cfg.data.replay.max_new_tokens, cfg.data.max_len - max(map(len, trained)) - 1))
    _log(f"answering {len(chosen)} replay prompts with {model} ({engine.kind}, {dtype_name(engine)}, at most "
         f"{max_new_tokens} tokens each)")
    answer = _answer_with_vllm if engine.kind == "vllm" else _answer_with_transformers
    answers = answer(model, ids, cfg, engine, template_tokenizer, max_new_tokens)
    lines = []
    for prompt, text in zip(chosen, answers, strict=True):
        cut = len(tokenizer.encode(text, add_special_tokens=False)) >= max_new_tokens - 1
        kept = complete_answer(text, cut)
        if kept:
            lines.append(replay_line(prompt, kept, condition))
    write_whole(cache, "".join(line + "\n" for line in lines))
    return lines


def _answer_cpus() -> tuple[int, int]:
    """(CPUs the answering actor reserves, threads it runs on the CPU): threads on every CPU of the largest node (the
    answers are the only work at that point), one CPU fewer reserved: a stage whose actor holds every CPU never got
    its batches from Ray Data here (vLLM's stage on 2 CPUs stalled; 1 reserved ran)."""
    import ray

    cpus = max(1, int(max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)))
    return max(1, cpus - 1), cpus


class AnswerPrompts:
    """Ray Data actor: the model loaded once as the transformers engine serves it; greedy answers of a batch of
    prompt ids. Stops are the fine-tune's template's (a base model folder has no crlft.json of its own)."""

    def __init__(self, model: str, engine: EngineSettings, template: Template, max_new_tokens: int,
                 threads: int) -> None:
        set_offline_defaults()
        import torch

        from crlft.inference.decoding import load_model

        torch.set_num_threads(threads)
        self._exported: ExportedModel = load_model(Path(model), engine).under(template)
        self._engine = engine
        self._max_new_tokens = max_new_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        from crlft.eval.answers import generate

        prompts = batch.column("ids").to_pylist()
        answers = generate(self._exported, prompts, self._max_new_tokens, self._engine.max_batch_size)
        return pa.table({"index": batch.column("index"), "answer": pa.array(answers, pa.string())})


def _answer_with_transformers(model: str, ids: list[list[int]], cfg: Config, engine: EngineSettings,
                              template_tokenizer: TemplateTokenizer, max_new_tokens: int) -> list[str]:
    import ray.data

    reserved, threads = _answer_cpus()
    resources = {"num_gpus": 1, "num_cpus": 1} if engine.device == "cuda" else {"num_cpus": reserved}
    answered = ray.data.from_items([{"index": i, "ids": p} for i, p in enumerate(ids)]).map_batches(
        AnswerPrompts,
        fn_constructor_args=(model, engine, template_tokenizer.template, max_new_tokens, threads),
        batch_size=engine.max_batch_size * BATCHES_PER_CALL, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1), **resources,
    )  # fmt: skip
    by_index = {row["index"]: row["answer"] for row in answered.iter_rows()}
    return [by_index[i] for i in range(len(ids))]


def _answer_with_vllm(model: str, ids: list[list[int]], cfg: Config, engine: EngineSettings,
                      template_tokenizer: TemplateTokenizer, max_new_tokens: int) -> list[str]:
    import ray.data
    from ray.data.llm import build_processor

    from crlft.eval.answers import fit_prompts
    from crlft.export import ModelFolder
    from crlft.inference.sampling import answer_budget, answer_text

    folder = ModelFolder.read(model, template_tokenizer)
    fitted, max_new_tokens = fit_prompts(ids, max_new_tokens, folder.context_len, template_tokenizer.bos_ids)
    context, stops, tokenizer = folder.context_len, folder.stop_ids, template_tokenizer.tokenizer
    rows = [{"index": i, "tokenized_prompt": p, "sampling_params": {
        # As the replica does: an answer never runs past the context (vLLM would refuse the request).
        "temperature": 0.0, "max_tokens": answer_budget(len(p), max_new_tokens, context), "stop_token_ids": stops,
        "detokenize": False}} for i, p in enumerate(fitted)]  # fmt: skip
    processor = build_processor(_vllm_processor_config(model, engine, context))
    by_index = {row["index"]: row["generated_tokens"] for row in processor(ray.data.from_items(rows)).iter_rows()}
    return [answer_text(tokenizer, list(by_index[i]), stops) for i in range(len(rows))]


def _vllm_processor_config(model: str, engine: EngineSettings, context: int) -> Any:
    """ray.data.llm's vLLM stage with the replica's engine arguments: one engine, prompt ids in and token ids out.
    On CPUs its actor reserves CPUs as a placement group bundle (by default it would ask for a GPU) and runs vLLM's
    threads unpinned on the node's CPUs (`_answer_cpus`), as `crlft serve` does on a replica's."""
    from ray.data.llm import vLLMEngineProcessorConfig

    from crlft.inference.vllm_engine import VLLM_LOG_ENV, engine_arguments, unpinned_threads

    placement, unpinned = None, None
    if engine.device == "cpu":
        reserved, threads = _answer_cpus()
        placement, unpinned = {"bundles": [{"CPU": reserved}]}, unpinned_threads(Path(model), engine, threads)
    engine_kwargs = engine_arguments(Path(model), engine, context, unpinned=unpinned is not None)
    engine_kwargs.pop("model")  # ray.data.llm passes model_source
    env = VLLM_LOG_ENV | (unpinned or {})
    return vLLMEngineProcessorConfig(
        model_source=model, engine_kwargs=engine_kwargs, batch_size=engine.max_batch_size, concurrency=1,
        placement_group_config=placement, runtime_env={"env_vars": env}, log_engine_metrics=False,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
    )  # fmt: skip


def _log(message: str) -> None:
    print(f"[data build] {message}", file=sys.stderr, flush=True)
