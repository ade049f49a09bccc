"""The OpenChat paper's ablation at laptop scale: `crlft ablation` / `python -m jobs.ablation`.

    crlft ablation [--seeds 0 1 2] [--steps N] [--variants crlft sft ...] [--suite DIR | --facts] [--out DIR]
                   [--mlflow-uri URI] [--base-model smollm2|DIR|FILE.gguf [--replay both|on|off]
                   [--retention-limit N] [--open-limit N]]

On the synthetic mixed-quality suite (crlft/synth/suite.py) the tiny default model is trained once per variant and seed,
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

A real base model: does fine-tuning keep what it knew, and does replay help?
----------------------------------------------------------------------------
With `--base-model` the runs start from a real pretrained chat model instead (recipe lora_synth.yaml: LoRA, the LoRA
default learning rate), every seed from the same weights (the seed draws the adapters and the data order), by default
the variants crlft, conditioned and sft (REAL_MODEL_VARIANTS), and the ablation answers issue #25's question:

- **Replay** (`--replay`, default `both` for a real base model): every variant is trained without replay
  (`data.replay.enabled: false`, row `crlft`) and with it (`true`, row `crlft+replay`: the base model's own greedy
  answers to general prompts mixed into the training data, crlft/data/replay.py). `on` or `off` trains one of the two.
  The data is built once per template and replay (4 builds for the default variants); the base model answers the
  replay prompts once per template (the answers are cached in the state folder by fingerprint, which names the
  template), and every run trains the same number of steps, so a replay run sees fewer synthetic conversations.
  A name with the suffix in `--variants` (`sft+replay`) is trained as named, whatever `--replay` says.
- **Retention** (crlft/eval/retention.py): every run's general accuracy on the shipped general check
  (crlft/assets/general/check.jsonl: 398 prompts of facts, arithmetic, word knowledge and instructions, scored right or
  wrong) divided by the base model's, each asked as it is served (the base through its own chat template); 1.0 means
  the fine-tune kept every right answer. Beside it `agreement`, the ROUGE-L of the run's answers to open prompts
  against the base's (drift; what replay should buy). The base is measured once (before the first run, cached in
  `<state_dir>/retention/`, shared with `crlft eval`), and its general accuracy is printed under the table with its
  accuracy on the suite before any fine-tuning.
- The claims add, per variant trained both ways, whether replay retains more and whether it keeps the accuracy.
- The tiny default model is not pretrained: it knows nothing to keep, so there is no replay (`--replay off`, the
  default; on is an error) and no retention column; its table is the one in benchmarks/RESULTS.md.

`--facts` trains on crlft/synth/facts.py's mixed-quality set of invented facts (answers in sentences, scored by whole
words; no held-out conversations, so no silhouette) instead of the synthetic suite: new knowledge that no base model
has, the case where forgetting matters.

Cost: a SmolLM2-135M run (80 LoRA steps) trains in 5-20 minutes on 2 cores, about 10 typically (4 s a step on idle
cores, 11-15 s on busy ones: RESULTS.md); its evaluation with retention (398 check prompts, 40 open ones) is
estimated at a few minutes more, not yet measured. The defaults (3 variants x replay on/off x 3 seeds) are 18 runs
one at a time: about 4 hours, up to 7 on busy cores, plus the base model's answers and two replay generations once
(10-20 minutes). `--seeds 0`, `--replay on` or `--retention-limit 100 --open-limit 0` cut it.

How the work is shared: one Ray session for everything; the data is tokenized and packed once per distinct template,
data filter and replay (crlft and conditioned share theirs, and so do weighted and sft: the trainer rescales the
weights baked into the data to the mode's rewards); the base model is built once per seed (the same tokenizer for
all, trained on the suite, and the seed's initial weights), so within a seed every variant starts from the same
weights.

Why the suite and the budget look the way they do
-------------------------------------------------
- The suite (crlft/synth/suite.py explains it) was cut to 59 facts, 600 expert and 2400 sub-optimal conversations,
  90% of GPT3's answers systematically wrong, after the first one (127 facts, 10x sub-optimal data, 75% wrong) needed
  ~14 minutes of training for 0.68 expert accuracy. The mixture's majority answer is wrong for every question, so SFT
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from crlft.cli import add_config_arguments, config_from_args, stage_entrypoint
from crlft.config import REAL_MODEL_SYNTH_RECIPE, SYNTH_RECIPE, Config, DataConfig, Mode
from crlft.errors import CrlftError
from jobs.evaluate import OPEN_LIMIT

EXPERIMENT = "crlft-ablation"
TAG = "crlft.ablation."
DEFAULT_SEEDS = (0, 1, 2)
REPLAY_SUFFIX = "+replay"  # a variant trained with replay: `crlft+replay`
REPLAY_CHOICES = ("both", "on", "off")
EVAL_BATCH_SIZE = 16  # crlft eval's: the base's retention answers are cached under the same decoder
FACTS_MAX_NEW_TOKENS = 32  # facts are answered in sentences ("The capital of Brirkeia is Lonmem."), 16 can cut them


@dataclass(frozen=True)
class Variant:
    name: str
    mode: Mode
    data: str  # "all", "expert" or "suboptimal": which classes the training data keeps
    paper: float  # the paper's Table 2 average (AlpacaEval, MT-bench, Vicuna-bench)
    meaning: str
    replay: bool = False  # the base model's own answers to general prompts mixed into the data (data.replay.enabled)

    def data_key(self) -> str:
        """Variants with the same key train on the same tokenized data (only the reward scaling differs)."""
        template = "conditioned" if self.mode.uses_condition else "plain"
        key = template if self.data == "all" else f"{template}-{self.data}"
        return f"{key}-replay" if self.replay else key

    def with_replay(self) -> Variant:
        return self if self.replay else replace(self, name=self.name + REPLAY_SUFFIX, replay=True,
                                                meaning=self.meaning + ", with replay")  # fmt: skip

    def slug(self) -> str:
        """The name as folders and MLflow metric keys take it (no `+`)."""
        return self.name.replace(REPLAY_SUFFIX, "_replay")


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
REAL_MODEL_VARIANTS = ("crlft", "conditioned", "sft")  # the default from a real base model (--base-model)
VARIANT_CHOICES = (*VARIANTS_BY_NAME, *(name + REPLAY_SUFFIX for name in VARIANTS_BY_NAME))


def variant_named(name: str) -> Variant:
    """The variant a name stands for: `crlft`, or `crlft+replay` (crlft with replay)."""
    plain = name.removesuffix(REPLAY_SUFFIX)
    if plain not in VARIANTS_BY_NAME:
        raise CrlftError(f"unknown variant {name}: choose from {', '.join(VARIANT_CHOICES)}")
    variant = VARIANTS_BY_NAME[plain]
    return variant.with_replay() if name != plain else variant


def choose_variants(names: Sequence[str], replay: str) -> list[Variant]:
    """The variants to train, in order: each plain name without replay (`off`), with it (`on`) or both, one after the
    other (`both`); a name with the suffix as named."""
    if replay not in REPLAY_CHOICES:
        raise CrlftError(f"--replay {replay}: choose from {', '.join(REPLAY_CHOICES)}")
    chosen: list[Variant] = []
    for name in names:
        variant = variant_named(name)
        if variant.replay:
            candidates = [variant]
        else:
            candidates = [variant] * (replay != "on") + [variant.with_replay()] * (replay != "off")
        chosen += [v for v in candidates if v not in chosen]
    return chosen


# ---------------------------------------------------------------------------------------------------------------------
# Configurations


def kept_classes(variant: Variant, cfg: Config) -> list[str] | None:
    if variant.data == "expert":
        return [cfg.inference_condition]
    if variant.data == "suboptimal":
        return [cfg.suboptimal_condition]
    return None


def variant_data(variant: Variant, cfg: Config) -> DataConfig:
    """cfg.data for the variant: its class filter, and replay on or off as the variant says (never auto)."""
    replay = cfg.data.replay.model_copy(update={"enabled": variant.replay})
    return cfg.data.model_copy(update={"only_classes": kept_classes(variant, cfg), "replay": replay})


def data_config(variant: Variant, cfg: Config) -> Config:
    """The configuration the variant's data is built with: its template (condition or not), its class filter and its
    replay. Rewards baked into the data are those of crlft (conditioned template) or sft (plain); training rescales
    them."""
    mode = Mode.crlft if variant.mode.uses_condition else Mode.sft
    return cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"mode": mode}),
        "data": variant_data(variant, cfg),
    })  # fmt: skip


def run_config(variant: Variant, cfg: Config, seed: int, steps: int, steps_per_epoch: int, out: Path) -> Config:
    """The variant's training configuration: its mode, the seed, exactly `steps` optimiser steps (as many epochs as
    that takes on its data), checkpoints and MLflow runs kept with the ablation."""
    train = cfg.train.model_copy(update={
        "mode": variant.mode, "seed": seed, "max_steps": steps, "epochs": math.ceil(steps / steps_per_epoch),
        "checkpoint_every": 0, "num_to_keep": 1, "storage_path": str(out / "ray_results"),
    })  # fmt: skip
    data = variant_data(variant, cfg)
    registry = cfg.registry.model_copy(update={"experiment": EXPERIMENT})
    return cfg.model_copy(update={"train": train, "data": data, "registry": registry})


def steps_per_epoch(stats: dict[str, Any], cfg: Config) -> int:
    """Optimiser steps in one pass over the data, as jobs.train plans them."""
    from crlft.train.schedule import plan_steps

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
    retention: float | None = None  # general accuracy / the base model's (real base models only)
    agreement: float | None = None  # ROUGE-L of the open answers against the base model's (with --open-limit > 0)


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
    retention: Stat
    agreement: Stat


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
            variant_named(name).paper,
            Stat.of([r.retention for r in runs if r.retention is not None]),
            Stat.of([r.agreement for r in runs if r.agreement is not None]),
        ))  # fmt: skip
    return rows


def beats(a: Stat, b: Stat) -> bool:
    """A win: the difference of the means is larger than the two spreads added."""
    return a.n > 0 and b.n > 0 and a.mean - b.mean > a.spread + b.spread


def at_least(a: Stat, b: Stat) -> bool:
    """Not worse: b does not beat a."""
    return not beats(b, a)


def claims(rows: Sequence[Row]) -> list[tuple[str, bool]]:
    """The paper's claims that this table can check, each with whether it holds under the spread rule: for the
    variants without replay, again for those with it, then what replay changes for each variant trained both ways."""
    by_name = {row.variant: row for row in rows}
    return _method_claims(by_name, "") + _method_claims(by_name, REPLAY_SUFFIX) + _replay_claims(by_name)


def _method_claims(by_name: dict[str, Row], suffix: str) -> list[tuple[str, bool]]:
    crlft = by_name.get("crlft" + suffix)
    if crlft is None:
        return []
    checks: list[tuple[str, bool]] = []
    sft = by_name.get("sft" + suffix)
    if sft is not None:
        checks.append((f"{crlft.variant} (expert condition) beats {sft.variant}",
                       beats(crlft.accuracy_expert, sft.accuracy_expert)))  # fmt: skip
    # The modes train on the same mixture; the data variants are references (expert_only shows the suite is learnable).
    other_modes = [by_name[name + suffix] for name in MODES if name != "crlft" and name + suffix in by_name]
    if other_modes:
        worse = [row.variant for row in other_modes if not at_least(crlft.accuracy_expert, row.accuracy_expert)]
        checks.append((
            f"{crlft.variant} (expert condition) is at least as accurate as every other mode on the mixture"
            + (f" (beaten by {', '.join(worse)})" if worse else ""),
            not worse,
        ))  # fmt: skip
    checks.append((f"{crlft.variant}: the expert condition beats the sub-optimal one",
                   beats(crlft.accuracy_expert, crlft.accuracy_suboptimal)))  # fmt: skip
    if sft is not None and crlft.silhouette.n and sft.silhouette.n:
        checks.append((f"{crlft.variant} separates the classes more than {sft.variant} (silhouette)",
                       beats(crlft.silhouette, sft.silhouette)))  # fmt: skip
    for stronger, weaker in (("weighted", "sft"), ("conditioned", "sft"), ("expert_only", "suboptimal_only")):
        if stronger + suffix in by_name and weaker + suffix in by_name:
            checks.append((f"{stronger + suffix} beats {weaker + suffix}",
                           beats(by_name[stronger + suffix].accuracy_expert,
                                 by_name[weaker + suffix].accuracy_expert)))  # fmt: skip
    return checks


def _replay_claims(by_name: dict[str, Row]) -> list[tuple[str, bool]]:
    """Issue #25's question, per variant trained with and without replay: does replay keep more of what the base model
    knew (retention, where measured), and does it cost the fine-tune its accuracy?"""
    checks: list[tuple[str, bool]] = []
    for name, without in by_name.items():
        with_replay = by_name.get(name + REPLAY_SUFFIX)
        if name.endswith(REPLAY_SUFFIX) or with_replay is None:
            continue
        if with_replay.retention.n and without.retention.n:
            checks.append((f"{with_replay.variant} retains more than {name}",
                           beats(with_replay.retention, without.retention)))  # fmt: skip
        checks.append((f"{with_replay.variant} (expert condition) is at least as accurate as {name}",
                       at_least(with_replay.accuracy_expert, without.accuracy_expert)))  # fmt: skip
    return checks


def markdown_table(rows: Sequence[Row], expert: str, suboptimal: str) -> str:
    """The table; `retention` and `agreement` columns when the runs measured them (real base models)."""
    retention = any(row.retention.n for row in rows)
    agreement = any(row.agreement.n for row in rows)
    header = ["variant", f"accuracy under {expert}", f"accuracy under {suboptimal}",
              *(["retention"] if retention else []), *(["agreement"] if agreement else []),
              "silhouette", "train s", "paper"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.variant, row.accuracy_expert.text(), row.accuracy_suboptimal.text(),
                 *([row.retention.text()] if retention else []), *([row.agreement.text()] if agreement else []),
                 row.silhouette.text(), row.train_s.text(0), f"{row.paper:.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_text(rows: Sequence[Row], expert: str, suboptimal: str, seeds: Sequence[int], steps: int) -> str:
    checks = claims(rows)
    lines = [markdown_table(rows, expert, suboptimal), "",
             f"mean ± standard deviation over seeds {', '.join(map(str, seeds))}; {steps} optimiser steps per run; "
             "a win needs a difference larger than the two spreads added"]  # fmt: skip
    if any(row.retention.n for row in rows):
        lines.append("retention: general accuracy on the general check (crlft/assets/general/check.jsonl) divided by "
                     "the base model's, each asked as it is served; agreement: ROUGE-L of the open answers against "
                     "the base model's")  # fmt: skip
    lines += [f"- [{'x' if ok else ' '}] {text}" for text, ok in checks]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Figures


def plot_table(rows: Sequence[Row], out_png: Path, expert: str, suboptimal: str, title: str) -> Path:
    """Grouped bars: accuracy under each condition and the silhouette, per variant, the spread as error bars; and the
    retention (and agreement) beside them when the runs measured it (real base models)."""
    import numpy as np
    from matplotlib.figure import Figure

    retention = any(row.retention.n for row in rows)
    if retention:
        figure = Figure(figsize=(16, 5.2))
        accuracy_axes, silhouette_axes, retention_axes = figure.subplots(
            1, 3, gridspec_kw={"width_ratios": [2, 1, 1.2]})  # fmt: skip
    else:
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
    if retention:
        agreement = any(row.agreement.n for row in rows)
        bars = [("retention", [row.retention for row in rows], "tab:purple")]
        if agreement:
            bars.append(("agreement (ROUGE-L)", [row.agreement for row in rows], "tab:gray"))
        bar_width = 0.8 / len(bars)
        for i, (label, stats, color) in enumerate(bars):
            offset = (i - (len(bars) - 1) / 2) * bar_width
            retention_axes.bar(x + offset, [s.mean if s.n else 0.0 for s in stats], bar_width,
                               yerr=[s.spread if s.n else 0.0 for s in stats], capsize=3, color=color, label=label)
        retention_axes.axhline(1, color="black", linewidth=0.5, linestyle="--")
        retention_axes.set_ylim(0, max([1.3, *(s.mean + s.spread + 0.2 for _, stats, _ in bars for s in stats if s.n)]))
        retention_axes.set_ylabel("against the base model (1 = kept all)")
        retention_axes.legend(loc="upper right", ncol=2, fontsize=8)
        for axes in (silhouette_axes, retention_axes):  # more and longer names (`conditioned+replay`) in less width
            axes.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=110)
    return out_png


def plot_projections(model_dirs: dict[str, Path], heldout: Path, out_png: Path, max_per_class: int = 200) -> Path:
    """The held-out conversations in each model's last hidden states, projected to 2-D, side by side (the paper's
    figure: the classes form separate clusters under C-RLFT and mix under SFT)."""
    from matplotlib.figure import Figure

    from crlft.eval import representation as rep
    from crlft.export import load_exported

    figure = Figure(figsize=(5.5 * len(model_dirs), 5))
    axes = figure.subplots(1, len(model_dirs), squeeze=False)[0]
    for ax, (name, model_dir) in zip(axes, model_dirs.items(), strict=True):
        exported = load_exported(model_dir)
        sample = rep.balanced_sample(rep.load_heldout(heldout, exported.meta), max_per_class)
        labels = [c.condition for c in sample]
        embeddings = rep.embed_conversations(exported, sample)
        score = rep.silhouette(embeddings, labels)
        points, method = rep.projection_for_plot(embeddings)
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


def suite_files(folder: Path) -> dict[str, Path | None]:
    """train.jsonl and eval.jsonl of a suite folder, and heldout.jsonl where it has one (a facts set has none: no
    silhouette then)."""
    files = {name: folder / f"{name}.jsonl" for name in ("train", "eval")}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise CrlftError(f"--suite {folder}: missing {', '.join(missing)} (write a suite with `crlft synth --out DIR`)")
    heldout = folder / "heldout.jsonl"
    return {**files, "heldout": heldout if heldout.is_file() else None}


def write_facts_suite(folder: Path) -> dict[str, Path | None]:
    """crlft/synth/facts.py's set (seed 0, its defaults) written into `folder`: train.jsonl and eval.jsonl."""
    from crlft.synth.facts import write_facts

    return {**write_facts(folder, seed=0), "heldout": None}


