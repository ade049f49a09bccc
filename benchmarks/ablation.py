"""The OpenChat paper's ablation at laptop scale: `crlft ablation` / `python -m benchmarks.ablation`.

    crlft ablation [--seeds 0 1 2] [--steps N] [--variants crlft sft ...] [--suite DIR] [--out DIR] [--mlflow-uri URI]
                   [--base-model smollm2|DIR|FILE.gguf]

On the synthetic mixed-quality suite (crlft/synth.py) the tiny default model is trained once per variant and seed,
every run with the same seed, number of optimiser steps and learning-rate schedule, and scored on the held-out split:

    variant           template          loss weights        data                     paper (Table 2)
    crlft             condition         GPT4 1.0, GPT3 0.1  all                      77.3
    conditioned       condition         all 1.0             all                      74.0
    weighted          no condition      GPT4 1.0, GPT3 0.1  all                      60.5
    sft               no condition      all 1.0             all                      52.7
    expert_only       no condition      all 1.0             GPT4 conversations only  64.5
    suboptimal_only   no condition      all 1.0             GPT3 conversations only  42.8

Reported per variant (mean and spread over the seeds): exact-match accuracy on the held-out questions under the
expert condition and under the sub-optimal one (the same prompt for variants without a condition), the silhouette
score of expert vs sub-optimal held-out conversations in the model's last hidden states, and the training time.
A difference counts as a win only when it is larger than the two spreads added (spread = standard deviation over the
seeds); the claims the paper makes are checked with that rule and printed under the table.

Outputs (under --out): table.md, results.json, ablation.png (the table as bars with the spread as error bars),
projection.png (the held-out embeddings of crlft beside sft, the paper's figure), and per run its model and
evaluation. MLflow (experiment `crlft-ablation`): every training run and evaluation run, tagged with the ablation id,
variant and seed, and one summary run holding the table, the figures and every figure as a metric.

With `--base-model` the runs start from a real pretrained chat model instead (recipe lora_synth.yaml: LoRA, the LoRA
default learning rate), every seed from the same weights (the seed draws the adapters and the data order), and two
more figures answer the real-model questions: `general`, the share of a few general-knowledge questions
(GENERAL_QUESTIONS) answered right under the expert condition, i.e. whether fine-tuning kept what the model knew; and
the base model itself, before any fine-tuning, as the reference line under the table.

How the work is shared: one Ray session for everything; the data is tokenized and packed once per distinct template
and data filter (crlft and conditioned share theirs, and so do weighted and sft: the trainer rescales the weights
baked into the data to the mode's rewards); the base model is built once per seed (the same tokenizer for all, trained
on the suite, and the seed's initial weights), so within a seed every variant starts from the same weights.

Why the suite and the budget look the way they do
-------------------------------------------------
- The suite (crlft/synth.py explains it) was cut to 59 facts, 600 expert and 2400 sub-optimal conversations, 90% of
  GPT3's answers systematically wrong, after the first one (127 facts, 10x sub-optimal data, 75% wrong) needed ~14
  minutes of training for 0.68 expert accuracy. The mixture's majority answer is wrong for every question, so SFT
  learns GPT3's errors; only a model that tells the classes apart can answer right.
- The budget is the recipe's (8 epochs over the mixture: 968 steps of one 512-token bin, ~28 conversations) for every
  variant. Half of it is not enough: at 500 steps C-RLFT (seed 0) was at 0.50 under GPT4 and 0.38 under GPT3, the
  classes not yet apart; at 968 steps it is at 0.87 and 0.05.
- Every variant gets the same number of steps, so `expert_only` passes over its 600 conversations five times as often
  as the others over the mixture. On this suite GPT3's data teaches nothing GPT4's lacks, so `expert_only` is the
  reference that shows the suite is learnable (the issue's "the effect is the method's, not the suite's"), not a
  competitor: in the paper GPT-3.5's data adds breadth and expert-only SFT loses to C-RLFT. The claims compare crlft
  with the other modes trained on the same mixture.
- Runs are independent and trained `--parallel` at a time (default: cores / cores per training worker, 2 here), in
  one Ray session. A run's result does not depend on what runs beside it: crlft and sft for seed 0 gave the same
  accuracies and silhouettes one after the other and side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from crlft.cli import add_config_arguments, config_from_args, stage_entrypoint
from crlft.config import REAL_MODEL_SYNTH_RECIPE, SYNTH_RECIPE, Config, Mode
from crlft.errors import CrlftError

EXPERIMENT = "crlft-ablation"
TAG = "crlft.ablation."
DEFAULT_SEEDS = (0, 1, 2)

# General-knowledge questions a pretrained chat model answers before fine-tuning: question -> words one of which the
# answer must contain. Scored for real base models (--base-model) only: a tiny model from scratch knows none of them.
# (SmolLM2-135M-Instruct answered all five right in a first look and 4 of 5 in the measured run, RESULTS.md; it did
# not know whose play Romeo and Juliet is, nor the largest planet, so those are left out.)
GENERAL_QUESTIONS: dict[str, tuple[str, ...]] = {
    "What is the capital of France?": ("paris",),
    "What is the capital of Italy?": ("rome",),
    "What is the capital of Japan?": ("tokyo",),
    "What is the capital of Germany?": ("berlin",),
    "What colour is the sky on a clear day?": ("blue",),
}


@dataclass(frozen=True)
class Variant:
    name: str
    mode: Mode
    data: str  # "all", "expert" or "suboptimal": which classes the training data keeps
    paper: float  # the paper's Table 2 average (AlpacaEval, MT-bench, Vicuna-bench)
    meaning: str

    def data_key(self) -> str:
        """Variants with the same key train on the same tokenized data (only the reward scaling differs)."""
        template = "conditioned" if self.mode.uses_condition else "plain"
        return template if self.data == "all" else f"{template}-{self.data}"


VARIANTS: tuple[Variant, ...] = (
    Variant("crlft", Mode.crlft, "all", 77.3, "C-RLFT: class condition in the prompt + reward-weighted loss"),
    Variant("conditioned", Mode.conditioned, "all", 74.0, "condition only (every reward 1)"),
    Variant("weighted", Mode.weighted, "all", 60.5, "reward weights only (no condition in the prompt)"),
    Variant("sft", Mode.sft, "all", 52.7, "plain SFT on the whole mixture"),
    Variant("expert_only", Mode.sft, "expert", 64.5, "SFT on the expert (GPT4) conversations only"),
    Variant("suboptimal_only", Mode.sft, "suboptimal", 42.8, "SFT on the sub-optimal (GPT3) conversations only"),
)
VARIANTS_BY_NAME = {v.name: v for v in VARIANTS}
MODES = tuple(v.name for v in VARIANTS if v.data == "all")  # the four ways to train on the whole mixture


# ---------------------------------------------------------------------------------------------------------------------
# Configurations


def kept_classes(variant: Variant, cfg: Config) -> list[str] | None:
    if variant.data == "expert":
        return [cfg.inference_condition]
    if variant.data == "suboptimal":
        return [cfg.suboptimal_condition]
    return None


def data_config(variant: Variant, cfg: Config) -> Config:
    """The configuration the variant's data is built with: its template (condition or not) and its class filter.
    Rewards baked into the data are those of crlft (conditioned template) or sft (plain); training rescales them."""
    mode = Mode.crlft if variant.mode.uses_condition else Mode.sft
    return cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"mode": mode}),
        "data": cfg.data.model_copy(update={"only_classes": kept_classes(variant, cfg)}),
    })  # fmt: skip


def run_config(variant: Variant, cfg: Config, seed: int, steps: int, steps_per_epoch: int, out: Path) -> Config:
    """The variant's training configuration: its mode, the seed, exactly `steps` optimiser steps (as many epochs as
    that takes on its data), checkpoints and MLflow runs kept with the ablation."""
    train = cfg.train.model_copy(update={
        "mode": variant.mode, "seed": seed, "max_steps": steps, "epochs": math.ceil(steps / steps_per_epoch),
        "checkpoint_every": 0, "num_to_keep": 1, "storage_path": str(out / "ray_results"),
    })  # fmt: skip
    data = cfg.data.model_copy(update={"only_classes": kept_classes(variant, cfg)})
    registry = cfg.registry.model_copy(update={"experiment": EXPERIMENT})
    return cfg.model_copy(update={"train": train, "data": data, "registry": registry})


def steps_per_epoch(stats: dict[str, Any], cfg: Config) -> int:
    """Optimiser steps in one pass over the data, as jobs.train plans them."""
    from crlft.train_loop import plan_steps

    bins = int(stats["splits"]["train"]["bins"])
    return plan_steps(bins, cfg.train.workers, cfg.train.grad_accum, 1, None).steps_per_epoch


def recipe_steps(stats: dict[str, Any], cfg: Config) -> int:
    """The recipe's own budget: its epochs over the whole mixture (what `crlft demo` trains)."""
    return cfg.train.max_steps or cfg.train.epochs * steps_per_epoch(stats, cfg)


