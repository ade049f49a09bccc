"""The ablation's figures: the table as bars (the spread as error bars) and the held-out conversations in the last
hidden states of crlft beside sft (the paper's figure)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from crlft.ablation.summary import Row
from crlft.ablation.variants import REPLAY_SUFFIX


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


def projection_pair(names: Sequence[str]) -> list[str]:
    """The rows whose held-out embeddings are plotted side by side: crlft and sft, without replay where trained so."""
    pair = []
    for plain in ("crlft", "sft"):
        found = next((n for n in (plain, plain + REPLAY_SUFFIX) if n in names), None)
        if found:
            pair.append(found)
    return pair
