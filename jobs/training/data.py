"""The packed data's description (DATA/stats.json, written by jobs.build_dataset) and its agreement with the config
and the base model: every mismatch is refused before Ray starts, with what to rebuild."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crlft import storage
from crlft.config import Config, Mode
from crlft.errors import CrlftError
from crlft.train.batches import applied_rewards, reward_scale


@dataclass(frozen=True)
class DataDescription:
    root: str
    stats: dict[str, Any]
    conditions: list[str]
    reward_scale: dict[str, float]
    pack_len: int
    supervised_ratio: float
    fingerprint: str
    has_val: bool


@dataclass(frozen=True)
class _Stats:
    """The fields of stats.json that training reads."""

    raw: dict[str, Any]
    mode: Mode
    conditions: list[str]
    rewards: dict[str, float]
    pack_len: int
    per_class: dict[str, dict[str, Any]]


def _read_stats(stats_path: str, root: str) -> _Stats:
    text = storage.read_text(stats_path)
    if text is None:
        raise CrlftError(f"{stats_path} does not exist: build the data first (`crlft data build --out {root}`)")
    try:
        stats = json.loads(text)
        return _Stats(
            raw=stats,
            mode=Mode(stats["mode"]),
            conditions=[str(c) for c in stats["conditions"]],
            rewards={str(k): float(v) for k, v in stats["rewards"].items()},
            pack_len=int(stats["pack_len"]),
            per_class=dict(stats["per_class"]),
        )
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as error:
        raise CrlftError(f"{stats_path}: not a crlft data description ({error!r}); rebuild the data") from None


def _check_mode(stats_path: str, data_mode: Mode, mode: Mode) -> None:
    if data_mode.uses_condition == mode.uses_condition:
        return

    def has(m: Mode) -> str:
        return "with" if m.uses_condition else "without"

    raise CrlftError(
        f"{stats_path}: the data was built for mode {data_mode.value} ({has(data_mode)} the condition in the "
        f"prompt) but training mode {mode.value} trains {has(mode)} it: rebuild the data with --mode {mode.value}"
    )


def describe_data(data_dir: str | Path, cfg: Config) -> DataDescription:
    """Read DATA/stats.json and check that the data can train `cfg.train.mode`; errors say what to rebuild."""
    root = storage.location(data_dir)
    stats_path = f"{root}/stats.json"
    stats = _read_stats(stats_path, root)
    _check_mode(stats_path, stats.mode, cfg.train.mode)
    unknown = sorted(set(stats.conditions) - set(cfg.classes))
    if unknown:
        raise CrlftError(f"{stats_path}: classes {unknown} are not in the configuration (classes: {list(cfg.classes)})")
    train_rewards = {name: cfg.reward(name) for name in cfg.classes}
    data_rewards = {c: stats.rewards.get(c, 1.0) for c in stats.conditions}
    scale = reward_scale(applied_rewards(stats.mode.uses_reward, data_rewards), train_rewards)
    tokens = sum(int(c.get("tokens", 0)) for c in stats.per_class.values())
    supervised = sum(int(c.get("supervised_tokens", 0)) for c in stats.per_class.values())
    if not storage.has_parquet(f"{root}/train"):
        raise CrlftError(f"{root}/train holds no .parquet shards: rebuild the data (`crlft data build`)")
    fingerprints = stats.raw.get("fingerprints", {})
    return DataDescription(
        root=root,
        stats=stats.raw,
        conditions=stats.conditions,
        reward_scale=scale,
        pack_len=stats.pack_len,
        supervised_ratio=supervised / tokens if tokens else 0.0,
        fingerprint=hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()[:16],
        has_val=storage.has_parquet(f"{root}/val"),
    )


def check_tokenizer(data: DataDescription, base_model: str, cfg: Config) -> None:
    """The base model's tokenizer + template must be the ones the data was tokenized with (same ids, same prompt)."""
    from crlft.model import load_tokenizer
    from crlft.template import Template, TemplateTokenizer

    expected = data.stats.get("fingerprints", {}).get("tokenizer_template")
    if not expected:
        return
    tokenizer = load_tokenizer(base_model, cfg.template.end_of_turn, cfg.model.trust_remote_code)
    actual = TemplateTokenizer(Template.from_config(cfg), tokenizer).fingerprint()
    if actual != expected:
        raise CrlftError(
            f"{data.root}/stats.json: the data was tokenized with tokenizer {data.stats.get('tokenizer')!r} and its "
            f"template (fingerprint {expected}), but {base_model} with this config's template gives {actual}: "
            "rebuild the data with this model's tokenizer, or train the model the data was built for"
        )
