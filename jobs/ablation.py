"""The OpenChat paper's ablation at laptop scale: `crlft ablation` / `python -m jobs.ablation`.

    crlft ablation [--seeds 0 1 2] [--steps N] [--variants crlft sft ...] [--suite DIR | --facts] [--out DIR]
                   [--mlflow-uri URI] [--base-model smollm2|DIR|FILE.gguf [--replay both|on|off]
                   [--retention-limit N] [--open-limit N]]

What it trains, how the runs are judged and why the suite and the budget look the way they do: crlft/ablation/
(the package's docstring; the variants in crlft/ablation/variants.py, the table and the claims in
crlft/ablation/summary.py, the figures in crlft/ablation/plots.py). This module runs it on Ray and logs it to MLflow.

Outputs (under --out): table.md, results.json, ablation.png (the table as bars with the spread as error bars),
projection.png (the held-out embeddings of crlft beside sft, the paper's figure), and per run its model, evaluation
and result (runs/: what lets a stopped ablation go on where it stopped, crlft/ablation/ledger.py). MLflow (experiment
`crlft-ablation`): every training run and evaluation run, tagged with the ablation id, variant and seed, and one
summary run holding the table, the figures and every figure as a metric.

How the work is shared: one Ray session for everything; the data is tokenized and packed once per distinct template,
data filter and replay (crlft and conditioned share theirs, and so do weighted and sft: the trainer rescales the
weights baked into the data to the mode's rewards); the base model is built once per seed (the same tokenizer for
all, trained on the suite, and the seed's initial weights), so within a seed every variant starts from the same
weights.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from crlft.ablation.ledger import Ledger
from crlft.ablation.plots import plot_projections, plot_table, projection_pair
from crlft.ablation.summary import Ablation, RunResult, Stat, base_line, report_text, results_json, summarize
from crlft.ablation.variants import (
    EXPERIMENT,
    REAL_MODEL_VARIANTS,
    REPLAY_CHOICES,
    VARIANT_CHOICES,
    VARIANTS,
    Variant,
    ablation_variants,
    data_config,
    recipe_steps,
    run_config,
    steps_per_epoch,
    suite_files,
    variant_named,
    write_facts_suite,
)
from crlft.command_line import add_config_arguments, config_flag, config_from_args, stage_entrypoint
from crlft.config import REAL_MODEL_SYNTH_RECIPE, SYNTH_RECIPE, Config, overridden
from crlft.data.stats import STATS_FILE, DataStats
from crlft.errors import CrlftError

TAG = "crlft.ablation."
DEFAULT_SEEDS = (0, 1, 2)
FACTS_MAX_NEW_TOKENS = 32  # facts are answered in sentences ("The capital of Brirkeia is Lonmem."), 16 can cut them


# ---------------------------------------------------------------------------------------------------------------------
# The runs


def _tag_run(client: Any, run_id: str | None, tags: dict[str, str]) -> None:
    if run_id:
        for key, value in tags.items():
            client.set_tag(run_id, key, value)


def base_reference(base_model: Path, suite: dict[str, Path | None], cfg: Config, out: Path,
                   retention: bool) -> dict[str, float]:
    """The pretrained model before any fine-tuning, scored on the suite like the runs (no MLflow run, `cfg.eval`'s
    settings), and with `retention` its answers to the general check, measured once for every run's retention (cached
    in <state_dir>/retention)."""
    from crlft.eval.measure import base_answers, plan_retention
    from crlft.inference.decoding import engine_settings
    from jobs.evaluate import evaluate_model

    metrics = evaluate_model(base_model, suite["eval"], cfg, log_mlflow=False, out_dir=out / "eval" / "base",
                             retention=False)["metrics"]  # fmt: skip
    reference = {"accuracy_expert": float(metrics["accuracy_expert"]),
                 "accuracy_suboptimal": float(metrics.get("accuracy_suboptimal", metrics["accuracy_expert"]))}
    if retention:
        plan = plan_retention(None, str(base_model), True, cfg.eval.retention_limit, cfg.eval.open_limit)
        assert plan is not None  # asked for: a base that is not found is an error
        batch = cfg.eval.batch_size  # crlft eval's: the base's answers are cached under the same decoder
        answers, _ = base_answers(plan, cfg, engine_settings(cfg, batch), batch)
        reference["general_accuracy"] = answers.scores["general_accuracy"]
    return reference


def run_one(variant: Variant, seed: int, cfg: Config, data_dir: Path, base_model: Path,
            suite: dict[str, Path | None], out: Path, tracking_uri: str, tags: dict[str, str],
            retention: bool = False) -> RunResult:
    """Train one variant with one seed into out/models, evaluate it on the held-out split into out/eval as `cfg.eval`
    says (and its retention against `base_model` with `retention`), tag both MLflow runs."""
    from mlflow.tracking import MlflowClient

    from jobs.evaluate import evaluate_model
    from jobs.train import train

    name = f"{variant.slug()}-seed{seed}"  # also names the Ray Train run folder
    started = time.monotonic()
    trained = train(data_dir, str(base_model), out / "models" / name, cfg, mlflow_uri=tracking_uri)
    train_s = time.monotonic() - started
    report = evaluate_model(trained.out_dir, suite["eval"], cfg, heldout=suite["heldout"], log_mlflow=True,
                            tracking_uri=tracking_uri, out_dir=out / "eval" / name, retention=retention,
                            base_model=str(base_model) if retention else None)  # fmt: skip
    metrics = report["metrics"]
    client = MlflowClient(tracking_uri)
    run_tags = {**tags, TAG + "variant": variant.name, TAG + "seed": str(seed), TAG + "replay": str(variant.replay)}
    _tag_run(client, trained.mlflow_run_id, run_tags)
    _tag_run(client, report.get("run_id"), run_tags)
    client.log_metric(trained.mlflow_run_id, "train_wall_s", train_s)
    return RunResult(
        variant=variant.name,
        seed=seed,
        accuracy_expert=float(metrics["accuracy_expert"]),
        accuracy_suboptimal=float(metrics.get("accuracy_suboptimal", metrics["accuracy_expert"])),
        silhouette=metrics.get("silhouette"),
        train_s=train_s,
        steps=trained.steps,
        model_dir=str(trained.out_dir),
        train_run_id=trained.mlflow_run_id,
        eval_run_id=report.get("run_id"),
        retention=metrics.get("retention"),
        agreement=metrics.get("agreement"),
    )


def log_summary(ablation: Ablation, cfg: Config, tracking_uri: str, params: dict[str, str]) -> str:
    """One MLflow run with the table (text and JSON), the figures, and mean/spread of every figure as metrics."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    run_id = client.create_run(experiment_id, run_name=f"ablation {ablation.ablation_id}",
                               tags={TAG + "id": ablation.ablation_id, TAG + "kind": "summary"}).info.run_id
    now = int(time.time() * 1000)
    metrics = []
    for row in ablation.rows:
        key = variant_named(row.variant).slug()  # MLflow metric names take no `+`
        for name in ("accuracy_expert", "accuracy_suboptimal", "silhouette", "train_s", "retention", "agreement"):
            stat: Stat = getattr(row, name)
            if stat.n:
                metrics += [Metric(f"{key}/{name}", stat.mean, now, 0),
                            Metric(f"{key}/{name}_spread", stat.spread, now, 0)]  # fmt: skip
    client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    client.log_text(run_id, ablation.text, "table.md")
    client.log_dict(run_id, results_json(ablation), "results.json")
    for path in ablation.figures.values():
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id


