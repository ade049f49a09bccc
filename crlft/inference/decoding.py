"""The decoder a stage answers prompts with: the engine `crlft serve` would serve with on this machine (the `inference`
section: inference.engine, auto: vLLM where installed for the device, else crlft's own; inference.precision; this
machine's GPU if it has one).
Evaluation, retention and replay all decode through here, so what they measure or train on is what users get."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from crlft.config import Config

if TYPE_CHECKING:  # torch and transformers come with these: imported where the model runs, not for --help
    from crlft.eval.answers import Decoder
    from crlft.export import ExportedModel
    from crlft.inference.engine import EngineSettings


def engine_settings(cfg: Config, batch_size: int) -> EngineSettings:
    """What `crlft serve` would generate with here (EngineSettings), `batch_size` sequences at a time.
    vLLM asked for but not installed fails here, before any work."""
    import torch

    from crlft.inference.engine import EngineSettings

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return dataclasses.replace(EngineSettings.for_replica(cfg, device), max_batch_size=batch_size)


def dtype_name(engine: EngineSettings) -> str:
    return str(engine.dtype).removeprefix("torch.")


def load_model(model_dir: Path, engine: EngineSettings) -> ExportedModel:
    """The model as the transformers engine serves it (number type, device) when that engine decodes. Under vLLM it
    stays as saved, on the CPU: there it only renders prompts (and embeds held-out conversations), and vLLM holds the
    GPU (it sizes its cache from the memory it finds free)."""
    from crlft.export import load_exported

    if engine.kind != "transformers":
        return load_exported(model_dir)
    exported = load_exported(model_dir, dtype=engine.dtype)
    exported.model.to(engine.device)
    return exported


@contextlib.contextmanager
def open_decoder(model_dir: Path, engine: EngineSettings) -> Iterator[Decoder | None]:
    """vLLM's offline engine, started once and stopped at the end; None for crlft's engine, crlft.eval.answers' default
    (no engine to start)."""
    if engine.kind != "vllm":
        yield None
        return
    from crlft.inference.vllm_decoder import VllmDecoder

    decoder = VllmDecoder(model_dir, engine)
    try:
        yield decoder
    finally:
        decoder.close()