# ---------------------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class RunResult:
    variant: str
    seed: int
    accuracy_expert: float
    accuracy_suboptimal: float
    silhouette: float | None
    train_s: float
    steps: int
    model_dir: str
    train_run_id: str
    eval_run_id: str | None
    general: float | None = None  # share of GENERAL_QUESTIONS answered right (real base models only)


@dataclass(frozen=True)
class Stat:
    mean: float
    spread: float  # standard deviation over the seeds (0 for one seed)
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            return cls(math.nan, math.nan, 0)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), spread, len(values))

    def text(self, digits: int = 3) -> str:
        if self.n == 0:
            return "n/a"
        return f"{self.mean:.{digits}f} ± {self.spread:.{digits}f}" if self.n > 1 else f"{self.mean:.{digits}f}"


@dataclass(frozen=True)
class Row:
    variant: str
    accuracy_expert: Stat
    accuracy_suboptimal: Stat
    silhouette: Stat
    train_s: Stat
    paper: float
    general: Stat


def summarize(results: Sequence[RunResult], order: Sequence[str]) -> list[Row]:
    """One row per variant (in `order`), mean and spread over its seeds."""
    rows = []
    for name in order:
        runs = [r for r in results if r.variant == name]
        if not runs:
            continue
        rows.append(Row(
            name,
            Stat.of([r.accuracy_expert for r in runs]),
            Stat.of([r.accuracy_suboptimal for r in runs]),
            Stat.of([r.silhouette for r in runs if r.silhouette is not None]),
            Stat.of([r.train_s for r in runs]),
            VARIANTS_BY_NAME[name].paper,
            Stat.of([r.general for r in runs if r.general is not None]),
        ))  # fmt: skip
    return rows


