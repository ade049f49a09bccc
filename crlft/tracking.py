"""Where MLflow lives (a tracking server when one is given, else a SQLite file under the project's state folder) and
the client, runs and one-line errors every stage talks to it through."""

from __future__ import annotations

import contextlib
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crlft.config import Config
from crlft.environ import set_offline_defaults
from crlft.errors import CrlftError, first_line

if TYPE_CHECKING:
    from mlflow import MlflowClient

# MLflow 3 phones home and Hugging Face tries the hub unless told; neither is reachable offline.
def artifact_root(cfg: Config) -> Path:
    return Path(cfg.state_dir).resolve() / "mlartifacts"


def resolve_tracking_uri(cfg: Config, override: str | None = None) -> str:
    """--mlflow-uri, then the config, then MLFLOW_TRACKING_URI, then `sqlite:///<state_dir>/mlflow.db`."""
    uri = override or cfg.registry.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    state = Path(cfg.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{state / 'mlflow.db'}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast with what to do, instead of MLflow's long retry loop, when a tracking server is not there."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            if response.status == 200:
                return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CrlftError(
            f"MLflow tracking server {uri} is unreachable ({reason}): start it (`mlflow server --host 127.0.0.1 "
            "--port 5000`), fix --mlflow-uri / MLFLOW_TRACKING_URI, or unset them to use the local SQLite store"
        ) from None
    raise CrlftError(f"MLflow tracking server {uri} did not answer /health with 200")


def mlflow_patience_s() -> float:
    """How long MLflow's client retries one request before it gives up (MLFLOW_HTTP_REQUEST_MAX_RETRIES retries,
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR * 2**i seconds apart, as urllib3 spaces them): the tracker outage a stage
    rides out."""
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES

    factor = MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()
    return float(sum(factor * 2**retry for retry in range(MLFLOW_HTTP_REQUEST_MAX_RETRIES.get())))


def wait_reachable(uri: str, patience_s: float) -> None:
    """`check_reachable`, asked again at growing intervals for up to `patience_s` (a server being restarted); the
    last error when it never answers."""
    deadline, delay = time.monotonic() + patience_s, 1.0
    while True:
        try:
            check_reachable(uri)
            return
        except CrlftError:
            if time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(2 * delay, 30.0)


def setup_mlflow(cfg: Config, override: str | None = None) -> str:
    """Point MLflow at the resolved store, create the experiment (local artifact root for SQLite), return the URI."""
    set_offline_defaults()
    import mlflow

    uri = resolve_tracking_uri(cfg, override)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # Ray workers and subprocesses inherit it
    if mlflow.get_experiment_by_name(cfg.registry.experiment) is None:
        location = None if uri.startswith("http") else artifact_root(cfg).as_uri()
        # Another process may create it between the check and here.
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            mlflow.create_experiment(cfg.registry.experiment, artifact_location=location)
    mlflow.set_experiment(cfg.registry.experiment)
    return uri


def client_for(cfg: Config | None = None, tracking_uri: str | None = None) -> tuple[MlflowClient, str]:
    """A client on the resolved store; an unreachable server is a one-line CrlftError before anything is written."""
    from mlflow import MlflowClient

    # No progress bars or "View run at" lines on stdout, which carries the stage's own report.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    uri = setup_mlflow(cfg or Config(), tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def new_run(client: Any, experiment: str, run_name: str, tags: Mapping[str, str]) -> Any:
    """A new run in the experiment named `experiment` (`setup_mlflow` made it)."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.create_run(experiment_id, run_name=run_name, tags=dict(tags))


def error_code(exc: BaseException) -> str:
    """MLflow's error code of an MlflowException ("RESOURCE_DOES_NOT_EXIST", ...); empty for other errors."""
    return str(getattr(exc, "error_code", ""))


def mlflow_error(exc: Exception, doing: str) -> CrlftError:
    """What MLflow refused, as one line."""
    return CrlftError(f"MLflow refused to {doing}: {first_line(exc)}")


def mark_failed(client: Any, uri: str, run_id: str) -> bool:
    """End the MLflow run FAILED when the store answers (a server is asked quickly first, not through MLflow's
    minutes of retries); False when it does not, which leaves the run as it was."""
    from mlflow.exceptions import MlflowException

    try:
        check_reachable(uri)
        client.set_terminated(run_id, status="FAILED")
    except (CrlftError, MlflowException):
        return False
    return True
