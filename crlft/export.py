"""The exported model: a Hugging Face `save_pretrained` folder (safetensors) with the tokenizer, whose chat template
is the training template, and `crlft.json` naming the conditions, the inference condition, the mode and the config.
Plain `transformers` (and vLLM) load it without this project; `ModelFolder` holds what crlft itself reads from it
(the template it was trained with, the tokens that end an answer, the context), for every engine and decoder, and
`load_exported` adds the loaded model.

An adapter (`train.lora.merge: false`) is exported as a PEFT adapter folder instead: the adapter's weights, the
tokenizer and crlft.json as above, and its base's config.json and generation_config.json (what crlft and vLLM read of
the model it runs on). Its base is the "crlft base": the pretrained model with the end-of-turn token added, written
once per content under <state_dir>/models/bases/<fingerprint> (`write_base`) and shared by every adapter trained on
it, since vLLM serves adapters only on their base's vocabulary. crlft.json names it (`AdapterBase`);
crlft/lineage/bases.py finds it, on disk or in the registry.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from transformers import AutoConfig, GenerationConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from crlft.config import Config
from crlft.data.template import Template, TemplateTokenizer
from crlft.errors import CrlftError
from crlft.inference.sampling import context_length, stop_token_ids

META_FILE = "crlft.json"
ADAPTER_FILE = "adapter_config.json"  # PEFT's: the folder holds an adapter, not a whole model
BASE_FILES = ("config.json", "generation_config.json")  # an adapter folder's copy of what its base's config says


@dataclass(frozen=True)
class ModelMeta:
    template: Template
    conditions: dict[str, float]  # class -> reward
    mode: str
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # base model, data fingerprint, steps, ...

    @property
    def inference_condition(self) -> str:
        return self.template.inference_condition

    def to_json(self) -> dict[str, Any]:
        return {
            "template": asdict(self.template),
            "conditions": self.conditions,
            "inference_condition": self.inference_condition,
            "mode": self.mode,
            "config": self.config,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelMeta:
        return cls(
            template=Template(**data["template"]),
            conditions={str(k): float(v) for k, v in data["conditions"].items()},
            mode=str(data["mode"]),
            config=data.get("config", {}),
            extra=data.get("extra", {}),
        )

    @classmethod
    def from_config(cls, cfg: Config, **extra: Any) -> ModelMeta:
        return cls(
            template=Template.from_config(cfg),
            conditions={name: spec.reward for name, spec in cfg.classes.items()},
            mode=cfg.train.mode.value,
            config=cfg.dump(),
            extra=extra,
        )


@dataclass(frozen=True)
class AdapterBase:
    """The crlft base an adapter was trained on: its content's fingerprint, and where it was written."""

    fingerprint: str
    path: str

    @classmethod
    def of(cls, meta: ModelMeta) -> AdapterBase | None:
        base = meta.extra.get("adapter_base")
        return cls(str(base["fingerprint"]), str(base["path"])) if isinstance(base, dict) else None

    def folder(self, state_dir: str | Path | None = None) -> Path:
        """The base's folder on this machine: where it was written, or under `state_dir`'s bases. An adapter from the
        registry names the base its download cache fetched with it (crlft/lineage/cache.py)."""
        places = [Path(self.path)] + ([Path(state_dir).resolve() / "models" / "bases" / self.fingerprint]
                                      if state_dir else [])
        for place in places:
            if (place / "config.json").is_file():
                return place
        raise CrlftError(f"the base {self.fingerprint} of this adapter is not at {' nor '.join(map(str, places))}: "
                         "register the adapter where it was trained (its base is registered with it) and load it as "
                         "models:/NAME@ALIAS, which fetches both")


def adapter_base(adapter_dir: str | Path) -> AdapterBase:
    base = AdapterBase.of(read_meta(adapter_dir))
    if base is None:
        raise CrlftError(f"{adapter_dir}: an adapter folder whose crlft.json names no base; export it with crlft train")
    return base


def is_adapter(model_dir: str | Path) -> bool:
    return (Path(model_dir) / ADAPTER_FILE).is_file()


def adapter_rank(adapter_dir: str | Path) -> int:
    """The LoRA rank of an adapter folder (PEFT's `r`)."""
    return int(json.loads((Path(adapter_dir) / ADAPTER_FILE).read_text())["r"])


def is_model_folder(model_dir: str | Path) -> bool:
    """A whole model or an adapter folder: both carry config.json (an adapter its base's)."""
    return (Path(model_dir) / "config.json").is_file()


def save_exported(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path,
                  meta: ModelMeta) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.chat_template = meta.template.chat_template()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / META_FILE).write_text(json.dumps(meta.to_json(), indent=2, sort_keys=True))
    return out