def beats(a: Stat, b: Stat) -> bool:
    """A win: the difference of the means is larger than the two spreads added."""
    return a.n > 0 and b.n > 0 and a.mean - b.mean > a.spread + b.spread


def at_least(a: Stat, b: Stat) -> bool:
    """Not worse: b does not beat a."""
    return not beats(b, a)


def claims(rows: Sequence[Row]) -> list[tuple[str, bool]]:
    """The paper's claims that this table can check, each with whether it holds under the spread rule."""
    by_name = {row.variant: row for row in rows}
    crlft = by_name.get("crlft")
    if crlft is None:
        return []
    checks: list[tuple[str, bool]] = []
    if "sft" in by_name:
        sft = by_name["sft"]
        checks.append(("crlft (expert condition) beats sft", beats(crlft.accuracy_expert, sft.accuracy_expert)))
    # The modes train on the same mixture; the data variants are references (expert_only shows the suite is learnable).
    other_modes = [row for row in rows if row.variant in MODES and row.variant != "crlft"]
    if other_modes:
        worse = [row.variant for row in other_modes if not at_least(crlft.accuracy_expert, row.accuracy_expert)]
        checks.append((
            "crlft (expert condition) is at least as accurate as every other mode on the mixture"
            + (f" (beaten by {', '.join(worse)})" if worse else ""),
            not worse,
        ))  # fmt: skip
    checks.append(("crlft: the expert condition beats the sub-optimal one",
                   beats(crlft.accuracy_expert, crlft.accuracy_suboptimal)))  # fmt: skip
    if "sft" in by_name and crlft.silhouette.n and by_name["sft"].silhouette.n:
        checks.append(("crlft separates the classes more than sft (silhouette)",
                       beats(crlft.silhouette, by_name["sft"].silhouette)))  # fmt: skip
    for stronger, weaker in (("weighted", "sft"), ("conditioned", "sft"), ("expert_only", "suboptimal_only")):
        if stronger in by_name and weaker in by_name:
            checks.append((f"{stronger} beats {weaker}",
                           beats(by_name[stronger].accuracy_expert, by_name[weaker].accuracy_expert)))  # fmt: skip
    return checks


