"""The model layer: the tiny default model and its tokenizer (crlft/presets.py), and loading any model ready for
C-RLFT (crlft/model.py)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from crlft.errors import CrlftError
from crlft.model import add_end_of_turn, load_model_and_tokenizer, load_tokenizer
from crlft.presets import PRESETS, default_corpus, init_model, train_tokenizer

END_OF_TURN = "<|end_of_turn|>"


@pytest.fixture(scope="module", autouse=True)
def offline_hub() -> Iterator[None]:
    """No network here: a hub id must fail at once instead of waiting on connection timeouts."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("tiny"), chat_template="{{ messages[0]['content'] }}")


@pytest.fixture(scope="module")
def dir_without_end_of_turn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved model whose vocabulary lacks <|end_of_turn|> (it ends turns with <|im_end|> instead)."""
    return init_model(tmp_path_factory.mktemp("no_eot"), end_of_turn="<|im_end|>")


@pytest.mark.parametrize(
    "text",
    ["Hello, world!", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n", "café 東京 😀👍🏽", "x" * 300, ""],
)
def test_tokenizer_round_trips_any_text(text: str) -> None:
    tokenizer = train_tokenizer(default_corpus())
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text


def test_tokenizer_training_is_deterministic() -> None:
    assert train_tokenizer(default_corpus()).get_vocab() == train_tokenizer(default_corpus()).get_vocab()


def test_saved_tokenizer_reloads_with_its_special_tokens_and_adds_none_on_encode(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert END_OF_TURN in tokenizer.all_special_tokens
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert tokenizer("hello").input_ids == tokenizer("hello", add_special_tokens=False).input_ids
    assert tokenizer.bos_token_id not in tokenizer("hello").input_ids


def test_end_of_turn_is_one_special_id_but_typed_by_a_user_it_is_plain_text(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    end_of_turn_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert tokenizer(END_OF_TURN, add_special_tokens=False).input_ids == [end_of_turn_id]

    text = f"say {END_OF_TURN} please"
    encoded = tokenizer(text, split_special_tokens=True, add_special_tokens=False, return_offsets_mapping=True)
    assert end_of_turn_id not in encoded.input_ids
    assert len(encoded.input_ids) == len(encoded.offset_mapping)
    assert tokenizer.decode(encoded.input_ids) == text
    start, end = text.index(END_OF_TURN), text.index(END_OF_TURN) + len(END_OF_TURN)
    literal_ids = [i for i, (s, e) in zip(encoded.input_ids, encoded.offset_mapping, strict=True) if start <= s < end]
    assert len(literal_ids) > 1
    # The flag does not stick: without it the same text holds the special id again.
    assert end_of_turn_id in tokenizer(text, add_special_tokens=False).input_ids


def test_init_model_writes_a_plain_transformers_directory_in_safetensors(tiny_dir: Path) -> None:
    files = {path.name for path in tiny_dir.iterdir()}
    assert "model.safetensors" in files
    assert not any(name.endswith(".bin") for name in files)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.hidden_size == PRESETS["tiny"]["hidden_size"]
    assert not model.config.tie_word_embeddings
    assert tokenizer.chat_template == "{{ messages[0]['content'] }}"
    end_of_turn_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert model.generation_config.eos_token_id == [end_of_turn_id, tokenizer.eos_token_id]
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.bos_token_id == tokenizer.bos_token_id


def test_init_model_is_reproducible_from_its_seed(tmp_path: Path) -> None:
    first = AutoModelForCausalLM.from_pretrained(init_model(tmp_path / "a", seed=3))
    second = AutoModelForCausalLM.from_pretrained(init_model(tmp_path / "b", seed=3))
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_init_model_rejects_an_unknown_preset(tmp_path: Path) -> None:
    with pytest.raises(CrlftError, match="unknown model preset 'huge'.*small, tiny"):
        init_model(tmp_path, preset="huge")


def test_loading_a_model_that_has_end_of_turn_changes_nothing(tiny_dir: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_dir))
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert len(tokenizer) == plain.config.vocab_size
    assert torch.equal(model.get_input_embeddings().weight, plain.get_input_embeddings().weight)
    assert model.generation_config.eos_token_id[0] == tokenizer.convert_tokens_to_ids(END_OF_TURN)


def test_loading_a_model_without_end_of_turn_adds_it_with_the_rows_of_its_eos_token(
    dir_without_end_of_turn: Path,
) -> None:
    original = AutoModelForCausalLM.from_pretrained(dir_without_end_of_turn)
    old_rows = original.config.vocab_size

    model, tokenizer = load_model_and_tokenizer(str(dir_without_end_of_turn))
    eos_id = tokenizer.eos_token_id

    end_of_turn_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert end_of_turn_id == old_rows  # appended after the last id
    assert END_OF_TURN in tokenizer.all_special_tokens
    assert tokenizer(END_OF_TURN, add_special_tokens=False).input_ids == [end_of_turn_id]
    for new, old in [
        (model.get_input_embeddings().weight, original.get_input_embeddings().weight),
        (model.get_output_embeddings().weight, original.get_output_embeddings().weight),
    ]:
        assert new.shape[0] == old_rows + 1
        assert torch.equal(new[:old_rows], old)
        assert torch.equal(new[end_of_turn_id], old[eos_id])  # the model stops at it as it stopped at EOS
    assert model.generation_config.eos_token_id[0] == end_of_turn_id


@pytest.fixture(scope="module")
def tied_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its output embedding tied to its input embedding, as SmolLM2's is."""
    out = tmp_path_factory.mktemp("tied")
    config = AutoModelForCausalLM.from_pretrained(tiny_dir).config
    config.tie_word_embeddings = True
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return out


