"""The exported model: a Hugging Face `save_pretrained` folder (safetensors) with the tokenizer, whose chat template
is the training template, and `crlft.json` naming the conditions, the inference condition, the mode and the config.
Plain `transformers` (and vLLM) load it without this project; `ModelFolder` holds what crlft itself reads from it
(the template it was trained with, the tokens that end an answer, the context), for every engine and decoder, and
`load_exported` adds the loaded model.
"""

from __future__ import annotations

import json
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


def save_exported(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path,
                  meta: ModelMeta) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.chat_template = meta.template.chat_template()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
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
    model, tokenizer = load_model_and_tokenizer(str(model_dir), end_of_turn=meta.template.end_of_turn, **load_kwargs)
    return ExportedModel(model, _loaded_folder(model, meta, TemplateTokenizer(meta.template, tokenizer)),
                         Path(model_dir))


def export_checkpoint(checkpoint_dir: str | Path, base_model: str, out_dir: str | Path, cfg: Config,
                      meta_extra: Mapping[str, Any] | None = None) -> Path:
    """The model of a training checkpoint as an exported model folder: the base model, LoRA applied if the run used
    it (merged or kept as an adapter, as train.lora.merge says), the trained weights loaded."""
    from crlft.model import load_model_and_tokenizer
    from crlft.train.checkpoint import load_model_weights
    from crlft.train.wrap import merge_lora, wrap_lora

    model, tokenizer = load_model_and_tokenizer(base_model, cfg.template.end_of_turn, cfg.model.trust_remote_code)
    if cfg.train.lora.enabled:
        model = wrap_lora(model, cfg.train.lora, [tokenizer.convert_tokens_to_ids(cfg.template.end_of_turn)])
    load_model_weights(checkpoint_dir, model)
    if cfg.train.lora.enabled and cfg.train.lora.merge:
        model = merge_lora(model)
    return save_exported(model, tokenizer, out_dir, ModelMeta.from_config(cfg, **dict(meta_extra or {})))