def run_ablation(cfg: Config, out: Path, *, seeds: Sequence[int] = DEFAULT_SEEDS, steps: int | None = None,
                 variants: Sequence[str] | None = None, suite_dir: Path | None = None,
                 mlflow_uri: str | None = None, parallel: int = 1, base_model: str | None = None,
                 replay: str | None = None, facts: bool = False, log: Callable[[str], None] = print) -> Ablation:
    """Build the data, train and evaluate every variant for every seed in one Ray session, summarize, plot, log.
    With `base_model` (a pretrained model: folder, GGUF file or bundled name) every run starts from it, is trained
    without and/or with replay (`replay`: both, on or off; default both) and its retention is measured; without it
    (the tiny model) there is no replay. `facts`: crlft/synth/facts.py's set instead of the synthetic suite. Every run
    and the base are evaluated as `cfg.eval` says (facts: answers of at least FACTS_MAX_NEW_TOKENS)."""
    from cluster.session import ray_session
    from crlft.commands.init_model import build_default_model, local_base_model
    from crlft.environ import set_offline_defaults
    from crlft.synth.suite import write_suite
    from crlft.tracking import setup_mlflow
    from jobs.build_dataset import build_dataset

    set_offline_defaults()
    chosen, replay = ablation_variants(variants, replay, pretrained=bool(base_model))
    names = [v.name for v in chosen]
    if not seeds:
        raise CrlftError("give at least one seed")
    if facts and suite_dir:
        raise CrlftError("give either --suite DIR or --facts, not both")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if suite_dir:
        suite = suite_files(suite_dir)
    elif facts:
        suite = write_facts_suite(out / "suite")
    else:
        suite = dict(write_suite(out / "suite", seed=0))
    train_file = suite["train"]
    assert train_file is not None
    retention = bool(base_model)
    if facts and cfg.eval.max_new_tokens < FACTS_MAX_NEW_TOKENS:
        cfg = overridden(cfg, {"eval.max_new_tokens": FACTS_MAX_NEW_TOKENS})
    tracking_uri = setup_mlflow(cfg.model_copy(update={"registry": cfg.registry.model_copy(
        update={"experiment": EXPERIMENT})}), mlflow_uri)  # fmt: skip
    expert, suboptimal = cfg.inference_condition, cfg.suboptimal_condition
    ledger = Ledger(out)
    settings = {"config": cfg.dump(), "base_model": base_model, "steps": steps,
                "suite": str(suite_dir.resolve()) if suite_dir else "facts" if facts else "synthetic"}
    ablation_id = ledger.open(settings, time.strftime("%Y%m%d-%H%M%S"))
    started = time.monotonic()
    base = None
    with ray_session(cfg):
        base_models: dict[int, Path] = {}
        if base_model:
            pretrained = Path(local_base_model(base_model, cfg))
            base_models = dict.fromkeys(seeds, pretrained)
            base = ledger.base()
            if base is None:
                log(f"[ablation] base model {pretrained}: scored before fine-tuning")
                base = base_reference(pretrained, suite, cfg, out, retention)
                ledger.record_base(base)
        else:
            for seed in seeds:
                log(f"[ablation] base model for seed {seed}")
                base_models[seed] = build_default_model(out / "base" / f"seed-{seed}", data_config(VARIANTS[0], cfg),
                                                        [train_file], seed=seed)  # fmt: skip
        data: dict[str, tuple[Path, dict[str, Any]]] = {}
        for variant in chosen:
            key = variant.data_key()
            if key not in data:
                folder = out / "data" / key
                if (folder / STATS_FILE).is_file():  # built by an earlier command of this ablation (same settings)
                    log(f"[ablation] data {key}: built before, in {folder}")
                    stats = DataStats.read(folder).to_json()
                else:
                    log(f"[ablation] data {key}")
                    stats = build_dataset([str(train_file)], str(base_models[seeds[0]]), folder,
                                          data_config(variant, cfg))  # fmt: skip
                data[key] = (folder, stats)
        budget = steps or recipe_steps(data[chosen[0].data_key()][1], cfg)
        tags = {TAG + "id": ablation_id, TAG + "steps": str(budget)}

        def one(seed: int, variant: Variant) -> RunResult:
            finished = ledger.finished(variant.slug(), seed)
            if finished is not None:
                log(f"[ablation] {variant.name} seed {seed}: finished before, its result kept")
                return finished
            folder, stats = data[variant.data_key()]
            run_cfg = run_config(variant, cfg, seed, budget, steps_per_epoch(stats, cfg), out)
            log(f"[ablation] {variant.name} seed {seed}: {budget} steps")
            result = run_one(variant, seed, run_cfg, folder, base_models[seed], suite, out, tracking_uri, tags,
                             retention)  # fmt: skip
            kept = "" if result.retention is None else f", retention {result.retention:.3f}"
            log(f"[ablation] {variant.name} seed {seed}: accuracy {result.accuracy_expert:.3f} under {expert}, "
                f"{result.accuracy_suboptimal:.3f} under {suboptimal}{kept}, silhouette {result.silhouette}, "
                f"trained in {result.train_s:.0f} s")
            ledger.record(variant.slug(), result)
            return result

        # Runs are independent: `parallel` of them at once, each training on its own Ray Train worker(s).
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            results = list(pool.map(lambda job: one(*job), [(seed, variant) for seed in seeds for variant in chosen]))
    rows = summarize(results, names)
    text = report_text(rows, expert, suboptimal, seeds, budget)
    if base is not None:
        text += "\n\n" + base_line(base_model or "", base, expert, suboptimal)
    ablation = Ablation(out, ablation_id, rows, results, budget, list(seeds), text, base=base)
    title = f"{budget} steps, seeds {', '.join(map(str, seeds))} (mean ± std)"
    ablation.figures["table"] = plot_table(rows, out / "ablation.png", expert, suboptimal, title)
    pair = projection_pair(names)
    if pair and suite["heldout"] is not None:
        model_dirs = {name: Path(next(r.model_dir for r in results if r.variant == name and r.seed == seeds[0]))
                      for name in pair}  # fmt: skip
        ablation.figures["projection"] = plot_projections(model_dirs, suite["heldout"], out / "projection.png")
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results_json(ablation), indent=2))
    params = {"steps": str(budget), "seeds": ",".join(map(str, seeds)), "variants": ",".join(names),
              "suite": str(train_file.parent), "replay": replay, "wall_s": f"{time.monotonic() - started:.0f}"}
    if retention:
        params |= {"retention_limit": str(cfg.eval.retention_limit or "all"), "open_limit": str(cfg.eval.open_limit)}
    ablation.summary_run_id = log_summary(ablation, cfg, tracking_uri, params)
    return ablation


