"""Which model a replica serves: a folder or a registered model, the revision loaded, the name clients use."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from crlft.config import Config
from crlft.errors import CrlftError
from crlft.lineage.cache import registered_version, resolve_model
from crlft.lineage.versions import is_model_uri, parse_model_uri
from services.engine import Engine, EngineSettings, open_engine

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


def model_revision(path: Path) -> str:
    """Identifies what is loaded: the folder's real path and its files' sizes and modification times (a registry
    version has its own cache folder; a folder re-exported in place changes its files)."""
    real = path.resolve()
    digest = hashlib.sha256(str(real).encode())
    for f in sorted(real.iterdir()):
        if f.is_file():
            stat = f.stat()
            digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


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
    return LoadedModel(source, path, model_revision(path), open_engine(path, settings),
                       registered=registered_version(source, path))
