"""LoRA trains what C-RLFT needs: besides the adapters, the input and output rows of the end-of-turn token (a new
token starts at the mean embedding; frozen there, a LoRA-tuned model never learns to stop), and the merged model
carries them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from crlft.config import load_config
from crlft.data.template import END_OF_TURN
from crlft.errors import CrlftError
from crlft.export import AdapterBase, adapter_base, export_checkpoint, is_adapter, load_exported, read_meta
from crlft.model import load_model_and_tokenizer
from crlft.presets import init_model
from crlft.train.checkpoint import TrainingPosition, load_model_weights, save_training_state
from crlft.train.schedule import build_optimizer, build_scheduler
from crlft.train.wrap import embedding_rows, merge_lora, wrap_lora

LORA = load_config(None, {"train.lora.enabled": True}).train
# The default LoRA targets (all-linear): every linear layer of a Llama but the output head.
LINEAR_WEIGHTS = tuple(f"{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("models") / "tiny")


def _lora_model(model_dir: Path) -> tuple[torch.nn.Module, int, dict[str, torch.Tensor]]:
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    return wrap_lora(model, LORA.lora, [end_of_turn]), end_of_turn, base


def _train(model: torch.nn.Module, end_of_turn: int, steps: int = 3) -> None:
    torch.manual_seed(0)
    optimizer = build_optimizer(model, LORA, lr=1e-2)
    ids = torch.tensor([[5, 9, 11, end_of_turn, 7, 13, end_of_turn]])
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_lora_trains_the_adapters_and_the_end_of_turn_rows_of_both_embeddings(tiny_model: Path) -> None:
    model, end_of_turn, _ = _lora_model(tiny_model)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name]
    assert sorted(trainable) == [
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta.default",
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default",
    ]
    assert embedding_rows(load_model_and_tokenizer(str(tiny_model))[0], [end_of_turn]) == {
        "model.embed_tokens": [end_of_turn], "lm_head": [end_of_turn]}


def test_the_merged_model_differs_from_the_base_in_the_adapted_layers_and_the_end_of_turn_rows_only(
    tiny_model: Path,
) -> None:
    model, end_of_turn, base = _lora_model(tiny_model)
    _train(model, end_of_turn)
    merged = merge_lora(model).state_dict()
    assert base.keys() == merged.keys()
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert changed - {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(name.endswith((*LINEAR_WEIGHTS, "embed_tokens.weight", "lm_head.weight"))
               for name in changed)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        changed_rows = (base[name] != merged[name]).any(dim=1).nonzero().flatten().tolist()
        assert changed_rows == [end_of_turn], name


def test_a_checkpoint_restores_the_end_of_turn_rows_into_a_fresh_lora_model(tiny_model: Path, tmp_path: Path) -> None:
    model, end_of_turn, _ = _lora_model(tiny_model)
    _train(model, end_of_turn)
    optimizer = build_optimizer(model, LORA, lr=1e-2)
    save_training_state(tmp_path, model, optimizer, build_scheduler(optimizer, 2, LORA), TrainingPosition())
    restored, _, _ = _lora_model(tiny_model)
    load_model_weights(tmp_path, restored)
    expected, actual = merge_lora(model).state_dict(), merge_lora(restored).state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(actual[name], expected[name])


ADAPTER = load_config(None, {"train.lora.enabled": True, "train.lora.merge": False})


def _adapter_checkpoint(tiny_model: Path, folder: Path) -> Path:
    """A checkpoint of an adapter trained a few steps (train.lora.merge false: no embedding rows)."""
    model, tokenizer = load_model_and_tokenizer(str(tiny_model))
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    model = wrap_lora(model, ADAPTER.train.lora, [end_of_turn])
    _train(model, end_of_turn)
    optimizer = build_optimizer(model, ADAPTER.train, lr=1e-2)
    save_training_state(folder, model, optimizer, build_scheduler(optimizer, 2, ADAPTER.train), TrainingPosition())
    return folder


def test_an_adapter_kept_as_such_trains_no_embedding_rows_which_vllm_refuses(tiny_model: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_model))
    wrapped = wrap_lora(model, ADAPTER.train.lora, [tokenizer.convert_tokens_to_ids(END_OF_TURN)])
    trainable = [name for name, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_an_adapter_is_exported_on_a_crlft_base_written_once_and_loads_as_its_merged_model(
    tiny_model: Path, tmp_path: Path
) -> None:
    cfg = load_config(None, {"train.lora.enabled": True, "train.lora.merge": False, "state_dir": str(tmp_path)})
    checkpoint = _adapter_checkpoint(tiny_model, tmp_path / "checkpoint")
    first = export_checkpoint(checkpoint, str(tiny_model), tmp_path / "a", cfg)
    second = export_checkpoint(checkpoint, str(tiny_model), tmp_path / "b", cfg)

    assert is_adapter(first) and not (first / "model.safetensors").exists()
    base = AdapterBase.of(read_meta(first))
    assert base is not None and Path(base.path) == tmp_path / "models" / "bases" / base.fingerprint
    assert [p.name for p in (tmp_path / "models" / "bases").iterdir()] == [base.fingerprint]  # one base, shared
    assert AdapterBase.of(read_meta(second)) == base
    assert adapter_base(first).folder() == Path(base.path)

    merged = export_checkpoint(checkpoint, str(tiny_model), tmp_path / "merged",
                               load_config(None, {"train.lora.enabled": True, "state_dir": str(tmp_path)}))
    ids = torch.tensor([[5, 9, 11, 7, 13]])
    with torch.no_grad():
        torch.testing.assert_close(load_exported(first).model(ids).logits, load_exported(merged).model(ids).logits)


def test_an_adapter_without_its_base_says_where_it_looked_and_how_to_fetch_it(
    tiny_model: Path, tmp_path: Path
) -> None:
    cfg = load_config(None, {"train.lora.enabled": True, "train.lora.merge": False, "state_dir": str(tmp_path / "s")})
    adapter = export_checkpoint(_adapter_checkpoint(tiny_model, tmp_path / "checkpoint"), str(tiny_model),
                                tmp_path / "a", cfg)
    shutil.rmtree(AdapterBase.of(read_meta(adapter)).path)
    with pytest.raises(CrlftError, match="is not at .* nor .*elsewhere.*: register the adapter where it was trained"):
        adapter_base(adapter).folder(tmp_path / "elsewhere")
