"""The MLflow model registry as the product uses it: every trained model is a version, evaluations are recorded on
it, and the `champion` alias only moves to a version that is at least as good on the same evaluation suite.

Works the same against the embedded SQLite store and a real tracking server (the URI comes from
`crlft.tracking.setup_mlflow`: --mlflow-uri > config > MLFLOW_TRACKING_URI > the local SQLite file). Every function
talks through its own `MlflowClient`, never the fluent API's global active run, so threads can promote at once.

Tags written on a model version (all strings, MLflow tags):
    crlft.mode, crlft.base_model, crlft.data_fingerprint, crlft.git_commit, crlft.template   lineage
    crlft.eval.suite                              the suite of the latest evaluation
    crlft.eval.<suite>.<metric>                   a recorded figure (float as text)
    crlft.eval.<suite>.run_id / .file             the evaluation run, the suite's file name
    crlft.promotion.*                             the latest promotion decision and both figures
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crlft.config import Config
from crlft.errors import CrlftError, first_line
from crlft.tracking import setup_mlflow

if TYPE_CHECKING:
    from mlflow import MlflowClient

MODELS_SCHEME = "models:/"
MODEL_ARTIFACT_PATH = "model"
TAG = "crlft."
EVAL_TAG = TAG + "eval."
PROMOTION_TAG = TAG + "promotion."
RETENTION_SUITE = "retention"  # where retention figures are recorded: crlft.eval.retention.<figure>
LOCK_SUFFIX = ".promotion-lock"
LOCK_TTL_S = 120.0  # a lock older than this is left over from a crashed promoter
LOCK_TIMEOUT_S = 300.0

# What MLflow accepts in tag keys (mlflow.utils.validation): anything else in a suite or metric name becomes "_".
_TAG_KEY_UNSAFE = re.compile(r"[^/\w.\- ]")
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
        """General accuracy against its base model's (crlft/retention.py); None when not measured."""
        return self.evaluations.get(RETENTION_SUITE, {}).get("retention")


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


# ---------------------------------------------------------------------------------------------------------------------
# Connection


def client_for(cfg: Config | None = None, tracking_uri: str | None = None) -> tuple[MlflowClient, str]:
    """A client on the resolved store; an unreachable server is a one-line CrlftError before anything is written."""
    from mlflow import MlflowClient

    # No progress bars or "View run at" lines on stdout, which carries the stage's own report.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    uri = setup_mlflow(cfg or Config(), tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _error_code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", ""))


def _mlflow_error(exc: Exception, doing: str) -> CrlftError:
    return CrlftError(f"MLflow refused to {doing}: {first_line(exc)}")


def tag_key_part(text: str) -> str:
    """A metric name made safe for an MLflow tag key."""
    return _TAG_KEY_UNSAFE.sub("_", text)


def suite_key(suite: str) -> str:
    """A suite name made safe for an MLflow tag key, without dots (they separate suite and metric in the key)."""
    return re.sub(r"[^\w\-]", "_", suite)


def suite_id(path: str | Path) -> str:
    """The identity of an evaluation suite: a hash of its content, so that "the same suite" means the same questions
    whatever the file is called or where it lives."""
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        raise CrlftError(f"{path}: cannot read the eval suite: {exc}") from None
    return f"suite-{digest[:12]}"


# ---------------------------------------------------------------------------------------------------------------------
# Register


def _git_commit() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True,
            cwd=Path(__file__).resolve().parent,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


def lineage_tags(model_dir: Path, cfg: Config) -> dict[str, str]:
    """mode, data fingerprint, base model, git commit and template of an exported model (from its crlft.json)."""
    from crlft.export import read_meta  # imports transformers: only when registering

    meta = read_meta(model_dir)
    extra = meta.extra
    fingerprints = extra.get("fingerprints")
    data_fingerprint = extra.get("data_fingerprint") or (
        fingerprints.get("inputs") if isinstance(fingerprints, dict) else None
    )
    base_model = extra.get("base_model") or meta.config.get("model", {}).get("base_model") or cfg.model.base_model
    return {
        TAG + "mode": meta.mode,
        TAG + "base_model": str(base_model),
        TAG + "data_fingerprint": str(data_fingerprint or "unknown"),
        TAG + "git_commit": str(extra.get("git_commit") or _git_commit()),
        TAG + "template": meta.template.fingerprint(),
    }


def _check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise CrlftError(f"no model directory {model_dir}: give the folder written by `crlft train` (its export)")
    if not (model_dir / "config.json").is_file():
        raise CrlftError(f"{model_dir} is not a Hugging Face model folder (no config.json): register an exported model")


def _lineage_run(client: MlflowClient, run_id: str | None, recorded_run_id: Any) -> Any:
    """The training run to link: the one given (it must exist), else the one the model records if this store has it."""
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            return client.get_run(run_id)
        except MlflowException:
            raise CrlftError(f"run {run_id} does not exist in this MLflow store: give the training run's id") from None
    if isinstance(recorded_run_id, str) and recorded_run_id:
        with contextlib.suppress(MlflowException):
            return client.get_run(recorded_run_id)
    return None


