"""The ablation benchmark: its bookkeeping (fast), and the method's ordering on the synthetic suite through the real
stages (slow: Ray Data, Ray Train, evaluation, MLflow), so that a regression in the template, the weights or the loss
fails.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.ablation import (
    VARIANTS,
    VARIANTS_BY_NAME,
    RunResult,
    Stat,
    beats,
    claims,
    data_config,
    markdown_table,
    run_config,
    summarize,
)
from crlft.config import SYNTH_RECIPE, Mode, load_config
from crlft.synth import write_suite


def result(variant: str, seed: int, expert: float, suboptimal: float, silhouette: float | None = 0.1) -> RunResult:
    return RunResult(variant, seed, expert, suboptimal, silhouette, 10.0, 100, "", "", None)


def test_variants_sharing_a_template_and_classes_share_their_data() -> None:
    keys = {v.name: v.data_key() for v in VARIANTS}
    assert keys["crlft"] == keys["conditioned"]
    assert keys["weighted"] == keys["sft"]
    assert len(set(keys.values())) == 4


def test_data_is_built_with_the_rewards_of_its_template_and_the_variants_class_filter() -> None:
    cfg = load_config(SYNTH_RECIPE)
    assert data_config(VARIANTS_BY_NAME["conditioned"], cfg).train.mode is Mode.crlft
    assert data_config(VARIANTS_BY_NAME["weighted"], cfg).train.mode is Mode.sft
    assert data_config(VARIANTS_BY_NAME["expert_only"], cfg).data.only_classes == ["GPT4"]
    assert data_config(VARIANTS_BY_NAME["suboptimal_only"], cfg).data.only_classes == ["GPT3"]
    assert data_config(VARIANTS_BY_NAME["sft"], cfg).data.only_classes is None


def test_every_variant_trains_exactly_the_same_number_of_steps(tmp_path: Path) -> None:
    cfg = load_config(SYNTH_RECIPE)
    small_data = run_config(VARIANTS_BY_NAME["expert_only"], cfg, seed=1, steps=100, steps_per_epoch=7, out=tmp_path)
    large_data = run_config(VARIANTS_BY_NAME["crlft"], cfg, seed=1, steps=100, steps_per_epoch=70, out=tmp_path)
    assert small_data.train.max_steps == large_data.train.max_steps == 100
    assert (small_data.train.epochs, large_data.train.epochs) == (15, 2)  # enough passes for 100 steps
    assert small_data.train.seed == large_data.train.seed == 1


def test_a_difference_inside_the_spread_is_not_a_win() -> None:
    assert beats(Stat(0.8, 0.02, 3), Stat(0.5, 0.05, 3))
    assert not beats(Stat(0.55, 0.03, 3), Stat(0.5, 0.03, 3))  # 0.05 apart, spreads add to 0.06
    assert not beats(Stat(0.8, 0.0, 0), Stat(0.5, 0.0, 3))  # nothing measured


def test_the_summary_has_mean_and_spread_per_variant_and_checks_the_papers_claims() -> None:
    results = [result("crlft", s, e, 0.2, 0.4) for s, e in enumerate((0.80, 0.82, 0.84))]
    results += [result("sft", s, e, e, 0.0) for s, e in enumerate((0.20, 0.22, 0.24))]
    results += [result("expert_only", s, e, e, 0.01) for s, e in enumerate((0.95, 0.97, 0.99))]
    rows = summarize(results, ["crlft", "sft", "expert_only"])
    assert [r.variant for r in rows] == ["crlft", "sft", "expert_only"]
    assert rows[0].accuracy_expert.mean == pytest.approx(0.82)
    assert rows[0].accuracy_expert.spread == pytest.approx(0.02)
    checks = dict(claims(rows))
    assert checks["crlft (expert condition) beats sft"]
    # expert_only is a data reference, not a mode on the mixture: it may beat crlft on a suite whose sub-optimal data
    # teaches nothing the expert data lacks
    assert checks["crlft (expert condition) is at least as accurate as every other mode on the mixture"]
    assert checks["crlft: the expert condition beats the sub-optimal one"]
    assert checks["crlft separates the classes more than sft (silhouette)"]
    table = markdown_table(rows, "GPT4", "GPT3")
    assert "| crlft | 0.820 ± 0.020 | 0.200 ± 0.000 | 0.400 ± 0.000 |" in table


def test_runs_from_a_real_base_model_add_a_general_column_the_tiny_ones_do_not() -> None:
    tiny = summarize([result("crlft", 0, 0.8, 0.2)], ["crlft"])
    real = summarize([replace(result("crlft", s, 0.8, 0.2), general=g) for s, g in enumerate((1.0, 0.6))], ["crlft"])
    assert "general" not in markdown_table(tiny, "GPT4", "GPT3")
    table = markdown_table(real, "GPT4", "GPT3")
    assert "| general |" in table and "| 0.800 ± 0.283 |" in table


# ---------------------------------------------------------------------------------------------------------------------
# The ordering, through the real stages


@pytest.mark.slow
def test_crlft_under_the_expert_condition_beats_sft_and_its_own_suboptimal_condition(tmp_path: Path) -> None:
    """The synthetic suite (seed 0), crlft and sft from the same initial weights, through the real stages. Also the
    evaluation's promise: the expert condition beats the sub-optimal one, and the embedding plot is logged."""
    from mlflow.tracking import MlflowClient

    from benchmarks.ablation import run_ablation

    suite = write_suite(tmp_path / "suite", seed=0)["train"].parent
    cfg = load_config(SYNTH_RECIPE, {"state_dir": str(tmp_path / "state")})
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The recipe's budget (half of it is not enough, see the benchmark's docstring); both runs side by side.
    ablation = run_ablation(cfg, tmp_path / "out", seeds=[0], variants=["crlft", "sft"], suite_dir=suite,
                            mlflow_uri=tracking_uri, parallel=2)  # fmt: skip
    by_variant = {r.variant: r for r in ablation.results}
    crlft, sft = by_variant["crlft"], by_variant["sft"]
    assert crlft.accuracy_expert >= 0.75, ablation.text
    assert sft.accuracy_expert <= 0.2, ablation.text  # SFT learns the mixture's majority: GPT3's systematic errors
    assert crlft.accuracy_suboptimal <= 0.2, ablation.text  # the GPT3 condition brings GPT3's errors back
    assert crlft.silhouette > sft.silhouette, ablation.text
    assert {"table", "projection"} <= set(ablation.figures) and all(p.is_file() for p in ablation.figures.values())
    assert (tmp_path / "out" / "results.json").is_file() and ablation.summary_run_id
    logged = [a.path for a in MlflowClient(tracking_uri).list_artifacts(crlft.eval_run_id, "evaluation")]
    assert "evaluation/embeddings.png" in logged
