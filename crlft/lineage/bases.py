"""The crlft bases of adapters in the registry: an adapter's base registered once (as a version of
registry.base_model_name, tagged with its fingerprint) when the first adapter trained on it is, and named on every
adapter version (crlft/export.py says what a crlft base is; crlft/lineage/cache.py fetches an adapter's with it)."""

from __future__ import annotations

from crlft.config import Config
from crlft.lineage.tags import ADAPTER_OF_TAG, BASE_FINGERPRINT_TAG
from crlft.tracking import client_for, mlflow_error


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
