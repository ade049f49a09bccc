"""The representation check: mean-pooled last hidden states of held-out expert and sub-optimal conversations, their
silhouette score, and a 2-D projection (UMAP, as in the paper, when installed; PCA otherwise) saved as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crlft.data.readers import iter_file
from crlft.data.records import ClassRules, Conversation
from crlft.errors import CrlftError
from crlft.export import ExportedModel, ModelMeta


def load_heldout(path: str | Path, meta: ModelMeta) -> list[Conversation]:
    """Held-out conversations, each naming one of the model's conditions; any bad line is a CrlftError."""
    rules = ClassRules(classes=tuple(meta.conditions), default_class=None)
    conversations: list[Conversation] = []
    problems: list[str] = []
    for parsed in iter_file(path, rules):
        if isinstance(parsed, Conversation):
            conversations.append(parsed)
        else:
            problems.append(str(parsed))
    if problems:
        shown = "; ".join(problems[:3]) + (f"; ... and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise CrlftError(f"{len(problems)} bad held-out conversation(s): {shown}")
    if not conversations:
        raise CrlftError(f"{path}: no held-out conversations")
    return conversations


def balanced_sample(conversations: Sequence[Conversation], max_per_class: int) -> list[Conversation]:
    """At most `max_per_class` conversations of each condition, in file order (deterministic)."""
    taken: dict[str, int] = {}
    out = []
    for conv in conversations:
        if taken.get(conv.condition, 0) < max_per_class:
            taken[conv.condition] = taken.get(conv.condition, 0) + 1
            out.append(conv)
    return out


@torch.no_grad()
def embed_conversations(exported: ExportedModel, conversations: Sequence[Conversation],
                        batch_size: int = 16) -> np.ndarray:
    """Mean-pooled last-layer hidden states of each conversation rendered with the model's template (its own
    condition in the prompt, where the template has one): shape (n, hidden)."""
    model = exported.model
    model.eval()
    limit = exported.folder.context_len
    ids = [exported.template_tokenizer.tokenize_conversation(c, {}, max_len=limit).input_ids for c in conversations]
    pad_id = exported.tokenizer.pad_token_id or 0
    device = next(model.parameters()).device
    pooled = []
    for start in range(0, len(ids), batch_size):
        batch = ids[start:start + batch_size]
        width = max(len(x) for x in batch)
        input_ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in batch], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch], device=device)
        hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled.append(((hidden * weights).sum(1) / weights.sum(1)).float().cpu().numpy())
    return np.concatenate(pooled)


def project_2d(embeddings: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D projection: UMAP (the paper's choice) when `umap-learn` is installed, PCA otherwise."""
    try:
        import umap  # type: ignore[import-not-found]
    except ImportError:
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(embeddings), "PCA"
    reducer = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, len(embeddings) - 1))
    return reducer.fit_transform(embeddings), "UMAP"


def silhouette(embeddings: np.ndarray, labels: Sequence[str]) -> float | None:
    """How well the conditions separate (-1..1; above 0 means clusters); None when it is undefined."""
    from sklearn.metrics import silhouette_score

    n_labels = len(set(labels))
    if n_labels < 2 or len(labels) <= n_labels:
        return None
    return float(silhouette_score(embeddings, list(labels)))


def plot_projection(points: np.ndarray, labels: Sequence[str], out_png: Path, title: str) -> Path:
    """Scatter plot of the projection, one colour per condition (Agg canvas: no display, no global pyplot state)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 5))
    axes = figure.subplots()
    for condition in sorted(set(labels)):
        mask = np.array([label == condition for label in labels])
        axes.scatter(points[mask, 0], points[mask, 1], s=12, alpha=0.7, label=condition)
    axes.set_title(title)
    axes.legend(title="condition")
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=110)
    return out_png


@dataclass(frozen=True)
class RepresentationResult:
    silhouette: float | None
    method: str
    counts: dict[str, int]
    plot: Path


def representation_check(exported: ExportedModel, conversations: Sequence[Conversation], out_png: str | Path,
                         max_per_class: int = 200, batch_size: int = 16) -> RepresentationResult:
    """Embed up to `max_per_class` conversations per condition, score how the conditions separate, plot them."""
    sample = balanced_sample(conversations, max_per_class)
    labels = [c.condition for c in sample]
    embeddings = embed_conversations(exported, sample, batch_size)
    value = silhouette(embeddings, labels)
    points, method = projection_for_plot(embeddings)
    shown = "undefined" if value is None else f"{value:.3f}"
    title = f"{method} of last hidden states (mode {exported.meta.mode}); silhouette {shown}"
    counts = {c: labels.count(c) for c in sorted(set(labels))}
    return RepresentationResult(value, method, counts, plot_projection(points, labels, Path(out_png), title))


def projection_for_plot(embeddings: np.ndarray) -> tuple[np.ndarray, str]:
    if len(embeddings) < 3:  # too few points for a projection: plot the first two dimensions
        return embeddings[:, :2], "raw"
    return project_2d(embeddings)
