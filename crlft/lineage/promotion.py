"""Promotion: the `champion` alias only moves to a version that kept what its base model knew and is at least as
good as the champion on the same evaluation suite; every decision is recorded, and one decides at a time
(crlft/lineage/lock.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from crlft.config import Config
from crlft.errors import CrlftError
from crlft.lineage.lock import promotion_lock
from crlft.lineage.tags import PROMOTION_TAG, RETENTION_SUITE, TAG, suite_key
from crlft.lineage.versions import ModelVersionInfo, version_info
from crlft.tracking import client_for, mlflow_error, new_run

if TYPE_CHECKING:
    from mlflow import MlflowClient


@dataclass(frozen=True)
class PromotionDecision:
    name: str
    version: str
    alias: str
    metric: str
    suite: str | None
    candidate_value: float | None
    champion_version: str | None  # the champion before the decision
    champion_value: float | None
    decision: str  # "promoted" | "forced" | "refused" | "unchanged" (the candidate already is the champion)
    reason: str
    retention: float | None = None  # the candidate's, when measured
    min_retention: float | None = None  # the gate it was held to

    @property
    def is_champion(self) -> bool:
        """Whether the candidate holds the alias after the decision."""
        return self.decision != "refused"

    @property
    def forced(self) -> bool:
        return self.decision == "forced"

    def summary(self) -> str:
        return f"{self.name} v{self.version}: {self.decision} ({self.reason})"


def promote(
    name: str,
    version: str,
    metric: str | None = None,
    force: bool = False,
    *,
    suite: str | None = None,
    alias: str | None = None,
    cfg: Config | None = None,
    tracking_uri: str | None = None,
) -> PromotionDecision:
    """Move `alias` (default cfg.registry.alias, "champion") to `version` when its retention, where measured, is at
    least cfg.registry.min_retention and its `metric` (default cfg.registry.metric) on `suite` (default: the suite it
    was last evaluated on) is >= the champion's on that same suite, or when there is no champion; `force` moves it
    regardless and is recorded as forced. The decision and both figures are recorded whatever it is. Concurrent
    promotions are serialised by `promotion_lock`."""
    from mlflow.exceptions import MlflowException

    cfg = cfg or Config()
    metric = metric or cfg.registry.metric
    alias = alias or cfg.registry.alias
    client, _ = client_for(cfg, tracking_uri)
    candidate = version_info(name, str(version), client=client)
    with promotion_lock(client, name):
        try:
            # Read the champion inside the lock: what it is now, not what it was before we waited.
            champion_version = client.get_registered_model(name).aliases.get(alias)
            champion = version_info(name, str(champion_version), client=client) if champion_version else None
            candidate = version_info(name, str(version), client=client)
            decision = _decide(candidate, champion, alias, metric, suite, force, cfg.registry.min_retention)
            _record_decision(client, decision, cfg.registry.experiment)
            if decision.decision in ("promoted", "forced"):
                client.set_registered_model_alias(name, alias, decision.version)
        except MlflowException as exc:
            raise mlflow_error(exc, f"promote {name} v{version}") from None
    return decision


def _decide(candidate: ModelVersionInfo, champion: ModelVersionInfo | None, alias: str, metric: str,
            suite: str | None, force: bool, min_retention: float = 0.0) -> PromotionDecision:
    suite = suite_key(suite) if suite else candidate.latest_suite
    candidate_value = candidate.metric(metric, suite)
    champion_value = champion.metric(metric, suite) if champion else None

    def decision(kind: str, reason: str) -> PromotionDecision:
        return PromotionDecision(candidate.name, candidate.version, alias, metric, suite, candidate_value,
                                 champion.version if champion else None, champion_value, kind, reason,
                                 candidate.retention, min_retention)  # fmt: skip

    if champion is not None and champion.version == candidate.version:
        return decision("unchanged", f"already the {alias}")
    if candidate_value is None and not force:
        raise CrlftError(
            f"{candidate.name} v{candidate.version} has no {metric!r} recorded"
            + (f" on suite {suite}" if suite else "")
            + f": evaluate it first (`crlft eval --model models:/{candidate.name}/{candidate.version} --suite FILE`)"
            " or promote with --force"
        )
    if force:
        return decision("forced", "--force: no comparison")
    forgot = _forgot(candidate, min_retention)
    if forgot:
        return decision("refused", forgot)
    if champion is None:
        return decision("promoted", f"no {alias} yet; {metric}={candidate_value:.4f} on {suite}")
    if champion_value is None:
        return decision(
            "refused",
            f"the {alias} v{champion.version} has no {metric} on suite {suite}, so they cannot be compared: "
            f"evaluate it on the same suite (`crlft eval --model models:/{candidate.name}@{alias} --suite FILE`) "
            "or use --force",
        )
    assert candidate_value is not None
    if candidate_value >= champion_value:
        return decision("promoted", f"{metric} {candidate_value:.4f} >= {champion_value:.4f} of v{champion.version}")
    return decision("refused", f"{metric} {candidate_value:.4f} < {champion_value:.4f} of v{champion.version}")


def _forgot(candidate: ModelVersionInfo, min_retention: float) -> str | None:
    """Why the candidate is refused for forgetting what its base knew; None when it kept enough or was not measured."""
    retention = candidate.retention
    if retention is None or retention >= min_retention:
        return None
    figures = candidate.evaluations.get(RETENTION_SUITE, {})
    accuracy, base = figures.get("general_accuracy"), figures.get("base_general_accuracy")
    detail = f" (general accuracy {accuracy:.3f} against its base model's {base:.3f})" if (
        accuracy is not None and base is not None) else ""  # fmt: skip
    return (f"retention {retention:.3f} < registry.min_retention {min_retention:.2f}{detail}: it forgot what its base "
            "model knew; train with replay (data.replay), or promote anyway with --force or a lower "
            "--set registry.min_retention=...")


def _record_decision(client: MlflowClient, decision: PromotionDecision, experiment: str) -> None:
    """The decision as a run (the history of decisions) and as tags of the candidate version (its latest decision;
    left as they are when nothing changed, so the champion keeps the figures it was promoted with)."""

    def text(value: object) -> str:
        return "" if value is None else str(value)

    tags = {
        "decision": decision.decision,
        "forced": text(decision.forced).lower(),
        "alias": decision.alias,
        "metric": decision.metric,
        "suite": text(decision.suite),
        "candidate_value": text(decision.candidate_value),
        "champion_version": text(decision.champion_version),
        "champion_value": text(decision.champion_value),
        "retention": text(decision.retention),
        "min_retention": text(decision.min_retention),
        "reason": decision.reason,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    run = new_run(
        client, experiment, f"promote {decision.name} v{decision.version}: {decision.decision}",
        {TAG + "kind": "promotion", TAG + "model_name": decision.name, TAG + "model_version": decision.version,
         **{PROMOTION_TAG + key: value for key, value in tags.items()}},
    )  # fmt: skip
    for key in ("candidate_value", "champion_value"):
        value = getattr(decision, key)
        if value is not None:
            client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    if decision.decision == "unchanged":
        return
    for key, value in tags.items():
        client.set_model_version_tag(decision.name, decision.version, PROMOTION_TAG + key, value)
