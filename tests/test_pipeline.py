"""The pipeline's stage fingerprints: a rerun redoes a stage exactly when something its output depends on changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from crlft.config import load_config
from jobs.pipeline import evaluation_fingerprint

SUITE, HELDOUT = Path("eval.jsonl"), Path("heldout.jsonl")


@pytest.mark.parametrize("key, value", [("inference.engine", "vllm"), ("inference.precision", "fp32"),
                                        ("registry.metric", "accuracy_suboptimal"), ("eval.max_new_tokens", 32)])
def test_evaluation_is_redone_when_what_asks_decodes_or_records_its_answers_changes(key: str, value: str) -> None:
    before = evaluation_fingerprint("trained", SUITE, HELDOUT, load_config())
    assert evaluation_fingerprint("trained", SUITE, HELDOUT, load_config(None, {key: value})) != before


def test_evaluation_is_kept_when_only_serving_settings_that_do_not_decode_change() -> None:
    before = evaluation_fingerprint("trained", SUITE, HELDOUT, load_config())
    assert evaluation_fingerprint("trained", SUITE, HELDOUT, load_config(None, {"serve.port": 9000})) == before
    assert evaluation_fingerprint("retrained", SUITE, HELDOUT, load_config()) != before