def register_model(
    model_dir: str | Path,
    cfg: Config,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    *,
    name: str | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Register `model_dir` as a new version of `name` (default cfg.registry.model_name); returns the version.

    Lineage: the version points at the training run `run_id` (default: the run named in the model's crlft.json, when
    this store has it). The version is created from the run's artifacts `model/` (MLflow 3 cannot register a plain
    folder through `runs:/`, only with create_model_version(source=<artifact uri>)): the trainer logs its export
    there; if the run has none, the folder is logged there now. Without a training run, a registration run is made to
    hold the folder. Lineage tags come from the model's crlft.json; `tags` add to or override them."""
    model_dir = Path(model_dir)
    _check_model_dir(model_dir)
    version_tags = {**lineage_tags(model_dir, cfg), **dict(tags or {})}
    name = name or cfg.registry.model_name
    client, _ = client_for(cfg, tracking_uri)
    from mlflow.exceptions import MlflowException

    from crlft.export import read_meta

    run = _lineage_run(client, run_id, read_meta(model_dir).extra.get("mlflow_run_id"))
    own_run = run is None
    try:
        if run is None:
            experiment = client.get_experiment_by_name(cfg.registry.experiment)
            run = client.create_run(
                experiment.experiment_id, run_name=f"register {name}", tags={TAG + "kind": "registration"}
            )
    except MlflowException as exc:
        raise _mlflow_error(exc, "create a registration run") from None
    run_id = run.info.run_id
    try:
        if own_run or not client.list_artifacts(run_id, MODEL_ARTIFACT_PATH):
            client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT_PATH)
        source = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"
        with contextlib.suppress(MlflowException):  # it exists already (or another process just made it)
            client.create_registered_model(name)
        version = client.create_model_version(name, source=source, run_id=run_id, tags=version_tags)
    except (MlflowException, OSError) as exc:
        if own_run:
            with contextlib.suppress(MlflowException):
                client.set_terminated(run_id, status="FAILED")
        raise _mlflow_error(exc, f"register {model_dir} as a version of {name}") from None
    if own_run:
        client.set_terminated(run_id)
    return str(version.version)


# ---------------------------------------------------------------------------------------------------------------------
# Resolve and load


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


def champion_uri(cfg: Config) -> str:
    """`models:/<registry.model_name>@<registry.alias>`: the version serving follows by default."""
    return ModelRef(cfg.registry.model_name, alias=cfg.registry.alias).uri


def parse_model_uri(uri: str) -> ModelRef:
    match = _MODEL_URI.match(uri)
    if not match:
        raise CrlftError(f"{uri!r} is not a registered model URI: write models:/NAME@ALIAS or models:/NAME/VERSION")
    return ModelRef(match["name"], version=match["version"], alias=match["alias"])


def get_version(client: MlflowClient, ref: ModelRef) -> Any:
    """The MLflow ModelVersion a reference names; a missing model, version or alias is a CrlftError that says
    what to do."""
    from mlflow.exceptions import MlflowException

    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        return client.get_model_version(ref.name, ref.version)
    except MlflowException as exc:
        if _error_code(exc) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise _mlflow_error(exc, f"look up {ref.uri}") from None
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


def _cache_dir(cfg: Config, uri: str, name: str, version: str) -> Path:
    # Versions are immutable, but the same name/version on another store is another model: key by the store too.
    store = hashlib.sha256(uri.encode()).hexdigest()[:10]
    return Path(cfg.state_dir).resolve() / "models" / "registry" / store / tag_key_part(name) / str(version)


def registered_version(uri: str, path: Path) -> str | None:
    """The registered version a folder `resolve_model(uri)` returned holds: None for a plain folder (its cache folder
    is named by the version, whether the URI names a version or an alias)."""
    if not uri.startswith(MODELS_SCHEME):
        return None
    return parse_model_uri(uri).version or path.name


def resolve_model(uri_or_dir: str | Path, cfg: Config | None = None, *, tracking_uri: str | None = None) -> Path:
    """A local model folder `transformers` can load: a plain folder as is, `models:/NAME@ALIAS` or
    `models:/NAME/VERSION` downloaded once into a cache under cfg.state_dir (reused afterwards)."""
    text = str(uri_or_dir)
    if not text.startswith(MODELS_SCHEME):
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
    return _download(version.source, target, uri, ref)