# ---------------------------------------------------------------------------------------------------------------------
# Command

HELP = f"""\
variants (--variants; default: all six for the tiny model, {' '.join(REAL_MODEL_VARIANTS)} from --base-model):
  crlft            class condition in the prompt + reward-weighted loss (C-RLFT)
  conditioned      condition only, every reward 1
  weighted         reward weights only, no condition
  sft              plain SFT on the whole mixture
  expert_only      SFT on the expert (GPT4) conversations only
  suboptimal_only  SFT on the sub-optimal (GPT3) conversations only
  NAME+replay      NAME trained with replay: the base model's own answers to general prompts mixed into the data

replay (--replay, real base models only): `both` (the default there) trains each variant without replay (row
`crlft`, data.replay.enabled false) and with it (row `crlft+replay`, true); `on` or `off` one of the two. The tiny
model is not pretrained: no replay, and its table is unchanged.

retention (real base models): a run's general accuracy on the shipped general check (398 prompts of facts,
arithmetic, word knowledge and instructions) divided by its base model's, each asked as it is served: 1.0 = kept
everything the base answered right. agreement: ROUGE-L of its open answers against the base's. The base is measured
once and cached in <state_dir>/retention.

cost: a SmolLM2-135M run (80 LoRA steps) trains in about 3 minutes on 2 idle cores (2.5 without replay, 3 with),
its evaluation with retention takes 2 more; `crlft ablation --base-model smollm2` (3 variants x replay on/off x 3
seeds = 18 runs, one at a time) took 82 minutes on 2 idle cores, base model and data included (busy cores: 2-3x).
The tiny model's whole ablation (6 variants x 3 seeds) is about 17 minutes on 2 idle cores.

stopped and started again: give the same command the same --out and it goes on where it stopped (finished runs
are kept in <out>/runs, the base model's figures and the data too; a run stopped halfway starts again). More
--seeds or --variants on the same --out train only what is new; other settings there are refused.
"""