def _tag_run(client: Any, run_id: str | None, tags: dict[str, str]) -> None:
    if run_id:
        for key, value in tags.items():
            client.set_tag(run_id, key, value)


@dataclass(frozen=True)
class Scoring:
    """How every run (and the base model) is evaluated."""

    retention: bool = False  # the general check against the base model (real base models)
    retention_limit: int | None = None  # prompts of the general check (None: all)
    open_limit: int = OPEN_LIMIT  # open prompts for agreement (0: none)
    max_new_tokens: int = 16  # answer length on the suite (crlft eval's default)


def base_reference(base_model: Path, suite: dict[str, Path | None], cfg: Config, out: Path,
                   scoring: Scoring) -> dict[str, float]:
    """The pretrained model before any fine-tuning, scored on the suite like the runs (no MLflow run), and its answers
    to the general check measured once for every run's retention (cached in <state_dir>/retention)."""
    from crlft.inference.decoding import engine_settings
    from jobs.evaluate import evaluate_model
    from jobs.retention import base_answers, plan_retention

    metrics = evaluate_model(base_model, suite["eval"], cfg, log_mlflow=False, out_dir=out / "eval" / "base",
                             retention=False, batch_size=EVAL_BATCH_SIZE,
                             max_new_tokens=scoring.max_new_tokens)["metrics"]  # fmt: skip
    reference = {"accuracy_expert": float(metrics["accuracy_expert"]),
                 "accuracy_suboptimal": float(metrics.get("accuracy_suboptimal", metrics["accuracy_expert"]))}
    if scoring.retention:
        plan = plan_retention(None, str(base_model), True, scoring.retention_limit, scoring.open_limit)
        assert plan is not None  # asked for: a base that is not found is an error
        answers, _ = base_answers(plan, cfg, engine_settings(cfg, EVAL_BATCH_SIZE), EVAL_BATCH_SIZE)
        reference["general_accuracy"] = answers.scores["general_accuracy"]
    return reference