def _download(source: str, target: Path, uri: str, ref: ModelRef) -> Path:
    """Download into a temporary sibling, then rename: a reader never sees half a model, and two processes
    downloading the same version both end with one complete copy."""
    import mlflow
    from mlflow.exceptions import MlflowException

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(scratch), tracking_uri=uri))
        if not (local / "config.json").is_file():
            raise CrlftError(f"{ref.uri} (source {source}) holds no model folder (no config.json): re-register it")
        try:
            local.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not simply "another process finished first"
                raise
    except MlflowException as exc:
        raise _mlflow_error(exc, f"download {ref.uri} from {source}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------------------------
# Evaluations and listing


def _evaluations(tags: Mapping[str, str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key, value in tags.items():
        if not key.startswith(EVAL_TAG) or key.count(".") < 3:
            continue
        suite, _, metric = key[len(EVAL_TAG):].partition(".")
        with contextlib.suppress(ValueError):
            out.setdefault(suite, {})[metric] = float(value)
    return out


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
        evaluations=_evaluations(tags),
    )


def _aliases_by_version(client: MlflowClient, name: str) -> dict[str, tuple[str, ...]]:
    # search_model_versions leaves `aliases` empty on some stores; the registered model has them all.
    by_version: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    return {version: tuple(sorted(aliases)) for version, aliases in by_version.items()}


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


def record_evaluation(
    name: str,
    version: str,
    metrics: Mapping[str, float],
    suite: str,
    *,
    run_id: str | None = None,
    suite_file: str | None = None,
    cfg: Config | None = None,
    tracking_uri: str | None = None,
) -> None:
    """Record figures measured on `suite` as tags of the version (the evaluation run `run_id` holds the detail)."""
    from mlflow.exceptions import MlflowException

    client, _ = client_for(cfg, tracking_uri)
    get_version(client, ModelRef(name, version=str(version)))
    key = suite_key(suite)
    tags = {f"{EVAL_TAG}{key}.{tag_key_part(metric)}": repr(float(value)) for metric, value in metrics.items()
            if math.isfinite(float(value))}  # fmt: skip
    if run_id:
        tags[f"{EVAL_TAG}{key}.run_id"] = run_id
    if suite_file:
        tags[f"{EVAL_TAG}{key}.file"] = suite_file
    if key != RETENTION_SUITE:  # retention is beside the suite promotion compares on, never instead of it
        tags[EVAL_TAG + "suite"] = key  # last: a reader that sees the suite sees its figures
    try:
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version), key, value)
    except MlflowException as exc:
        raise _mlflow_error(exc, f"record the evaluation on {name} v{version}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Promotion


@contextlib.contextmanager
def promotion_lock(client: MlflowClient, name: str, timeout_s: float = LOCK_TIMEOUT_S,
                   ttl_s: float = LOCK_TTL_S) -> Iterator[None]:
    """Serialise promotions of `name` across threads, processes and machines.

    MLflow aliases have no compare-and-set, so "read champion, compare, set alias" races: two promoters can both read
    the old champion and the slower one may move the alias to the worse model. The only atomic primitive every store
    offers is "create a registered model with a unique name" (a primary key in the SQL stores behind both the SQLite
    file and a tracking server): creating `<name>.promotion-lock` is taking the lock, deleting it is releasing it.
    One mechanism for both stores, unlike a file lock (which a remote server's clients do not share); it needs no
    server-side support. A lock left by a crashed promoter expires after `ttl_s` (its expiry is a tag); breaking it is
    the one non-atomic step, acceptable because it only happens after a crash.
    """
    from mlflow.exceptions import MlflowException

    lock_name = name + LOCK_SUFFIX
    owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            client.create_registered_model(
                lock_name,
                tags={TAG + "lock.owner": owner, TAG + "lock.expires": repr(time.time() + ttl_s)},
                description=f"held while a promotion of {name} decides; delete it if no promotion is running",
            )
            break
        except MlflowException as exc:
            # MLflow's SQL store answers a clash on the name by reading the existing model, which is "not found"
            # when its holder released it in between: contention too, try again.
            if _error_code(exc) not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise _mlflow_error(exc, f"take the promotion lock of {name}") from None
        _break_if_stale(client, lock_name)
        if time.monotonic() > deadline:
            raise CrlftError(
                f"another promotion of {name} holds the lock (registered model {lock_name!r}) for over {timeout_s:.0f}"
                " s: wait for it, or delete that registered model if no promotion is running"
            )
        time.sleep(delay * (0.5 + uuid.uuid4().int % 100 / 100))  # jitter: threads do not retry in lock-step
        delay = min(delay * 2, 1.0)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock_name)


def _break_if_stale(client: MlflowClient, lock_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(lock_name).tags or {}
        expires = float(tags.get(TAG + "lock.expires", "inf"))
        if time.time() > expires:
            client.delete_registered_model(lock_name)
    except (MlflowException, ValueError):
        pass  # released meanwhile, or a lock someone made by hand: wait for it


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
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    run = client.create_run(
        experiment_id,
        run_name=f"promote {decision.name} v{decision.version}: {decision.decision}",
        tags={TAG + "kind": "promotion", TAG + "model_name": decision.name, TAG + "model_version": decision.version,
              **{PROMOTION_TAG + key: value for key, value in tags.items()}},  # fmt: skip
    )
    for key in ("candidate_value", "champion_value"):
        value = getattr(decision, key)
        if value is not None:
            client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    if decision.decision == "unchanged":
        return
    for key, value in tags.items():
        client.set_model_version_tag(decision.name, decision.version, PROMOTION_TAG + key, value)


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
    regardless and is recorded as forced. The decision and both
    figures are recorded whatever it is. Concurrent promotions are serialised by `promotion_lock`."""
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
            raise _mlflow_error(exc, f"promote {name} v{version}") from None
    return decision
