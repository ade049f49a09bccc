"""Variables of this process's environment set for a block: what processes started in it (Ray's, vLLM's) inherit."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping


@contextlib.contextmanager
def environment(extra: Mapping[str, str], override: bool = False) -> Iterator[dict[str, str]]:
    """`extra` in os.environ for the block (a variable already set keeps its value unless `override`), as it was
    after: processes started in the block (Ray's, vLLM's) inherit it; this process's later children do not. Yields
    the values in effect."""
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
