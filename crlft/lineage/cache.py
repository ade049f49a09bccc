"""The local download cache of registered versions: what turns `models:/NAME@ALIAS` or `models:/NAME/VERSION` into a
folder `transformers` (and serving) can load, downloaded once under cfg.state_dir and reused afterwards."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from crlft.config import Config
from crlft.errors import CrlftError
from crlft.lineage.tags import ADAPTER_OF_TAG, tag_key_part
from crlft.lineage.versions import ModelRef, get_version, is_model_uri, parse_model_uri
from crlft.tracking import client_for, mlflow_error


def resolve_model(uri_or_dir: str | Path, cfg: Config | None = None, *, tracking_uri: str | None = None) -> Path:
    """A local model folder `transformers` can load: a plain folder as is, `models:/NAME@ALIAS` or
    `models:/NAME/VERSION` downloaded once into a cache under cfg.state_dir (reused afterwards)."""
    text = str(uri_or_dir)
    if not is_model_uri(text):
        path = Path(text)
        if not path.is_dir():
            raise CrlftError(
                f"no model directory {path}: give the folder written by `crlft train`, or a registered model as "
                "models:/NAME@ALIAS or models:/NAME/VERSION"
            )
        return path
    cfg = cfg or Config()
    ref = parse_model_uri(text)
    client, uri = client_for(cfg, tracking_uri)
    version = get_version(client, ref)
    target = _cache_dir(cfg, uri, ref.name, str(version.version))
    if (target / "config.json").is_file():
        return target
    base = version.tags.get(ADAPTER_OF_TAG)  # an adapter: its base is fetched first, and the adapter names it
    base_dir = resolve_model(base, cfg, tracking_uri=uri) if base else None
    return _download(version.source, target, uri, ref, base_dir)


def registered_version(uri: str, path: Path) -> str | None:
    """The registered version a folder `resolve_model(uri)` returned holds: None for a plain folder (its cache folder
    is named by the version, whether the URI names a version or an alias)."""
    if not is_model_uri(uri):
        return None
    return parse_model_uri(uri).version or path.name


def _cache_dir(cfg: Config, uri: str, name: str, version: str) -> Path:
    # Versions are immutable, but the same name/version on another store is another model: key by the store too.
    store = hashlib.sha256(uri.encode()).hexdigest()[:10]
    return Path(cfg.state_dir).resolve() / "models" / "registry" / store / tag_key_part(name) / str(version)


def _download(source: str, target: Path, uri: str, ref: ModelRef, base_dir: Path | None) -> Path:
    """Download into a temporary sibling, then rename: a reader never sees half a model, and two processes
    downloading the same version both end with one complete copy. An adapter's copy names `base_dir`, its base's."""
    import mlflow
    from mlflow.exceptions import MlflowException

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(scratch), tracking_uri=uri))
        if not (local / "config.json").is_file():
            raise CrlftError(f"{ref.uri} (source {source}) holds no model folder (no config.json): re-register it")
        if base_dir is not None:
            _name_base(local, base_dir)
        try:
            local.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not simply "another process finished first"
                raise
    except MlflowException as exc:
        raise mlflow_error(exc, f"download {ref.uri} from {source}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _name_base(adapter_dir: Path, base_dir: Path) -> None:
    """Point a downloaded adapter's crlft.json at its base's folder in this cache (where it was trained, it named
    the base's folder there)."""
    from crlft.export import META_FILE, AdapterBase, adapter_base

    meta_file = adapter_dir / META_FILE
    meta = json.loads(meta_file.read_text())
    meta["extra"]["adapter_base"] = asdict(AdapterBase(adapter_base(adapter_dir).fingerprint, str(base_dir)))
    meta_file.write_text(json.dumps(meta, indent=2, sort_keys=True))
