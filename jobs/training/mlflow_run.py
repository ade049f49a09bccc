"""MLflow for a training run: the driver opens the run with every parameter and the data description; rank 0 sends
its per-step metrics in batches, in the background, holding them while the server is away; the driver sends what was
still held at the end and logs the exported model into the run."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from crlft.errors import first_line
from crlft.lineage.tags import TAG
from crlft.tracking import new_run
from jobs.training.data import DataDescription

METRICS_FLUSH_S = 5.0
RETRY_MAX_DELAY_S = 30.0  # the longest wait between two sends a server answering the probe did not take
PROBE_TIMEOUT_S = 5  # whole seconds (MLflow's timeout is an int)
UNSENT_FILE = "unsent_metrics.json"  # in a checkpoint: rank 0's metrics that MLflow had not taken yet


def data_params(data: DataDescription) -> dict[str, str]:
    keep = ("records_in", "accepted", "rejected", "filtered", "bins", "packing_efficiency", "pack_len", "max_len",
            "mode", "tokenizer")
    stats = data.stats.to_json()
    params = {f"data.{key}": str(stats[key]) for key in keep if key in stats}
    for name, counts in data.stats.per_class.items():
        for key, value in counts.items():
            params[f"data.per_class.{name}.{key}"] = str(value)
    params["data.path"] = data.root
    params["data.fingerprint"] = data.fingerprint
    return params


def start_run(client: Any, experiment: str, run_name: str, params: Mapping[str, str], data: DataDescription) -> str:
    """A new MLflow run tagged with the data's fingerprints, holding `params` and the data's stats.json."""
    from mlflow.entities import Param

    tags = {TAG + "stage": "train", TAG + "data_fingerprint": data.fingerprint}
    tags.update({f"{TAG}data.{k}": str(v) for k, v in data.stats.fingerprints.items()})
    run_id = new_run(client, experiment, run_name, tags).info.run_id
    items = [Param(key[:250], value[:6000]) for key, value in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])
    client.log_dict(run_id, data.stats.to_json(), "data/stats.json")
    return run_id


def send_metrics(client: Any, run_id: str, metrics: Sequence[Any]) -> None:
    """Log `metrics` into the run, in batches of MLflow's limit."""
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=list(metrics[start : start + 1000]))


def answers(tracking_uri: str) -> bool:
    """Whether the tracking server at `tracking_uri` answers at all, asked once with a short timeout and no retries
    (a send's own retries on a server that is away take about a minute); any HTTP answer counts. A store that is no
    server (a file, SQLite) always does."""
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:  # MLflow's request: the tracking URI's credentials and TLS settings, as a send uses them
        http_request(get_default_host_creds(tracking_uri), "/health", "GET", max_retries=0, timeout=PROBE_TIMEOUT_S,
                     raise_on_status=False)
    except Exception:
        return False
    return True


def read_unsent(directory: str | Path) -> list[Any]:
    """The metrics a checkpoint holds because MLflow had not taken them when it was written."""
    from mlflow.entities import Metric

    path = Path(directory) / UNSENT_FILE
    return [Metric(**fields) for fields in json.loads(path.read_text())] if path.is_file() else []


class MetricsLogger:
    """Rank 0's metrics, sent to MLflow in batches by a background thread, so that the training loop never waits on
    the tracking server. While the server does not answer (MLflow retries each request with backoff first), the
    metrics are held, and sent again once a short probe finds it answering (`answers`); every checkpoint carries those
    still held (`save_unsent`), and the worker restored from it or the driver after the last step sends them. Sending
    one twice is harmless: MLflow stores a metric resent with the same key, step, timestamp and value once."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, held: Sequence[Any] = (),
                 flush_every_s: float = METRICS_FLUSH_S) -> None:
        self._pending: list[Any] = list(held)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._flush_every_s = flush_every_s
        self._enabled = bool(tracking_uri and run_id)
        if self._enabled:
            from mlflow.tracking import MlflowClient

            sender = threading.Thread(target=self._send_loop, args=(tracking_uri, MlflowClient(tracking_uri), run_id),
                                      name="crlft-metrics", daemon=True)
            sender.start()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self._enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._lock:
            self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]

    def save_unsent(self, directory: str | Path) -> None:
        """Write the metrics not yet sent into the checkpoint folder `directory`."""
        with self._lock:
            unsent = [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
                      for m in self._pending]
        if unsent:
            (Path(directory) / UNSENT_FILE).write_text(json.dumps(unsent))

    def close(self) -> None:
        """Stop the sender without waiting for it: what it has not sent is in the last checkpoint."""
        self._closed.set()

    def _send_loop(self, tracking_uri: str, client: Any, run_id: str) -> None:
        delay, failing_since = self._flush_every_s, None
        while not self._closed.wait(delay):
            with self._lock:
                batch = list(self._pending)
            if not batch:
                continue
            if failing_since is not None and not answers(tracking_uri):  # still away: probe again at the next flush,
                delay = self._flush_every_s  # to notice its return in seconds; the metrics stay held
                continue
            try:
                send_metrics(client, run_id, batch)
            except Exception as error:  # whatever went wrong, the metrics stay held and are sent again later
                if failing_since is None:
                    failing_since = time.monotonic()
                    print(f"warning: MLflow did not take the training metrics ({first_line(error)}); training goes "
                          "on, the metrics are held and sent when the server answers", file=sys.stderr, flush=True)
                delay = min(delay * 2, RETRY_MAX_DELAY_S)
                continue
            with self._lock:
                del self._pending[: len(batch)]  # only this thread removes, from the front: these are the sent ones
            if failing_since is not None:
                print(f"MLflow answers again after {time.monotonic() - failing_since:.0f} s: sent the "
                      f"{len(batch)} held metrics", file=sys.stderr, flush=True)
            delay, failing_since = self._flush_every_s, None