def run_one(variant: Variant, seed: int, cfg: Config, data_dir: Path, base_model: Path,
            suite: dict[str, Path | None], out: Path, tracking_uri: str, tags: dict[str, str],
            scoring: Scoring | None = None) -> RunResult:
    """Train one variant with one seed into out/models, evaluate it on the held-out split into out/eval (and its
    retention against `base_model` when `scoring.retention`), tag both MLflow runs."""
    from mlflow.tracking import MlflowClient

    from jobs.evaluate import evaluate_model
    from jobs.train import train

    scoring = scoring or Scoring()
    name = f"{variant.slug()}-seed{seed}"  # also names the Ray Train run folder
    started = time.monotonic()
    trained = train(data_dir, str(base_model), out / "models" / name, cfg, mlflow_uri=tracking_uri)
    train_s = time.monotonic() - started
    report = evaluate_model(trained.out_dir, suite["eval"], cfg, heldout=suite["heldout"], log_mlflow=True,
                            tracking_uri=tracking_uri, out_dir=out / "eval" / name, batch_size=EVAL_BATCH_SIZE,
                            max_new_tokens=scoring.max_new_tokens, retention=scoring.retention,
                            base_model=str(base_model) if scoring.retention else None,
                            retention_limit=scoring.retention_limit, open_limit=scoring.open_limit)  # fmt: skip
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