def markdown_table(rows: Sequence[Row], expert: str, suboptimal: str) -> str:
    """The table; a `general` column when the runs scored the general questions (real base models)."""
    general = any(row.general.n for row in rows)
    header = ["variant", f"accuracy under {expert}", f"accuracy under {suboptimal}", *(["general"] if general else []),
              "silhouette", "train s", "paper"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.variant, row.accuracy_expert.text(), row.accuracy_suboptimal.text(),
                 *([row.general.text()] if general else []), row.silhouette.text(), row.train_s.text(0),
                 f"{row.paper:.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_text(rows: Sequence[Row], expert: str, suboptimal: str, seeds: Sequence[int], steps: int) -> str:
    checks = claims(rows)
    lines = [markdown_table(rows, expert, suboptimal), "",
             f"mean ± standard deviation over seeds {', '.join(map(str, seeds))}; {steps} optimiser steps per run; "
             "a win needs a difference larger than the two spreads added"]  # fmt: skip
    lines += [f"- [{'x' if ok else ' '}] {text}" for text, ok in checks]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Figures


def plot_table(rows: Sequence[Row], out_png: Path, expert: str, suboptimal: str, title: str) -> Path:
    """Grouped bars: accuracy under each condition and the silhouette, per variant, the spread as error bars."""
    import numpy as np
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.8))
    accuracy_axes, silhouette_axes = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    x = np.arange(len(rows))
    names = [row.variant for row in rows]
    width = 0.38
    for offset, label, stats in (
        (-width / 2, f"under {expert} (expert)", [row.accuracy_expert for row in rows]),
        (width / 2, f"under {suboptimal} (sub-optimal)", [row.accuracy_suboptimal for row in rows]),
    ):
        accuracy_axes.bar(x + offset, [s.mean for s in stats], width, yerr=[s.spread for s in stats], capsize=3,
                          label=label)  # fmt: skip
    accuracy_axes.set_xticks(x, names, rotation=20)
    accuracy_axes.set_ylim(0, 1)
    accuracy_axes.set_ylabel("exact-match accuracy (held-out)")
    accuracy_axes.legend(loc="upper right", fontsize=8)
    accuracy_axes.set_title(title, fontsize=9)
    silhouettes = [row.silhouette for row in rows]
    silhouette_axes.bar(x, [s.mean if s.n else 0.0 for s in silhouettes],
                        yerr=[s.spread if s.n else 0.0 for s in silhouettes], capsize=3, color="tab:green")
    silhouette_axes.set_xticks(x, names, rotation=20)
    silhouette_axes.set_ylabel("silhouette, expert vs sub-optimal")
    silhouette_axes.axhline(0, color="black", linewidth=0.5)
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=110)
    return out_png


def plot_projections(model_dirs: dict[str, Path], heldout: Path, out_png: Path, max_per_class: int = 200) -> Path:
    """The held-out conversations in each model's last hidden states, projected to 2-D, side by side (the paper's
    figure: the classes form separate clusters under C-RLFT and mix under SFT)."""
    from matplotlib.figure import Figure

    from crlft import evaluate as ev
    from crlft.export import load_exported

    figure = Figure(figsize=(5.5 * len(model_dirs), 5))
    axes = figure.subplots(1, len(model_dirs), squeeze=False)[0]
    for ax, (name, model_dir) in zip(axes, model_dirs.items(), strict=True):
        exported = load_exported(model_dir)
        sample = ev.balanced_sample(ev.load_heldout(heldout, exported.meta), max_per_class)
        labels = [c.condition for c in sample]
        embeddings = ev.embed_conversations(exported, sample)
        score = ev.silhouette(embeddings, labels)
        points, method = ev.projection_for_plot(embeddings)
        for condition in sorted(set(labels)):
            mask = [label == condition for label in labels]
            ax.scatter(points[mask, 0], points[mask, 1], s=12, alpha=0.7, label=condition)
        shown = "undefined" if score is None else f"{score:.2f}"
        ax.set_title(f"{name}: {method} of last hidden states, silhouette {shown}", fontsize=9)
        ax.legend(title="condition")
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=110)
    return out_png


