"""Test-wide setup: everything offline and quiet before any library reads its environment at import time."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

# huggingface_hub reads HF_HUB_OFFLINE when first imported: set it before anything imports transformers.
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """A local Ray for the tests of one module (4 logical CPUs on 2 cores: workers take fractions), dashboard on
    loopback (without it Train logs state-API errors in a loop)."""
    import ray

    from cluster.session import free_port

    saved_env = dict(os.environ)
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(),
             logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved_env)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small tokenizer trained on the built-in corpus (what the embedded default model gets), saved in a folder."""
    from crlft.model import default_corpus, train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(default_corpus(), vocab_size=600).save_pretrained(out)
    return str(out)