def ablation_variants(variants: Sequence[str] | None, replay: str | None,
                      pretrained: bool) -> tuple[list[Variant], str]:
    """The variants to train and the replay setting: by default every variant for the tiny model, without replay,
    and REAL_MODEL_VARIANTS from a pretrained base, each without and with replay. The tiny model has no replay."""
    replay = replay or ("both" if pretrained else "off")
    chosen = choose_variants(list(variants or (REAL_MODEL_VARIANTS if pretrained else VARIANTS_BY_NAME)), replay)
    if not pretrained and any(v.replay for v in chosen):
        raise CrlftError("replay needs a pretrained base model (--base-model): the tiny model knows nothing to keep")
    return chosen, replay


def run_ablation(cfg: Config, out: Path, *, seeds: Sequence[int] = DEFAULT_SEEDS, steps: int | None = None,
                 variants: Sequence[str] | None = None, suite_dir: Path | None = None,
                 mlflow_uri: str | None = None, parallel: int = 1, base_model: str | None = None,
                 replay: str | None = None, facts: bool = False, retention_limit: int | None = None,
                 open_limit: int = OPEN_LIMIT, log: Callable[[str], None] = print) -> Ablation:
    """Build the data, train and evaluate every variant for every seed in one Ray session, summarize, plot, log.
    With `base_model` (a pretrained model: folder, GGUF file or bundled name) every run starts from it, is trained
    without and/or with replay (`replay`: both, on or off; default both) and its retention is measured; without it
    (the tiny model) there is no replay. `facts`: crlft/synth/facts.py's set instead of the synthetic suite."""
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
    if retention_limit is not None and retention_limit < 1:
        raise CrlftError(f"--retention-limit {retention_limit}: give at least 1 (or leave it out for every prompt)")
    if open_limit < 0:
        raise CrlftError(f"--open-limit {open_limit}: give 0 (no agreement) or more")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ablation_id = time.strftime("%Y%m%d-%H%M%S")
    if suite_dir:
        suite = suite_files(suite_dir)
    elif facts:
        suite = write_facts_suite(out / "suite")
    else:
        suite = dict(write_suite(out / "suite", seed=0))
    train_file = suite["train"]
    assert train_file is not None
    scoring = Scoring(retention=bool(base_model), retention_limit=retention_limit, open_limit=open_limit,
                      max_new_tokens=FACTS_MAX_NEW_TOKENS if facts else 16)  # fmt: skip
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
            base = base_reference(pretrained, suite, cfg, out, scoring)
        else:
            for seed in seeds:
                log(f"[ablation] base model for seed {seed}")
                base_models[seed] = build_default_model(out / "base" / f"seed-{seed}", data_config(VARIANTS[0], cfg),
                                                        [train_file], seed=seed)  # fmt: skip
        data: dict[str, tuple[Path, dict[str, Any]]] = {}
        for variant in chosen:
            key = variant.data_key()
            if key not in data:
                log(f"[ablation] data {key}")
                folder = out / "data" / key
                stats = build_dataset([str(train_file)], str(base_models[seeds[0]]), folder,
                                      data_config(variant, cfg))  # fmt: skip
                data[key] = (folder, stats)
        budget = steps or recipe_steps(data[chosen[0].data_key()][1], cfg)
        tags = {TAG + "id": ablation_id, TAG + "steps": str(budget)}

        def one(seed: int, variant: Variant) -> RunResult:
            folder, stats = data[variant.data_key()]
            run_cfg = run_config(variant, cfg, seed, budget, steps_per_epoch(stats, cfg), out)
            log(f"[ablation] {variant.name} seed {seed}: {budget} steps")
            result = run_one(variant, seed, run_cfg, folder, base_models[seed], suite, out, tracking_uri, tags,
                             scoring)  # fmt: skip
            kept = "" if result.retention is None else f", retention {result.retention:.3f}"
            log(f"[ablation] {variant.name} seed {seed}: accuracy {result.accuracy_expert:.3f} under {expert}, "
                f"{result.accuracy_suboptimal:.3f} under {suboptimal}{kept}, silhouette {result.silhouette}, "
                f"trained in {result.train_s:.0f} s")
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
    (out / "results.json").write_text(json.dumps(_results_json(ablation), indent=2))
    params = {"steps": str(budget), "seeds": ",".join(map(str, seeds)), "variants": ",".join(names),
              "suite": str(train_file.parent), "replay": replay, "wall_s": f"{time.monotonic() - started:.0f}"}
    if scoring.retention:
        params |= {"retention_limit": str(retention_limit or "all"), "open_limit": str(open_limit)}
    ablation.summary_run_id = log_summary(ablation, cfg, tracking_uri, params)
    return ablation