# ---------------------------------------------------------------------------------------------------------------------
# The runs


@dataclass
class Ablation:
    """Everything one ablation run produced."""

    out: Path
    ablation_id: str
    rows: list[Row]
    results: list[RunResult]
    steps: int
    seeds: list[int]
    text: str
    figures: dict[str, Path] = field(default_factory=dict)
    summary_run_id: str | None = None
    base: dict[str, float] | None = None  # the pretrained model before fine-tuning (--base-model)


def suite_files(folder: Path) -> dict[str, Path]:
    files = {name: folder / f"{name}.jsonl" for name in ("train", "heldout", "eval")}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise CrlftError(f"--suite {folder}: missing {', '.join(missing)} (write a suite with `crlft synth --out DIR`)")
    return files


def _tag_run(client: Any, run_id: str | None, tags: dict[str, str]) -> None:
    if run_id:
        for key, value in tags.items():
            client.set_tag(run_id, key, value)


def general_accuracy(model_dir: str | Path, condition: str) -> float:
    """Share of GENERAL_QUESTIONS whose greedy answer under `condition` contains one of its expected words."""
    from jobs.demo import answer_locally

    answers = answer_locally(model_dir, list(GENERAL_QUESTIONS), condition)
    right = [any(word in answer.lower() for word in words) for answer, words in zip(answers, GENERAL_QUESTIONS.values(),
                                                                                    strict=True)]
    return sum(right) / len(right)


def base_reference(base_model: Path, suite: dict[str, Path], cfg: Config, out: Path) -> dict[str, float]:
    """The pretrained model before any fine-tuning, scored like the runs (no MLflow run)."""
    from jobs.evaluate import evaluate_model

    metrics = evaluate_model(base_model, suite["eval"], cfg, log_mlflow=False, out_dir=out / "eval" / "base")["metrics"]
    return {"accuracy_expert": float(metrics["accuracy_expert"]),
            "accuracy_suboptimal": float(metrics.get("accuracy_suboptimal", metrics["accuracy_expert"])),
            "general": general_accuracy(base_model, cfg.inference_condition)}  # fmt: skip


def run_one(variant: Variant, seed: int, cfg: Config, data_dir: Path, base_model: Path, suite: dict[str, Path],
            out: Path, tracking_uri: str, tags: dict[str, str], score_general: bool = False) -> RunResult:
    """Train one variant with one seed into out/models, evaluate it on the held-out split into out/eval (and on the
    general questions when `score_general`), tag both MLflow runs."""
    from mlflow.tracking import MlflowClient

    from jobs.evaluate import evaluate_model
    from jobs.train import train

    name = f"{variant.name}-seed{seed}"  # also names the Ray Train run folder
    started = time.monotonic()
    trained = train(data_dir, str(base_model), out / "models" / name, cfg, mlflow_uri=tracking_uri)
    train_s = time.monotonic() - started
    report = evaluate_model(trained.out_dir, suite["eval"], cfg, heldout=suite["heldout"], log_mlflow=True,
                            tracking_uri=tracking_uri, out_dir=out / "eval" / name)  # fmt: skip
    metrics = report["metrics"]
    client = MlflowClient(tracking_uri)
    run_tags = {**tags, TAG + "variant": variant.name, TAG + "seed": str(seed)}
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
        general=general_accuracy(trained.out_dir, cfg.inference_condition) if score_general else None,
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
        for name in ("accuracy_expert", "accuracy_suboptimal", "silhouette", "train_s"):
            stat: Stat = getattr(row, name)
            if stat.n:
                metrics += [Metric(f"{row.variant}/{name}", stat.mean, now, 0),
                            Metric(f"{row.variant}/{name}_spread", stat.spread, now, 0)]  # fmt: skip
    client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    client.log_text(run_id, ablation.text, "table.md")
    client.log_dict(run_id, _results_json(ablation), "results.json")
    for path in ablation.figures.values():
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id


