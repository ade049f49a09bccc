"""`crlft demo`: the whole product on the embedded defaults, on one laptop, no GPU, no network.

synthetic mixed-quality data -> tiny model -> Ray Data -> Ray Train (C-RLFT) -> evaluation -> MLflow registry
(champion) -> Ray Serve -> held-out questions asked through the OpenAI-compatible endpoint under the expert and the
sub-optimal condition, printed beside the expected answers.

`--base-model smollm2` (or a .gguf file, a Hugging Face folder or hub id) runs it on a real pretrained chat model
instead, fine-tuned with LoRA by the real-model recipe, and also shows a general question answered before and after.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crlft.command_line import add_config_arguments, config_flag, config_from_args, stage_entrypoint
from crlft.config import REAL_MODEL_SYNTH_RECIPE, SYNTH_RECIPE, Config, load_config

GENERAL_QUESTION = "What is the capital of France?"


def recipe_config(args: argparse.Namespace | None = None) -> Config:
    """The tiny-synthetic recipe (the LoRA one for a real --base-model), then --config / --set / flags on top."""
    if args is None:
        return load_config(SYNTH_RECIPE)
    if getattr(args, "config", None) is None:
        args.config = str(REAL_MODEL_SYNTH_RECIPE if getattr(args, "base_model", None) else SYNTH_RECIPE)
    return config_from_args(args)


def spread_over_tasks(items: list[Any], n: int) -> list[Any]:
    """The first n questions taken in turn from each task, so that the sample shows every task."""
    by_task: dict[str, list[Any]] = {}
    for item in items:
        by_task.setdefault(item.task, []).append(item)
    rounds = zip(*by_task.values(), strict=False)
    return [item for round_ in rounds for item in round_][:n]


def ask(url: str, model: str, api_key: str | None, question: str, condition: str, max_tokens: int = 16) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=api_key or "unused", max_retries=2, timeout=60)
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           max_tokens=max_tokens, temperature=0, extra_body={"condition": condition})
    return (reply.choices[0].message.content or "").strip()


def answer_locally(model_dir: str | Path, questions: Sequence[str], condition: str, max_tokens: int = 32) -> list[str]:
    """Greedy answers of a model folder, in this process (e.g. the base model, which is not served)."""
    from crlft.data.records import Message
    from crlft.eval.answers import chat_prompt, generate
    from crlft.export import load_exported

    exported = load_exported(model_dir)
    return generate(exported, [chat_prompt(exported, [Message("user", q)], condition) for q in questions], max_tokens)


def side_by_side(rows: list[dict[str, Any]], expert: str, suboptimal: str) -> str:
    width = max(len(r["prompt"]) for r in rows)
    head = f"{'question':{width}}  {'expected':10}  {expert + ' answer':18}  {suboptimal + ' answer':18}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mark_e = "ok" if r["expert_ok"] else "--"
        mark_s = "ok" if r["suboptimal_ok"] else "--"
        lines.append(f"{r['prompt']:{width}}  {r['answer']:10}  {r['expert'][:15]:15} {mark_e}  "
                     f"{r['suboptimal'][:15]:15} {mark_s}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--questions", type=int, default=12, help="held-out questions to ask the endpoint")
    parser.add_argument("--keep-serving", action="store_true", help="stay up (endpoint, chat page) until Ctrl-C")
    config_flag(parser, "train.epochs", "--epochs", show_default=False, help="training epochs (default: the recipe's)")
    config_flag(parser, "state_dir", "--state-dir", metavar="DIR", show_default=False,
                help="where the demo keeps its state (default .crlft)")
    parser.add_argument("--force", action="store_true", help="redo every stage even when up to date")
    parser.add_argument("--base-model", metavar="SOURCE",
                        help="a real pretrained chat model instead of the tiny one: `smollm2` (bundled), a .gguf file, "
                        "a Hugging Face folder or hub id; trained with LoRA (recipe lora_synth.yaml)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from cluster.session import ray_session
    from crlft.commands.init_model import local_base_model

    started = time.monotonic()
    cfg = recipe_config(args)
    print("crlft demo: C-RLFT on the synthetic mixed-quality suite (GPT4 = expert, reward 1.0; GPT3 = "
          "sub-optimal, reward 0.1, 4x more data, mostly wrong in a systematic way)\n", flush=True)
    base = local_base_model(args.base_model, cfg) if args.base_model else None
    with ray_session(cfg) as dashboard:  # one Ray for every stage and the endpoint: it starts once
        return _demo(cfg, args, base, started, dashboard)


def _demo(cfg: Config, args: argparse.Namespace, base: str | None, started: float, dashboard: str | None) -> int:
    from crlft.eval.scoring import is_correct, load_eval_suite
    from crlft.lineage.versions import champion_uri
    from jobs.pipeline import run_pipeline
    from services.local import deploy, shutdown

    name = "demo" if base is None else f"demo-{Path(base).name}"
    result = run_pipeline(cfg, base_model=base, name=name, force=args.force)
    expert = cfg.inference_condition
    suboptimal = cfg.suboptimal_condition
    target = champion_uri(cfg) if result.champion else str(result.model_dir)
    print(f"[serve] deploying {target} ...", flush=True)
    url = deploy(target, cfg)
    try:
        model_name = _served_name(url)
        api_key = cfg.serve.api_keys[0] if cfg.serve.api_keys else None
        items = spread_over_tasks(load_eval_suite(result.suite), args.questions) if result.suite else []
        rows = []
        for item in items:
            e = ask(url, model_name, api_key, item.prompt, expert)
            s = ask(url, model_name, api_key, item.prompt, suboptimal)
            rows.append({"prompt": item.prompt, "answer": item.answer, "expert": e, "suboptimal": s,
                         "expert_ok": is_correct(e, item.answer), "suboptimal_ok": is_correct(s, item.answer)})
        if rows:
            print("\nHeld-out questions asked through the endpoint:\n")
            print(side_by_side(rows, expert, suboptimal))
            n = len(rows)
            print(f"\ncorrect: {sum(r['expert_ok'] for r in rows)}/{n} under {expert}, "
                  f"{sum(r['suboptimal_ok'] for r in rows)}/{n} under {suboptimal}")
        if base is not None:
            print(f"\nA general question, before and after C-RLFT:\n  {GENERAL_QUESTION}")
            print(f"  {'base model':18} {answer_locally(base, [GENERAL_QUESTION], expert)[0]}")
            for condition in (expert, suboptimal):
                answer = ask(url, model_name, api_key, GENERAL_QUESTION, condition, max_tokens=32)
                print(f"  {'fine-tuned, ' + condition:18} {answer}")
        accuracy = {k: v for k, v in result.metrics.items() if k.startswith("accuracy_") and "/" not in k}
        if accuracy:
            print(f"whole held-out suite: {json.dumps({k: round(v, 3) for k, v in accuracy.items()})}")
        print(_where(cfg, result, url, model_name, expert, dashboard))
        print(f"demo finished in {time.monotonic() - started:.0f} s", flush=True)
        if args.keep_serving:
            print("serving until Ctrl-C ...", flush=True)
            while True:
                time.sleep(3600)
    finally:
        shutdown()
    return 0


def _served_name(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]


def _where(cfg: Config, result: Any, url: str, model_name: str, expert: str, dashboard: str | None) -> str:
    body = json.dumps({"model": model_name, "messages": [{"role": "user", "content": "What is the opposite of hot?"}],
                       "condition": expert})
    return f"""
Where everything is:
  model folder     {result.model_dir}
  dataset          {result.data_dir}  (stats.json, rejects.jsonl)
  evaluation       {result.root / 'eval'}
  MLflow           {result.tracking_uri}
                   UI: mlflow ui --backend-store-uri {result.tracking_uri} --port 5000
  registered       {cfg.registry.model_name} v{result.version} ({result.promotion or 'not promoted'})
  endpoint         {url}/v1/chat/completions   (chat page: {url}/)
  curl             curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'
  openai           OpenAI(base_url="{url}/v1", api_key="unused").chat.completions.create(model="{model_name}",
                       messages=[...], extra_body={{"condition": "{expert}"}})
  Ray dashboard    {dashboard or "(the cluster's)"} (while the demo runs)"""


if __name__ == "__main__":
    raise SystemExit(stage_entrypoint("jobs.demo"))