def content_fingerprint(folder: Path) -> str:
    """What a model folder holds, weights and tokenizer, as a hash of its files' bytes (crlft.json, which records the
    run that wrote it, left out)."""
    digest = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name != META_FILE:
            digest.update(f.name.encode())
            with f.open("rb") as data:
                for block in iter(lambda: data.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def write_base(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: Config) -> Path:
    """The crlft base of `model` (the pretrained model with the end-of-turn token, before any adapter) at
    <state_dir>/models/bases/<fingerprint>: written once, the same folder for every adapter trained on it."""
    bases = Path(cfg.state_dir).resolve() / "models" / "bases"
    bases.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".base-", dir=bases))
    try:
        save_exported(model, tokenizer, scratch, ModelMeta.from_config(cfg, crlft_base=True))
        target = bases / content_fingerprint(scratch)
        if not target.is_dir():
            try:
                scratch.rename(target)
            except OSError:
                if not target.is_dir():  # not simply "another export wrote it first"
                    raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def save_adapter(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path, meta: ModelMeta,
                 base_dir: Path) -> Path:
    """A PEFT model's adapter as an exported adapter folder on the crlft base at `base_dir` (see the module's note);
    plain `transformers` with `peft` loads it while that folder exists."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.chat_template = meta.template.chat_template()
    for adapter in model.peft_config.values():
        adapter.base_model_name_or_path = str(base_dir)
    model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
    tokenizer.save_pretrained(out)
    for name in BASE_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, out / name)
    base = AdapterBase(base_dir.name, str(base_dir))
    meta = replace(meta, extra={**meta.extra, "adapter_base": asdict(base)})
    (out / META_FILE).write_text(json.dumps(meta.to_json(), indent=2, sort_keys=True))
    return out


def read_meta(model_dir: str | Path) -> ModelMeta:
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        # Any chat model can be served and evaluated: it gets the default (paper) template.
        return ModelMeta.from_config(Config())
    try:
        return ModelMeta.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CrlftError(f"{path}: not a valid crlft model description ({exc}); re-export the model") from None


def _eos_token_ids(path: str | Path) -> int | list[int] | None:
    """What the model's generation config ends a sequence on (transformers reads the same file)."""
    try:
        return GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json: the end-of-turn token alone
        return None


@dataclass(frozen=True)
class ModelFolder:
    """What crlft reads itself from a model folder, one reading for every engine and decoder: the template (crlft.json),
    the tokenizer with it, the tokens that end an answer (`stop_token_ids`) and the context (`context_length`)."""

    meta: ModelMeta
    template_tokenizer: TemplateTokenizer
    stop_ids: list[int]
    context_len: int  # the one context limit: serving, evaluation and replay all fit to it

    @classmethod
    def read(cls, path: str | Path, template_tokenizer: TemplateTokenizer | None = None) -> ModelFolder:
        """From the folder's files alone, no weights loaded (vLLM loads its own). `template_tokenizer` serves in place
        of the folder's own template and tokenizer (replay asks a base model under the fine-tune's template)."""
        from crlft.model import load_tokenizer

        meta = read_meta(path)
        if template_tokenizer is None:
            template_tokenizer = TemplateTokenizer(meta.template, load_tokenizer(str(path), meta.template.end_of_turn))
        return cls.of(meta, template_tokenizer, AutoConfig.from_pretrained(path), _eos_token_ids(path))

    @classmethod
    def of(cls, meta: ModelMeta, template_tokenizer: TemplateTokenizer, model_config: PretrainedConfig,
           eos: int | list[int] | None) -> ModelFolder:
        """From the model config and end-of-sequence token(s), as the files give them or a loaded model holds them."""
        return cls(meta, template_tokenizer, stop_token_ids(template_tokenizer, eos),
                   context_length(model_config, template_tokenizer.tokenizer))


@dataclass
class ExportedModel:
    """A loaded model with its folder's facts, taken from the loaded model (its config and generation config)."""

    model: PreTrainedModel
    folder: ModelFolder
    path: Path

    @property
    def meta(self) -> ModelMeta:
        return self.folder.meta

    @property
    def template_tokenizer(self) -> TemplateTokenizer:
        return self.folder.template_tokenizer

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.folder.template_tokenizer.tokenizer

    @property
    def stop_ids(self) -> list[int]:
        return self.folder.stop_ids

    def under(self, template: Template) -> ExportedModel:
        """The model served with `template` in place of its own (replay asks a base model under the fine-tune's)."""
        return replace(self, folder=_loaded_folder(self.model, self.meta, TemplateTokenizer(template, self.tokenizer)))


def _loaded_folder(model: PreTrainedModel, meta: ModelMeta, template_tokenizer: TemplateTokenizer) -> ModelFolder:
    return ModelFolder.of(meta, template_tokenizer, model.config, model.generation_config.eos_token_id)


def load_exported(model_dir: str | Path, **load_kwargs: Any) -> ExportedModel:
    from crlft.model import load_model_and_tokenizer

    meta = read_meta(model_dir)
    adapter = is_adapter(model_dir)
    weights = adapter_base(model_dir).folder() if adapter else model_dir
    model, tokenizer = load_model_and_tokenizer(str(weights), end_of_turn=meta.template.end_of_turn, **load_kwargs)
    if adapter:  # folded into its base's weights: the model vLLM's adapter applies
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(model_dir)).merge_and_unload()
    return ExportedModel(model, _loaded_folder(model, meta, TemplateTokenizer(meta.template, tokenizer)),
                         Path(model_dir))


def export_checkpoint(checkpoint_dir: str | Path, base_model: str, out_dir: str | Path, cfg: Config,
                      meta_extra: Mapping[str, Any] | None = None) -> Path:
    """The model of a training checkpoint as an exported model folder: the base model, LoRA applied if the run used
    it (merged or kept as an adapter on its crlft base, as train.lora.merge says), the trained weights loaded."""
    from crlft.model import load_model_and_tokenizer
    from crlft.train.checkpoint import load_model_weights
    from crlft.train.wrap import merge_lora, wrap_lora

    lora = cfg.train.lora
    meta = ModelMeta.from_config(cfg, **dict(meta_extra or {}))
    model, tokenizer = load_model_and_tokenizer(base_model, cfg.template.end_of_turn, cfg.model.trust_remote_code)
    base_dir = write_base(model, tokenizer, cfg) if lora.enabled and not lora.merge else None
    if lora.enabled:
        model = wrap_lora(model, lora, [tokenizer.convert_tokens_to_ids(cfg.template.end_of_turn)])
    load_model_weights(checkpoint_dir, model)
    if base_dir is not None:
        return save_adapter(model, tokenizer, out_dir, meta, base_dir)
    if lora.enabled:
        model = merge_lora(model)
    return save_exported(model, tokenizer, out_dir, meta)