def default_parallel(cfg: Config) -> int:
    """As many runs at once as the machine has cores for their training workers."""
    return max(1, int((os.cpu_count() or 1) // (cfg.train.workers * cfg.train.cpus_per_worker)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = HELP
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), metavar="N",
                        help="seeds (initial weights and data order); mean and spread are over them")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="optimiser steps per run (default: the recipe's epochs over the whole mixture)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANT_CHOICES), metavar="NAME",
                        help="variants to run (below; default: all for the tiny model, "
                        f"{' '.join(REAL_MODEL_VARIANTS)} from --base-model); NAME+replay: with replay")
    parser.add_argument("--replay", choices=list(REPLAY_CHOICES),
                        help="each variant without replay (off), with it (on) or both (default: both with "
                        "--base-model, off for the tiny model)")
    suite = parser.add_mutually_exclusive_group()
    suite.add_argument("--suite", metavar="DIR", help="a suite folder (train/eval.jsonl and heldout.jsonl for the "
                       "silhouette, as `crlft synth` writes it); default: the synthetic suite with seed 0, written "
                       "under --out")  # fmt: skip
    suite.add_argument("--facts", action="store_true", help="train on crlft/synth/facts.py's mixed-quality set of "
                       "invented facts (sentence answers, scored by whole words; no silhouette) instead of the "
                       "synthetic suite")
    parser.add_argument("--parallel", type=int, metavar="N",
                        help="runs trained at once (default: CPUs / CPUs per training worker, at least 1)")
    parser.add_argument("--out", metavar="DIR", help="where everything goes (default: <state_dir>/ablation/<time>)")
    parser.add_argument("--mlflow-uri", metavar="URI", help="MLflow tracking URI (default: config, env, local SQLite)")
    parser.add_argument("--base-model", metavar="SOURCE",
                        help="start every run from a pretrained chat model: `smollm2` (bundled), a .gguf file, a "
                        "Hugging Face folder or hub id (recipe lora_synth.yaml: LoRA); default: the tiny model, "
                        "built per seed")
    config_flag(parser, "eval.retention_limit", "--retention-limit",
                help="with --base-model: only N prompts of the general check, spread over its kinds (None: all)")
    config_flag(parser, "eval.open_limit", "--open-limit", help="with --base-model: open prompts for agreement with "
                "the base model's answers, as crlft eval; 0 skips agreement")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.config is None:
        args.config = str(REAL_MODEL_SYNTH_RECIPE if args.base_model else SYNTH_RECIPE)
    cfg = config_from_args(args)
    out = Path(args.out) if args.out else Path(cfg.state_dir) / "ablation" / time.strftime("%Y%m%d-%H%M%S")
    ablation = run_ablation(cfg, out, seeds=args.seeds, steps=args.steps, variants=args.variants,
                            suite_dir=Path(args.suite) if args.suite else None, mlflow_uri=args.mlflow_uri,
                            parallel=args.parallel or default_parallel(cfg), base_model=args.base_model,
                            replay=args.replay, facts=args.facts)  # fmt: skip
    print(ablation.text)
    print(f"figures: {', '.join(str(p) for p in ablation.figures.values())}")
    print(f"results: {out / 'results.json'}; MLflow summary run {ablation.summary_run_id} (experiment {EXPERIMENT})")
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_entrypoint("jobs.ablation"))
