"""What the ablation trains: the variants (the paper's Table 2 rows, each with or without replay), which ones a
command chooses, the data and run configuration of each, the step budget, and the suite it trains on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from crlft.config import Config, DataConfig, Mode
from crlft.errors import CrlftError

EXPERIMENT = "crlft-ablation"
REPLAY_SUFFIX = "+replay"  # a variant trained with replay: `crlft+replay`
REPLAY_CHOICES = ("both", "on", "off")


@dataclass(frozen=True)
class Variant:
    name: str
    mode: Mode
    data: str  # "all", "expert" or "suboptimal": which classes the training data keeps
    paper: float  # the paper's Table 2 average (AlpacaEval, MT-bench, Vicuna-bench)
    meaning: str
    replay: bool = False  # the base model's own answers to general prompts mixed into the data (data.replay.enabled)

    def data_key(self) -> str:
        """Variants with the same key train on the same tokenized data (only the reward scaling differs)."""
        template = "conditioned" if self.mode.uses_condition else "plain"
        key = template if self.data == "all" else f"{template}-{self.data}"
        return f"{key}-replay" if self.replay else key

    def with_replay(self) -> Variant:
        return self if self.replay else replace(self, name=self.name + REPLAY_SUFFIX, replay=True,
                                                meaning=self.meaning + ", with replay")  # fmt: skip

    def slug(self) -> str:
        """The name as folders and MLflow metric keys take it (no `+`)."""
        return self.name.replace(REPLAY_SUFFIX, "_replay")


VARIANTS: tuple[Variant, ...] = (
    Variant("crlft", Mode.crlft, "all", 77.3, "C-RLFT: class condition in the prompt + reward-weighted loss"),
    Variant("conditioned", Mode.conditioned, "all", 74.0, "condition only (every reward 1)"),
    Variant("weighted", Mode.weighted, "all", 60.5, "reward weights only (no condition in the prompt)"),
    Variant("sft", Mode.sft, "all", 52.7, "plain SFT on the whole mixture"),
    Variant("expert_only", Mode.sft, "expert", 64.5, "SFT on the expert (GPT4) conversations only"),
    Variant("suboptimal_only", Mode.sft, "suboptimal", 42.8, "SFT on the sub-optimal (GPT3) conversations only"),
)
VARIANTS_BY_NAME = {v.name: v for v in VARIANTS}
MODES = tuple(v.name for v in VARIANTS if v.data == "all")  # the four ways to train on the whole mixture
REAL_MODEL_VARIANTS = ("crlft", "conditioned", "sft")  # the default from a real base model (--base-model)
VARIANT_CHOICES = (*VARIANTS_BY_NAME, *(name + REPLAY_SUFFIX for name in VARIANTS_BY_NAME))


def variant_named(name: str) -> Variant:
    """The variant a name stands for: `crlft`, or `crlft+replay` (crlft with replay)."""
    plain = name.removesuffix(REPLAY_SUFFIX)
    if plain not in VARIANTS_BY_NAME:
        raise CrlftError(f"unknown variant {name}: choose from {', '.join(VARIANT_CHOICES)}")
    variant = VARIANTS_BY_NAME[plain]
    return variant.with_replay() if name != plain else variant


def choose_variants(names: Sequence[str], replay: str) -> list[Variant]:
    """The variants to train, in order: each plain name without replay (`off`), with it (`on`) or both, one after the
    other (`both`); a name with the suffix as named."""
    if replay not in REPLAY_CHOICES:
        raise CrlftError(f"--replay {replay}: choose from {', '.join(REPLAY_CHOICES)}")
    chosen: list[Variant] = []
    for name in names:
        variant = variant_named(name)
        if variant.replay:
            candidates = [variant]
        else:
            candidates = [variant] * (replay != "on") + [variant.with_replay()] * (replay != "off")
        chosen += [v for v in candidates if v not in chosen]
    return chosen


def ablation_variants(variants: Sequence[str] | None, replay: str | None,
                      pretrained: bool) -> tuple[list[Variant], str]:
    """The variants to train and the replay setting: by default every variant for the tiny model, without replay,
    and REAL_MODEL_VARIANTS from a pretrained base, each without and with replay. The tiny model has no replay."""
    replay = replay or ("both" if pretrained else "off")
    chosen = choose_variants(list(variants or (REAL_MODEL_VARIANTS if pretrained else VARIANTS_BY_NAME)), replay)
    if not pretrained and any(v.replay for v in chosen):
        raise CrlftError("replay needs a pretrained base model (--base-model): the tiny model knows nothing to keep")
    return chosen, replay


# ---------------------------------------------------------------------------------------------------------------------
# Configurations


def kept_classes(variant: Variant, cfg: Config) -> list[str] | None:
    if variant.data == "expert":
        return [cfg.inference_condition]
    if variant.data == "suboptimal":
        return [cfg.suboptimal_condition]
    return None


def variant_data(variant: Variant, cfg: Config) -> DataConfig:
    """cfg.data for the variant: its class filter, and replay on or off as the variant says (never auto)."""
    replay = cfg.data.replay.model_copy(update={"enabled": variant.replay})
    return cfg.data.model_copy(update={"only_classes": kept_classes(variant, cfg), "replay": replay})


def data_config(variant: Variant, cfg: Config) -> Config:
    """The configuration the variant's data is built with: its template (condition or not), its class filter and its
    replay. Rewards baked into the data are those of crlft (conditioned template) or sft (plain); training rescales
    them."""
    mode = Mode.crlft if variant.mode.uses_condition else Mode.sft
    return cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"mode": mode}),
        "data": variant_data(variant, cfg),
    })  # fmt: skip


def run_config(variant: Variant, cfg: Config, seed: int, steps: int, steps_per_epoch: int, out: Path) -> Config:
    """The variant's training configuration: its mode, the seed, exactly `steps` optimiser steps (as many epochs as
    that takes on its data), checkpoints and MLflow runs kept with the ablation."""
    train = cfg.train.model_copy(update={
        "mode": variant.mode, "seed": seed, "max_steps": steps, "epochs": math.ceil(steps / steps_per_epoch),
        "checkpoint_every": 0, "num_to_keep": 1, "storage_path": str(out / "ray_results"),
    })  # fmt: skip
    data = variant_data(variant, cfg)
    registry = cfg.registry.model_copy(update={"experiment": EXPERIMENT})
    return cfg.model_copy(update={"train": train, "data": data, "registry": registry})


def steps_per_epoch(stats: dict[str, Any], cfg: Config) -> int:
    """Optimiser steps in one pass over the data, as jobs.train plans them."""
    from crlft.train.schedule import plan_steps

    bins = int(stats["splits"]["train"]["bins"])
    return plan_steps(bins, cfg.train.workers, cfg.train.grad_accum, 1, None).steps_per_epoch


def recipe_steps(stats: dict[str, Any], cfg: Config) -> int:
    """The recipe's own budget: its epochs over the whole mixture (what `crlft demo` trains)."""
    return cfg.train.max_steps or cfg.train.epochs * steps_per_epoch(stats, cfg)


# ---------------------------------------------------------------------------------------------------------------------
# The suite


def suite_files(folder: Path) -> dict[str, Path | None]:
    """train.jsonl and eval.jsonl of a suite folder, and heldout.jsonl where it has one (a facts set has none: no
    silhouette then)."""
    files = {name: folder / f"{name}.jsonl" for name in ("train", "eval")}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise CrlftError(f"--suite {folder}: missing {', '.join(missing)} (write a suite with `crlft synth --out DIR`)")
    heldout = folder / "heldout.jsonl"
    return {**files, "heldout": heldout if heldout.is_file() else None}


def write_facts_suite(folder: Path) -> dict[str, Path | None]:
    """crlft/synth/facts.py's set (seed 0, its defaults) written into `folder`: train.jsonl and eval.jsonl."""
    from crlft.synth.facts import write_facts

    return {**write_facts(folder, seed=0), "heldout": None}
