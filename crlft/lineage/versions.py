"""Registered model versions: how the user names one (`models:/NAME@ALIAS`, `models:/NAME/VERSION`), looking it up,
and what a version carries (aliases, lineage tags, recorded evaluations)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crlft.config import Config
from crlft.errors import CrlftError
from crlft.lineage.tags import EVAL_TAG, RETENTION_SUITE, read_evaluations
from crlft.tracking import client_for, error_code, mlflow_error

if TYPE_CHECKING:
    from mlflow import MlflowClient

MODELS_SCHEME = "models:/"

_MLFLOW_ID = re.compile(r"^[0-9a-f]{32}$")  # a run id, safe to put in a search filter
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))/?$")


@dataclass(frozen=True)
class ModelRef:
    """A registered model version, as named by the user (`models:/NAME@ALIAS` or `models:/NAME/VERSION`)."""

    name: str
    version: str | None = None
    alias: str | None = None

    @property
    def uri(self) -> str:
        where = f"@{self.alias}" if self.alias else f"/{self.version}"
        return f"{MODELS_SCHEME}{self.name}{where}"


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: str
    aliases: tuple[str, ...]
    run_id: str | None
    source: str
    created_ms: int
    tags: dict[str, str]
    # suite -> metric -> value, from the crlft.eval.* tags
    evaluations: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def latest_suite(self) -> str | None:
        return self.tags.get(EVAL_TAG + "suite")

    def metric(self, metric: str, suite: str | None = None) -> float | None:
        """The metric on `suite` (default: the suite of the latest evaluation); None when not recorded."""
        suite = suite or self.latest_suite
        return self.evaluations.get(suite, {}).get(metric) if suite else None

    @property
    def retention(self) -> float | None:
        """General accuracy against its base model's (crlft/eval/retention.py); None when not measured."""
        return self.evaluations.get(RETENTION_SUITE, {}).get("retention")


def is_model_uri(text: str) -> bool:
    """Whether `text` names a registered model (`models:/...`) rather than a folder."""
    return text.startswith(MODELS_SCHEME)


def parse_model_uri(uri: str) -> ModelRef:
    match = _MODEL_URI.match(uri)
    if not match:
        raise CrlftError(f"{uri!r} is not a registered model URI: write models:/NAME@ALIAS or models:/NAME/VERSION")
    return ModelRef(match["name"], version=match["version"], alias=match["alias"])


def champion_uri(cfg: Config) -> str:
    """`models:/<registry.model_name>@<registry.alias>`: the version serving follows by default."""
    return ModelRef(cfg.registry.model_name, alias=cfg.registry.alias).uri


def get_version(client: MlflowClient, ref: ModelRef) -> Any:
    """The MLflow ModelVersion a reference names; a missing model, version or alias is a CrlftError that says
    what to do."""
    from mlflow.exceptions import MlflowException

    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        return client.get_model_version(ref.name, ref.version)
    except MlflowException as exc:
        if error_code(exc) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise mlflow_error(exc, f"look up {ref.uri}") from None
    try:
        registered = client.get_registered_model(ref.name)
    except MlflowException:
        raise CrlftError(
            f"{ref.uri} does not exist: there is no registered model {ref.name!r} in this MLflow store "
            "(check --mlflow-uri / MLFLOW_TRACKING_URI; `crlft models` lists what is registered)"
        ) from None
    missing = f"alias {ref.alias!r}" if ref.alias else f"version {ref.version}"
    aliases = ", ".join(f"{alias}->v{version}" for alias, version in sorted(registered.aliases.items())) or "none"
    raise CrlftError(
        f"{ref.uri} does not exist: {ref.name!r} has no {missing} (aliases: {aliases}); `crlft models {ref.name}` "
        "lists its versions, `crlft promote` sets the champion"
    )


def trained_version(client: MlflowClient, name: str, model_dir: str | Path) -> ModelRef | None:
    """The version of `name` that `crlft train` registered for this exported folder (found through the training run
    its crlft.json names); None for a folder trained elsewhere or registered in another store."""
    from mlflow.exceptions import MlflowException

    from crlft.export import read_meta

    run_id = read_meta(model_dir).extra.get("mlflow_run_id") if Path(model_dir).is_dir() else None
    if not isinstance(run_id, str) or not _MLFLOW_ID.match(run_id):
        return None
    try:
        versions = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    except MlflowException:
        return None
    latest = max((int(v.version) for v in versions), default=None)
    return ModelRef(name, version=str(latest)) if latest is not None else None


def version_info(name: str, version: str, cfg: Config | None = None, *, tracking_uri: str | None = None,
                 client: MlflowClient | None = None) -> ModelVersionInfo:
    client = client or client_for(cfg, tracking_uri)[0]
    found = get_version(client, ModelRef(name, version=str(version)))
    return _info(found, _aliases_by_version(client, name).get(str(found.version), ()))


def list_versions(name: str, cfg: Config | None = None, *, tracking_uri: str | None = None) -> list[ModelVersionInfo]:
    """Every version of `name`, oldest first, with aliases, lineage tags and recorded evaluations."""
    from mlflow.exceptions import MlflowException

    client, _ = client_for(cfg, tracking_uri)
    try:
        aliases = _aliases_by_version(client, name)
    except MlflowException:
        raise CrlftError(
            f"no registered model {name!r} in this MLflow store: train one (`crlft train` / `crlft pipeline`) or "
            "register a folder with `crlft eval --model DIR --suite FILE --register-as NAME`"
        ) from None
    versions = client.search_model_versions(f"name = '{name}'")
    infos = [_info(v, aliases.get(str(v.version), ())) for v in versions]
    return sorted(infos, key=lambda info: int(info.version))


def _info(version: Any, aliases: tuple[str, ...]) -> ModelVersionInfo:
    tags = dict(version.tags or {})
    return ModelVersionInfo(
        name=version.name,
        version=str(version.version),
        aliases=aliases,
        run_id=version.run_id or None,
        source=version.source,
        created_ms=int(version.creation_timestamp or 0),
        tags=tags,
        evaluations=read_evaluations(tags),
    )


def _aliases_by_version(client: MlflowClient, name: str) -> dict[str, tuple[str, ...]]:
    # search_model_versions leaves `aliases` empty on some stores; the registered model has them all.
    by_version: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    return {version: tuple(sorted(aliases)) for version, aliases in by_version.items()}