def test_models_loaded_by_two_threads_at_once_keep_their_tied_embeddings_and_so_do_later_loads(tied_dir: Path) -> None:
    """transformers' from_pretrained turns tying off process-wide while it builds a model and then puts back what it
    found: two loads at once could put back each other's 'off' for good, and every later load of a tied model (SmolLM2)
    then answered from a random output layer."""

    def tied(model: torch.nn.Module) -> bool:
        return model.get_output_embeddings().weight is model.get_input_embeddings().weight

    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in range(10):
            assert all(tied(model) for model, _ in pool.map(lambda _: load_model_and_tokenizer(str(tied_dir)), "ab"))
    assert tied(AutoModelForCausalLM.from_pretrained(tied_dir))


def test_data_stage_tokenizer_and_trainer_agree_on_the_added_id(dir_without_end_of_turn: Path) -> None:
    _, trainer_tokenizer = load_model_and_tokenizer(str(dir_without_end_of_turn))
    data_tokenizer = load_tokenizer(str(dir_without_end_of_turn))
    assert data_tokenizer.get_vocab() == trainer_tokenizer.get_vocab()


def test_without_an_eos_token_a_padded_vocabulary_reuses_a_spare_row_set_to_the_mean_of_real_tokens(
    dir_without_end_of_turn: Path,
) -> None:
    model = AutoModelForCausalLM.from_pretrained(dir_without_end_of_turn)
    tokenizer = AutoTokenizer.from_pretrained(dir_without_end_of_turn)
    tokenizer.eos_token = None
    real_tokens = len(tokenizer)
    model.resize_token_embeddings(real_tokens + 8, mean_resizing=False)  # spare rows, as many hub models have
    real_rows = model.get_input_embeddings().weight[:real_tokens].clone()

    assert add_end_of_turn(model, tokenizer, END_OF_TURN)

    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == real_tokens + 8
    torch.testing.assert_close(weight[tokenizer.convert_tokens_to_ids(END_OF_TURN)], real_rows.mean(dim=0))
    assert not add_end_of_turn(model, tokenizer, END_OF_TURN)


def test_a_tokenizer_without_pad_reuses_eos_without_growing_the_vocabulary(
    dir_without_end_of_turn: Path, tmp_path: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(dir_without_end_of_turn)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    size_without_pad = len(AutoTokenizer.from_pretrained(tmp_path))

    loaded = load_tokenizer(str(tmp_path))

    assert loaded.pad_token == loaded.eos_token
    assert len(loaded) == size_without_pad + 1  # only <|end_of_turn|> was added


@pytest.mark.parametrize("name", ["/no/such/model", "./missing-model", "no-such-org/no-such-model"])
def test_a_missing_model_is_a_user_error_that_says_what_to_do(name: str) -> None:
    with pytest.raises(CrlftError, match=f"no model at {name}: run `crlft init-model --out {name}`"):
        load_model_and_tokenizer(name)


def test_a_folder_that_is_not_a_model_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(CrlftError, match="not a Hugging Face model directory"):
        load_model_and_tokenizer(str(tmp_path))


class _EmitTokenOnlyAt(LogitsProcessor):
    """Forbids token_id until the given step (counted from the first new token), then forces it."""

    def __init__(self, prompt_length: int, step: int, token_id: int) -> None:
        self.position = prompt_length + step
        self.token_id = token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        if input_ids.shape[1] == self.position:
            scores[:] = -float("inf")
            scores[:, self.token_id] = 0.0
        else:
            scores[:, self.token_id] = -float("inf")
        return scores


def test_generation_stops_at_end_of_turn(tiny_dir: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_dir))
    end_of_turn_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    prompt = torch.tensor([[tokenizer.bos_token_id, *tokenizer("User: hi", add_special_tokens=False).input_ids]])
    emit_end_of_turn = _EmitTokenOnlyAt(prompt.shape[1], step=3, token_id=end_of_turn_id)

    output = model.generate(
        prompt,
        max_new_tokens=20,
        do_sample=False,
        logits_processor=LogitsProcessorList([emit_end_of_turn]),
        suppress_tokens=[tokenizer.eos_token_id],  # so that the only stop the random model can reach is the forced one
    )

    new_tokens = output[0, prompt.shape[1] :].tolist()
    assert len(new_tokens) == 4
    assert new_tokens[-1] == end_of_turn_id