def _results_json(ablation: Ablation) -> dict[str, Any]:
    return {
        "ablation_id": ablation.ablation_id,
        "steps": ablation.steps,
        "seeds": ablation.seeds,
        "rows": [asdict(row) for row in ablation.rows],
        "runs": [asdict(result) for result in ablation.results],
        "claims": [{"claim": text, "holds": ok} for text, ok in claims(ablation.rows)],
        "base": ablation.base,
    }


def run_ablation(cfg: Config, out: Path, *, seeds: Sequence[int] = DEFAULT_SEEDS, steps: int | None = None,
                 variants: Sequence[str] | None = None, suite_dir: Path | None = None,
                 mlflow_uri: str | None = None, parallel: int = 1, base_model: str | None = None,
                 log: Callable[[str], None] = print) -> Ablation:
    """Build the data, train and evaluate every variant for every seed in one Ray session, summarize, plot, log.
    With `base_model` (a pretrained model: folder, GGUF file or bundled name) every run starts from it."""
    from crlft.commands.init_model import build_default_model, local_base_model
    from crlft.synth import write_suite
    from crlft.tracking import set_offline_defaults, setup_mlflow
    from jobs.build_dataset import build_dataset
    from jobs.session import ray_session

    set_offline_defaults()
    names = list(variants or [v.name for v in VARIANTS])
    unknown = [n for n in names if n not in VARIANTS_BY_NAME]
    if unknown:
        raise CrlftError(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS_BY_NAME)}")
    chosen = [VARIANTS_BY_NAME[n] for n in names]
    if not seeds:
        raise CrlftError("give at least one seed")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ablation_id = time.strftime("%Y%m%d-%H%M%S")
    suite = suite_files(suite_dir) if suite_dir else write_suite(out / "suite", seed=0)
    tracking_uri = setup_mlflow(cfg.model_copy(update={"registry": cfg.registry.model_copy(
        update={"experiment": EXPERIMENT})}), mlflow_uri)  # fmt: skip
    expert, suboptimal = cfg.inference_condition, cfg.suboptimal_condition
    started = time.monotonic()
    base = None
    with ray_session(cfg):
        base_models: dict[int, Path] = {}
        if base_model:
            pretrained = Path(local_base_model(base_model, cfg))
            base_models = dict.fromkeys(seeds, pretrained)
            log(f"[ablation] base model {pretrained}: scored before fine-tuning")
            base = base_reference(pretrained, suite, cfg, out)
        else:
            for seed in seeds:
                log(f"[ablation] base model for seed {seed}")
                base_models[seed] = build_default_model(out / "base" / f"seed-{seed}", data_config(VARIANTS[0], cfg),
                                                        [suite["train"]], seed=seed)  # fmt: skip
        data: dict[str, tuple[Path, dict[str, Any]]] = {}
        for variant in chosen:
            key = variant.data_key()
            if key not in data:
                log(f"[ablation] data {key}")
                folder = out / "data" / key
                stats = build_dataset([str(suite["train"])], str(base_models[seeds[0]]), folder,
                                      data_config(variant, cfg))  # fmt: skip
                data[key] = (folder, stats)
        budget = steps or recipe_steps(data[chosen[0].data_key()][1], cfg)
        tags = {TAG + "id": ablation_id, TAG + "steps": str(budget)}

        def one(seed: int, variant: Variant) -> RunResult:
            folder, stats = data[variant.data_key()]
            run_cfg = run_config(variant, cfg, seed, budget, steps_per_epoch(stats, cfg), out)
            log(f"[ablation] {variant.name} seed {seed}: {budget} steps")
            result = run_one(variant, seed, run_cfg, folder, base_models[seed], suite, out, tracking_uri, tags,
                             score_general=base is not None)
            log(f"[ablation] {variant.name} seed {seed}: accuracy {result.accuracy_expert:.3f} under {expert}, "
                f"{result.accuracy_suboptimal:.3f} under {suboptimal}, silhouette {result.silhouette}, "
                f"trained in {result.train_s:.0f} s")
            return result

        # Runs are independent: `parallel` of them at once, each training on its own Ray Train worker(s).
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            results = list(pool.map(lambda job: one(*job), [(seed, variant) for seed in seeds for variant in chosen]))
    rows = summarize(results, names)
    text = report_text(rows, expert, suboptimal, seeds, budget)
    if base is not None:
        text += (f"\n\nbase model {base_model} before fine-tuning: accuracy {base['accuracy_expert']:.3f} under "
                 f"{expert}, {base['accuracy_suboptimal']:.3f} under {suboptimal}, general {base['general']:.3f}")
    ablation = Ablation(out, ablation_id, rows, results, budget, list(seeds), text, base=base)
    title = f"{budget} steps, seeds {', '.join(map(str, seeds))} (mean ± std)"
    ablation.figures["table"] = plot_table(rows, out / "ablation.png", expert, suboptimal, title)
    pair = {name: Path(next(r.model_dir for r in results if r.variant == name and r.seed == seeds[0]))
            for name in ("crlft", "sft") if name in names}
    if pair:
        ablation.figures["projection"] = plot_projections(pair, suite["heldout"], out / "projection.png")
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(_results_json(ablation), indent=2))
    params = {"steps": str(budget), "seeds": ",".join(map(str, seeds)), "variants": ",".join(names),
              "suite": str(suite["train"].parent), "wall_s": f"{time.monotonic() - started:.0f}"}  # fmt: skip
    ablation.summary_run_id = log_summary(ablation, cfg, tracking_uri, params)
    return ablation


