"""The packed data's description (DATA/stats.json: crlft.data.stats.DataStats, written by jobs.build_dataset) and its
agreement with the config and the base model: every mismatch is refused before Ray starts, with what to rebuild."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crlft import storage
from crlft.config import Config, Mode
from crlft.data.stats import STATS_FILE, DataStats
from crlft.errors import CrlftError
from crlft.train.batches import applied_rewards, reward_scale


@dataclass(frozen=True)
class DataDescription:
    root: str
    stats: DataStats
    conditions: list[str]
    reward_scale: dict[str, float]
    pack_len: int
    supervised_ratio: float
    fingerprint: str
    has_val: bool


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
    stats_path = f"{root}/{STATS_FILE}"
    stats = DataStats.read(root)
    _check_mode(stats_path, stats.mode, cfg.train.mode)
    unknown = sorted(set(stats.conditions) - set(cfg.classes))
    if unknown:
        raise CrlftError(f"{stats_path}: classes {unknown} are not in the configuration (classes: {list(cfg.classes)})")
    train_rewards = {name: cfg.reward(name) for name in cfg.classes}
    data_rewards = {c: stats.rewards.get(c, 1.0) for c in stats.conditions}
    scale = reward_scale(applied_rewards(stats.mode.uses_reward, data_rewards), train_rewards)
    tokens, supervised = stats.tokens, stats.supervised_tokens
    if not storage.has_parquet(f"{root}/train"):
        raise CrlftError(f"{root}/train holds no .parquet shards: rebuild the data (`crlft data build`)")
    return DataDescription(
        root=root,
        stats=stats,
        conditions=stats.conditions,
        reward_scale=scale,
        pack_len=stats.pack_len,
        supervised_ratio=supervised / tokens if tokens else 0.0,
        fingerprint=stats.fingerprint,
        has_val=storage.has_parquet(f"{root}/val"),
    )


def check_tokenizer(data: DataDescription, base_model: str, cfg: Config) -> None:
    """The base model's tokenizer + template must be the ones the data was tokenized with (same ids, same prompt)."""
    from crlft.data.template import Template, TemplateTokenizer
    from crlft.model import load_tokenizer

    expected = data.stats.fingerprints.get("tokenizer_template")
    if not expected:
        return
    tokenizer = load_tokenizer(base_model, cfg.template.end_of_turn, cfg.model.trust_remote_code)
    actual = TemplateTokenizer(Template.from_config(cfg), tokenizer).fingerprint()
    if actual != expected:
        raise CrlftError(
            f"{data.root}/{STATS_FILE}: the data was tokenized with tokenizer {data.stats.tokenizer!r} and its "
            f"template (fingerprint {expected}), but {base_model} with this config's template gives {actual}: "
            "rebuild the data with this model's tokenizer, or train the model the data was built for"
        )
