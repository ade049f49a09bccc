"""The ablation's results: one run's figures, the mean and spread per variant over the seeds, the paper's claims
checked with the win rule (a difference larger than the two spreads added), the table and the report under it."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from crlft.ablation.variants import MODES, REPLAY_SUFFIX, variant_named


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


def base_line(base_model: str, base: dict[str, float], expert: str, suboptimal: str) -> str:
    """The line under the table: the pretrained model before any fine-tuning."""
    general = base.get("general_accuracy")
    shown = "" if general is None else f", general accuracy {general:.3f} (the reference of retention)"
    return (f"base model {base_model} before fine-tuning: accuracy {base['accuracy_expert']:.3f} under {expert}, "
            f"{base['accuracy_suboptimal']:.3f} under {suboptimal}{shown}")


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


def results_json(ablation: Ablation) -> dict[str, Any]:
    """results.json: the rows, every run, the claims and the base model's figures (also logged with the summary)."""
    return {
        "ablation_id": ablation.ablation_id,
        "steps": ablation.steps,
        "seeds": ablation.seeds,
        "rows": [asdict(row) for row in ablation.rows],
        "runs": [asdict(result) for result in ablation.results],
        "claims": [{"claim": text, "holds": ok} for text, ok in claims(ablation.rows)],
        "base": ablation.base,
    }