def base_line(base_model: str, base: dict[str, float], expert: str, suboptimal: str) -> str:
    """The line under the table: the pretrained model before any fine-tuning."""
    general = base.get("general_accuracy")
    shown = "" if general is None else f", general accuracy {general:.3f} (the reference of retention)"
    return (f"base model {base_model} before fine-tuning: accuracy {base['accuracy_expert']:.3f} under {expert}, "
            f"{base['accuracy_suboptimal']:.3f} under {suboptimal}{shown}")


def projection_pair(names: Sequence[str]) -> list[str]:
    """The rows whose held-out embeddings are plotted side by side: crlft and sft, without replay where trained so."""
    pair = []
    for plain in ("crlft", "sft"):
        found = next((n for n in (plain, plain + REPLAY_SUFFIX) if n in names), None)
        if found:
            pair.append(found)
    return pair


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

cost: a SmolLM2-135M run (80 LoRA steps) trains in about 10 minutes on 2 cores (5 idle, 20 busy), plus a few
minutes for its evaluation; `crlft ablation --base-model smollm2` (3 variants x replay on/off x 3 seeds = 18 runs,
one at a time) takes about 4 hours, up to 7 on busy cores. The tiny model's whole ablation (6 variants x 3 seeds) is
about 17 minutes on 2 idle cores.
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
    parser.add_argument("--retention-limit", type=int, metavar="N",
                        help="with --base-model: only N prompts of the general check, spread over its kinds "
                        "(default: all 398)")
    parser.add_argument("--open-limit", type=int, default=OPEN_LIMIT, metavar="N",
                        help="with --base-model: open prompts for agreement with the base model's answers "
                        f"(default {OPEN_LIMIT}, as crlft eval; 0 skips agreement)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.config is None:
        args.config = str(REAL_MODEL_SYNTH_RECIPE if args.base_model else SYNTH_RECIPE)
    cfg = config_from_args(args)
    out = Path(args.out) if args.out else Path(cfg.state_dir) / "ablation" / time.strftime("%Y%m%d-%H%M%S")
    ablation = run_ablation(cfg, out, seeds=args.seeds, steps=args.steps, variants=args.variants,
                            suite_dir=Path(args.suite) if args.suite else None, mlflow_uri=args.mlflow_uri,
                            parallel=args.parallel or default_parallel(cfg), base_model=args.base_model,
                            replay=args.replay, facts=args.facts, retention_limit=args.retention_limit,
                            open_limit=args.open_limit)  # fmt: skip
    print(ablation.text)
    print(f"figures: {', '.join(str(p) for p in ablation.figures.values())}")
    print(f"results: {out / 'results.json'}; MLflow summary run {ablation.summary_run_id} (experiment {EXPERIMENT})")
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_entrypoint("jobs.ablation"))
