"""MLflow for a training run: the driver opens the run with every parameter and the data description; rank 0 sends
its per-step metrics in batches; the driver logs the exported model into the run."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

from jobs.training.data import DataDescription

METRICS_FLUSH_S = 5.0


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config as `section.key -> text` parameters."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if not isinstance(value, str) else value
    return flat


def data_params(data: DataDescription) -> dict[str, str]:
    keep = ("records_in", "accepted", "rejected", "filtered", "bins", "packing_efficiency", "pack_len", "max_len",
            "mode", "tokenizer")
    params = {f"data.{key}": str(data.stats[key]) for key in keep if key in data.stats}
    for name, counts in data.stats.get("per_class", {}).items():
        for key, value in counts.items():
            params[f"data.per_class.{name}.{key}"] = str(value)
    params["data.path"] = data.root
    params["data.fingerprint"] = data.fingerprint
    return params


def start_run(client: Any, experiment: str, run_name: str, params: Mapping[str, str], data: DataDescription) -> str:
    """A new MLflow run tagged with the data's fingerprints, holding `params` and the data's stats.json."""
    from mlflow.entities import Param

    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    tags = {"crlft.stage": "train", "crlft.data_fingerprint": data.fingerprint}
    tags.update({f"crlft.data.{k}": str(v) for k, v in data.stats.get("fingerprints", {}).items()})
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    items = [Param(key[:250], value[:6000]) for key, value in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])
    client.log_dict(run_id, data.stats, "data/stats.json")
    return run_id


class MetricsLogger:
    """Rank 0's metrics, sent to MLflow in batches (a write per step would slow small steps down)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, flush_every_s: float = METRICS_FLUSH_S) -> None:
        self._client = None
        if tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri)
        self._run_id = run_id
        self._pending: list[Any] = []
        self._flush_every_s = flush_every_s
        self._last_flush = time.monotonic()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
        if time.monotonic() - self._last_flush >= self._flush_every_s:
            self.flush()

    def flush(self) -> None:
        if self._client is None or not self._pending:
            return
        for start in range(0, len(self._pending), 1000):
            self._client.log_batch(self._run_id, metrics=self._pending[start : start + 1000])
        self._pending = []
        self._last_flush = time.monotonic()
