"""Registering an exported model folder as a new version, linked to the training run that made it and tagged with
its lineage (crlft/lineage/tags.py)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crlft.config import Config
from crlft.errors import CrlftError
from crlft.lineage.tags import ADAPTER_OF_TAG, BASE_FINGERPRINT_TAG, TAG
from crlft.tracking import client_for, mlflow_error, new_run

if TYPE_CHECKING:
    from mlflow import MlflowClient

MODEL_ARTIFACT_PATH = "model"  # where a run holds the model folder its version is created from


def lineage_tags(model_dir: Path, cfg: Config) -> dict[str, str]:
    """mode, data fingerprint, base model, git commit and template of an exported model (from its crlft.json)."""
    from crlft.export import read_meta  # imports transformers: only when registering

    meta = read_meta(model_dir)
    extra = meta.extra
    base_model = extra.get("base_model") or meta.config.get("model", {}).get("base_model") or cfg.model.base_model
    return {
        TAG + "mode": meta.mode,
        TAG + "base_model": str(base_model),
        TAG + "data_fingerprint": str(extra.get("data_fingerprint") or "unknown"),
        TAG + "git_commit": str(extra.get("git_commit") or _git_commit()),
        TAG + "template": meta.template.fingerprint(),
    }


def register_model(
    model_dir: str | Path,
    cfg: Config,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    *,
    name: str | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Register `model_dir` as a new version of `name` (default cfg.registry.model_name); returns the version.

    Lineage: the version points at the training run `run_id` (default: the run named in the model's crlft.json, when
    this store has it). The version is created from the run's artifacts `model/` (MLflow 3 cannot register a plain
    folder through `runs:/`, only with create_model_version(source=<artifact uri>)): the trainer logs its export
    there; if the run has none, the folder is logged there now. Without a training run, a registration run is made to
    hold the folder. Lineage tags come from the model's crlft.json; `tags` add to or override them. An adapter's base is
    registered with it (crlft/lineage/bases.py)."""
    from crlft.export import is_adapter

    model_dir = Path(model_dir)
    _check_model_dir(model_dir)
    version_tags = {**lineage_tags(model_dir, cfg), **dict(tags or {})}
    if is_adapter(model_dir):  # its base first, once: every adapter version names the base it runs on
        version_tags |= _register_base(model_dir, cfg, tracking_uri)
    name = name or cfg.registry.model_name
    client, _ = client_for(cfg, tracking_uri)
    from mlflow.exceptions import MlflowException

    from crlft.export import read_meta

    run = _lineage_run(client, run_id, read_meta(model_dir).extra.get("mlflow_run_id"))
    own_run = run is None
    try:
        if run is None:
            run = new_run(client, cfg.registry.experiment, f"register {name}", {TAG + "kind": "registration"})
    except MlflowException as exc:
        raise mlflow_error(exc, "create a registration run") from None
    run_id = run.info.run_id
    try:
        if own_run or not client.list_artifacts(run_id, MODEL_ARTIFACT_PATH):
            client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT_PATH)
        source = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"
        with contextlib.suppress(MlflowException):  # it exists already (or another process just made it)
            client.create_registered_model(name)
        version = client.create_model_version(name, source=source, run_id=run_id, tags=version_tags)
    except (MlflowException, OSError) as exc:
        if own_run:
            with contextlib.suppress(MlflowException):
                client.set_terminated(run_id, status="FAILED")
        raise mlflow_error(exc, f"register {model_dir} as a version of {name}") from None
    if own_run:
        client.set_terminated(run_id)
    return str(version.version)


def _register_base(adapter_dir: Path, cfg: Config, tracking_uri: str | None = None) -> dict[str, str]:
    """Register an adapter's base unless its fingerprint already is; the tags that link the adapter's version to it."""
    from crlft.export import adapter_base
    from crlft.lineage.bases import registered_base

    base = adapter_base(adapter_dir)
    version = registered_base(base.fingerprint, cfg, tracking_uri)
    if version is None:
        version = register_model(base.folder(cfg.state_dir), cfg,
                                 tags={BASE_FINGERPRINT_TAG: base.fingerprint}, name=cfg.registry.base_model_name,
                                 tracking_uri=tracking_uri)  # fmt: skip
    return {ADAPTER_OF_TAG: f"models:/{cfg.registry.base_model_name}/{version}", BASE_FINGERPRINT_TAG: base.fingerprint}


def _git_commit() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True,
            cwd=Path(__file__).resolve().parent,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


def _check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise CrlftError(f"no model directory {model_dir}: give the folder written by `crlft train` (its export)")
    if not (model_dir / "config.json").is_file():
        raise CrlftError(f"{model_dir} is not a Hugging Face model folder (no config.json): register an exported model")


def _lineage_run(client: MlflowClient, run_id: str | None, recorded_run_id: Any) -> Any:
    """The training run to link: the one given (it must exist), else the one the model records if this store has it."""
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            return client.get_run(run_id)
        except MlflowException:
            raise CrlftError(f"run {run_id} does not exist in this MLflow store: give the training run's id") from None
    if isinstance(recorded_run_id, str) and recorded_run_id:
        with contextlib.suppress(MlflowException):
            return client.get_run(recorded_run_id)
    return None
