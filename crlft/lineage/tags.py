"""The `crlft.*` tags the product writes on MLflow model versions and runs, and how their keys are made and read.

Tags written on a model version (all strings, MLflow tags):
    crlft.mode, crlft.base_model, crlft.data_fingerprint, crlft.git_commit, crlft.template   lineage
    crlft.eval.suite                              the suite of the latest evaluation
    crlft.eval.<suite>.<metric>                   a recorded figure (float as text)
    crlft.eval.<suite>.run_id / .file             the evaluation run, the suite's file name
    crlft.promotion.*                             the latest promotion decision and both figures
    crlft.adapter_of                              an adapter's base version (models:/NAME/VERSION)
    crlft.base_fingerprint                        a crlft base's content, on the base and on every adapter on it
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping

TAG = "crlft."
EVAL_TAG = TAG + "eval."
PROMOTION_TAG = TAG + "promotion."
ADAPTER_OF_TAG = TAG + "adapter_of"
BASE_FINGERPRINT_TAG = TAG + "base_fingerprint"
RETENTION_SUITE = "retention"  # where retention figures are recorded: crlft.eval.retention.<figure>

# What MLflow accepts in tag keys (mlflow.utils.validation): anything else in a suite or metric name becomes "_".
_TAG_KEY_UNSAFE = re.compile(r"[^/\w.\- ]")


def tag_key_part(text: str) -> str:
    """A metric name made safe for an MLflow tag key."""
    return _TAG_KEY_UNSAFE.sub("_", text)


def suite_key(suite: str) -> str:
    """A suite name made safe for an MLflow tag key, without dots (they separate suite and metric in the key)."""
    return re.sub(r"[^\w\-]", "_", suite)


def read_evaluations(tags: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """suite -> metric -> value, from a version's crlft.eval.<suite>.<metric> tags (the non-figures left out)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in tags.items():
        if not key.startswith(EVAL_TAG) or key.count(".") < 3:
            continue
        suite, _, metric = key[len(EVAL_TAG):].partition(".")
        with contextlib.suppress(ValueError):
            out.setdefault(suite, {})[metric] = float(value)
    return out
