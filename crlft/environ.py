"""Variables of this process's environment set for a block: what processes started in it (Ray's, vLLM's) inherit."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping

# os.environ is one per process: two threads' blocks overlapping would each put back what the other set (a vLLM
# start's variables left behind after it). A thread's block waits for another thread's to end; its own nest.
_ENVIRONMENT = threading.RLock()


@contextlib.contextmanager
def environment(extra: Mapping[str, str], override: bool = False) -> Iterator[dict[str, str]]:
    """`extra` in os.environ for the block (a variable already set keeps its value unless `override`), as it was
    after: processes started in the block (Ray's, vLLM's) inherit it; this process's later children do not. Yields
    the values in effect. Blocks of different threads run one at a time."""
    with _ENVIRONMENT:
        before = {name: os.environ.get(name) for name in extra}
        os.environ.update({name: value for name, value in extra.items() if override or before[name] is None})
        try:
            yield {name: os.environ[name] for name in extra}
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


# What every stage and replica runs with unless the user says otherwise: no model hub calls (models come from folders
# and the local cache), no telemetry.
OFFLINE_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def set_offline_defaults() -> None:
    """OFFLINE_ENV into this process's environment, where a variable is not set already."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