# ---------------------------------------------------------------------------------------------------------------------
# Command


def default_parallel(cfg: Config) -> int:
    """As many runs at once as the machine has cores for their training workers."""
    return max(1, int((os.cpu_count() or 1) // (cfg.train.workers * cfg.train.cpus_per_worker)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), metavar="N",
                        help="seeds (initial weights and data order); mean and spread are over them")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="optimiser steps per run (default: the recipe's epochs over the whole mixture)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS_BY_NAME), metavar="NAME",
                        help=f"variants to run (default: all: {', '.join(VARIANTS_BY_NAME)})")
    parser.add_argument("--suite", metavar="DIR", help="a suite folder (train/heldout/eval.jsonl, as `crlft synth` "
                        "writes it); default: the synthetic suite with seed 0, written under --out")
    parser.add_argument("--parallel", type=int, metavar="N",
                        help="runs trained at once (default: CPUs / CPUs per training worker, at least 1)")
    parser.add_argument("--out", metavar="DIR", help="where everything goes (default: <state_dir>/ablation/<time>)")
    parser.add_argument("--mlflow-uri", metavar="URI", help="MLflow tracking URI (default: config, env, local SQLite)")
    parser.add_argument("--base-model", metavar="SOURCE",
                        help="start every run from a pretrained chat model: `smollm2` (bundled), a .gguf file, a "
                        "Hugging Face folder or hub id (recipe lora_synth.yaml: LoRA); default: the tiny model, "
                        "built per seed")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.config is None:
        args.config = str(REAL_MODEL_SYNTH_RECIPE if args.base_model else SYNTH_RECIPE)
    cfg = config_from_args(args)
    out = Path(args.out) if args.out else Path(cfg.state_dir) / "ablation" / time.strftime("%Y%m%d-%H%M%S")
    ablation = run_ablation(cfg, out, seeds=args.seeds, steps=args.steps, variants=args.variants,
                            suite_dir=Path(args.suite) if args.suite else None, mlflow_uri=args.mlflow_uri,
                            parallel=args.parallel or default_parallel(cfg), base_model=args.base_model)
    print(ablation.text)
    print(f"figures: {', '.join(str(p) for p in ablation.figures.values())}")
    print(f"results: {out / 'results.json'}; MLflow summary run {ablation.summary_run_id} (experiment {EXPERIMENT})")
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_entrypoint("benchmarks.ablation"))
