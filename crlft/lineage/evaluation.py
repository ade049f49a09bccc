"""Evaluation figures recorded on a version, as crlft.eval.<suite>.<metric> tags (crlft/lineage/tags.py), and what
makes two evaluations "on the same suite"."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path

from crlft.config import Config
from crlft.errors import CrlftError
from crlft.lineage.tags import EVAL_TAG, RETENTION_SUITE, suite_key, tag_key_part
from crlft.lineage.versions import ModelRef, get_version
from crlft.tracking import client_for, mlflow_error


def suite_id(path: str | Path) -> str:
    """The identity of an evaluation suite: a hash of its content, so that "the same suite" means the same questions
    whatever the file is called or where it lives."""
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        raise CrlftError(f"{path}: cannot read the eval suite: {exc}") from None
    return f"suite-{digest[:12]}"


def record_evaluation(
    name: str,
    version: str,
    metrics: Mapping[str, float],
    suite: str,
    *,
    run_id: str | None = None,
    suite_file: str | None = None,
    cfg: Config | None = None,
    tracking_uri: str | None = None,
) -> None:
    """Record figures measured on `suite` as tags of the version (the evaluation run `run_id` holds the detail)."""
    from mlflow.exceptions import MlflowException

    client, _ = client_for(cfg, tracking_uri)
    get_version(client, ModelRef(name, version=str(version)))
    key = suite_key(suite)
    tags = {f"{EVAL_TAG}{key}.{tag_key_part(metric)}": repr(float(value)) for metric, value in metrics.items()
            if math.isfinite(float(value))}  # fmt: skip
    if run_id:
        tags[f"{EVAL_TAG}{key}.run_id"] = run_id
    if suite_file:
        tags[f"{EVAL_TAG}{key}.file"] = suite_file
    if key != RETENTION_SUITE:  # retention is beside the suite promotion compares on, never instead of it
        tags[EVAL_TAG + "suite"] = key  # last: a reader that sees the suite sees its figures
    try:
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version), key, value)
    except MlflowException as exc:
        raise mlflow_error(exc, f"record the evaluation on {name} v{version}") from None
