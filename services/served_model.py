"""Which model a replica serves: a folder or a registered model, the revision loaded, the name clients use."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from crlft.config import Config
from crlft.errors import CrlftError
from crlft.inference.engine import Engine, EngineSettings
from crlft.inference.engines import open_engine
from crlft.lineage.cache import registered_version, resolve_model
from crlft.lineage.versions import is_model_uri, parse_model_uri
from crlft.storage import folder_revision

CHAMPION_WATCH_S = 30.0  # how often a replica serving models:/NAME@ALIAS checks whether the alias moved


def resolve_model_uri(uri: str, cfg: Config, tracking_uri: str | None = None) -> Path:
    """A local model folder for a folder path or a registered model (`models:/NAME@ALIAS`, `models:/NAME/VERSION`,
    downloaded once into the registry cache)."""
    if is_model_uri(uri):
        return Path(resolve_model(uri, cfg, tracking_uri=tracking_uri))
    path = Path(uri).expanduser()
    if not (path / "config.json").is_file():
        raise CrlftError(
            f"no model at {uri}: give a folder written by `crlft train` (with config.json) or a registered model "
            "as models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    return path


def served_name(uri: str, cfg: Config, override: str | None = None) -> str:
    """The name clients put in `model`: stable across champion changes (the registered name, not the version)."""
    if override or cfg.serve.model_name:
        return str(override or cfg.serve.model_name)
    if is_model_uri(uri):
        return parse_model_uri(uri).name
    return Path(uri).expanduser().resolve().name


def default_watch_s(uri: str) -> float:
    """Aliases move, versions and folders do not: only `models:/NAME@ALIAS` is watched by default."""
    return CHAMPION_WATCH_S if is_model_uri(uri) and "@" in uri else 0.0


@dataclass
class LoadedModel:
    """One model and its running engine inside a replica."""

    source: str
    path: Path
    revision: str
    engine: Engine
    registered: str | None = None  # the registered version, for a models:/ source
    loaded_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def fingerprint(self) -> str:
        return f"crlft-{self.revision}"

    @property
    def version(self) -> str:
        """What stored completions name: the registered version, else the folder's revision."""
        return self.registered or self.revision


def load_model(source: str, path: Path, settings: EngineSettings) -> LoadedModel:
    return LoadedModel(source, path, folder_revision(path), open_engine(path, settings),
                       registered=registered_version(source, path))
