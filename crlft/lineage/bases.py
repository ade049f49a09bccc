"""The crlft bases of adapters in the registry: an adapter's base registered once (as a version of
registry.base_model_name, tagged with its fingerprint) when the first adapter trained on it is, and named on every
adapter version (crlft/export.py says what a crlft base is; crlft/lineage/cache.py fetches an adapter's with it). Which
registered names' champions are adapters, and on which base, is what a replica serving serve.adapters' `*` follows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from crlft.config import Config
from crlft.lineage.tags import ADAPTER_OF_TAG, BASE_FINGERPRINT_TAG
from crlft.tracking import client_for, error_code, mlflow_error

if TYPE_CHECKING:
    from mlflow import MlflowClient


def registered_base(fingerprint: str, cfg: Config, tracking_uri: str | None = None) -> str | None:
    """The version of registry.base_model_name holding the base `fingerprint`, if one does."""
    from mlflow.exceptions import MlflowException

    client, _ = client_for(cfg, tracking_uri)
    name = cfg.registry.base_model_name
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as exc:
        raise mlflow_error(exc, f"look up the base {fingerprint} in {name}") from None
    found = [int(v.version) for v in versions if v.tags.get(BASE_FINGERPRINT_TAG) == fingerprint]
    return str(min(found)) if found else None


def adapters_on(base_uri: str, cfg: Config, tracking_uri: str | None = None) -> list[str]:
    """The adapter versions registered on the base version `base_uri` (models:/NAME/VERSION), as NAME/VERSION."""
    from mlflow.exceptions import MlflowException

    client, _ = client_for(cfg, tracking_uri)
    try:
        versions = client.search_model_versions(f"tags.`{ADAPTER_OF_TAG}` = '{base_uri}'")
    except MlflowException as exc:
        raise mlflow_error(exc, f"look up the adapters on {base_uri}") from None
    return sorted(f"{v.name}/{v.version}" for v in versions)


@dataclass(frozen=True)
class ChampionAdapter:
    """A registered name whose champion is an adapter: that version, and the fingerprint of the base it runs on."""

    name: str
    version: str
    base_fingerprint: str


def champion_adapters(cfg: Config, tracking_uri: str | None = None,
                      fingerprint: str | None = None) -> list[ChampionAdapter]:
    """Every registered name whose champion (registry.alias) is an adapter (given `fingerprint`: an adapter on that
    base), by name. A name without a champion, or whose champion is a whole model, is not one."""
    from mlflow.exceptions import MlflowException

    client, _ = client_for(cfg, tracking_uri)
    wanted = f"tags.`{ADAPTER_OF_TAG}` LIKE '%'"  # every adapter version names its base
    if fingerprint is not None:
        wanted += f" AND tags.`{BASE_FINGERPRINT_TAG}` = '{fingerprint}'"
    try:
        adapters = {(v.name, str(v.version)): v.tags[BASE_FINGERPRINT_TAG] for v in client.search_model_versions(wanted)
                    if BASE_FINGERPRINT_TAG in v.tags}
        champions = {name: _alias_version(client, name, cfg.registry.alias) for name in {name for name, _ in adapters}}
    except MlflowException as exc:
        raise mlflow_error(exc, "look up the champions that are adapters") from None
    return [ChampionAdapter(name, version, adapters[name, version]) for name, version in sorted(champions.items())
            if version is not None and (name, version) in adapters]


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version `alias` of `name` points at; None where it has no such alias (or was deleted since it was found)."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_registered_model(name).aliases.get(alias)
    except MlflowException as exc:
        if error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
    return None if version is None else str(version)
