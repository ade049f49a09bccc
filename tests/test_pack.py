"""Packing: bins respect capacity and keep every token; a packed forward equals each conversation run alone."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from crlft.data.pack import (
    IGNORE_INDEX,
    MIN_TRAIN_BINS,
    PADDING,
    auto_pack_len,
    collate,
    first_fit_decreasing,
    pack_bin,
    packing_efficiency,
    padding_efficiency,
    shift_for_next_token,
)

VOCAB = 100
PAD_ID = 0


def _conversation(length: int, condition: str, rng: random.Random) -> tuple[list[int], list[float], str]:
    input_ids = [rng.randrange(1, VOCAB) for _ in range(length)]
    weights = [0.0] * (length // 2) + [1.0] * (length - length // 2)
    return input_ids, weights, condition


def _naive_first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    bins: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        target = next((b for b, space in enumerate(free) if space >= lengths[index]), len(bins))
        if target == len(bins):
            bins.append([])
            free.append(capacity)
        bins[target].append(index)
        free[target] -= lengths[index]
    return bins


# --- first-fit-decreasing ---------------------------------------------------------------------------------------


def test_ffd_places_every_sequence_exactly_once_and_never_overfills_a_bin() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(500)]
    bins = first_fit_decreasing(lengths, 512)
    assert sorted(i for members in bins for i in members) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in members) <= 512 for members in bins)


def test_ffd_matches_the_textbook_first_fit_decreasing() -> None:
    rng = random.Random(1)
    for _ in range(20):
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(0, 60))]
        assert first_fit_decreasing(lengths, 128) == _naive_first_fit_decreasing(lengths, 128)


def test_ffd_is_deterministic_and_breaks_ties_by_index() -> None:
    assert first_fit_decreasing([3, 5, 3, 5], 8) == [[1, 0], [3, 2]]
    lengths = [random.Random(2).randint(1, 50) for _ in range(100)]
    assert first_fit_decreasing(lengths, 64) == first_fit_decreasing(list(lengths), 64)


def test_ffd_fills_bins_at_least_98_percent_with_many_short_sequences() -> None:
    rng = random.Random(3)
    lengths = [rng.randint(20, 400) for _ in range(2000)]
    bins = first_fit_decreasing(lengths, 2048)
    assert packing_efficiency(lengths, bins, 2048) >= 0.98


def test_ffd_rejects_a_sequence_longer_than_the_capacity() -> None:
    with pytest.raises(ValueError, match="sequence 1 has 9 tokens, more than the bin capacity 8"):
        first_fit_decreasing([2, 9], 8)


def test_an_unset_pack_len_is_max_len_but_for_a_set_too_small_to_fill_64_bins_of_it() -> None:
    assert auto_pack_len(2048, 64 * 2048 * 10, 1500) == 2048  # a large set: max_len, as the reference packs
    assert auto_pack_len(2048, 17_000, 250) == 256  # 144 facts + replay: 66 bins of 256 (8 bins of 2048)
    assert MIN_TRAIN_BINS <= 17_000 / 256
    assert auto_pack_len(2048, 5_000, 250) == 250  # never below the longest conversation: it must fit a bin
    assert auto_pack_len(2048, 0, 10) == 16 and auto_pack_len(100, 64 * 200, 90) == 100  # at most max_len


def test_efficiencies_count_real_tokens_over_token_slots() -> None:
    assert packing_efficiency([3, 1, 2], [[0, 1], [2]], 4) == pytest.approx(6 / 8)
    # batches [4, 2] and [1]: slots 2*4 + 1*1
    assert padding_efficiency([4, 2, 1], 2) == pytest.approx(7 / 9)


# --- rows -------------------------------------------------------------------------------------------------------


def test_shift_aligns_each_position_with_the_next_token_and_its_weight() -> None:
    labels, weights = shift_for_next_token([5, 6, 7], [0.0, 0.5, 1.0])
    assert labels == [6, 7, IGNORE_INDEX]
    assert weights == [0.5, 1.0, 0.0]


def test_pack_bin_shifts_within_each_conversation_and_restarts_positions() -> None:
    row = pack_bin([([1, 2, 3], [0.0, 1.0, 1.0], "GPT4"), ([4, 5], [0.0, 0.1], "GPT3")])
    assert row["input_ids"] == [1, 2, 3, 4, 5]
    assert row["labels"] == [2, 3, IGNORE_INDEX, 5, IGNORE_INDEX]  # 3 never predicts 4
    assert row["weights"] == [1.0, 1.0, 0.0, 0.1, 0.0]
    assert row["position_ids"] == [0, 1, 2, 0, 1]
    assert row["seq_lens"] == [3, 2]
    assert row["seq_conditions"] == ["GPT4", "GPT3"]


def test_labels_never_point_across_a_conversation_boundary() -> None:
    rng = random.Random(4)
    conversations = [_conversation(rng.randint(1, 30), "GPT4", rng) for _ in range(8)]
    row = pack_bin(conversations)
    start = 0
    for input_ids, _, _ in conversations:
        end = start + len(input_ids)
        assert row["labels"][start:end] == [*input_ids[1:], IGNORE_INDEX]
        start = end


def test_packing_preserves_the_multiset_of_input_tokens() -> None:
    rng = random.Random(5)
    conversations = [_conversation(rng.randint(1, 200), "GPT4", rng) for _ in range(100)]
    lengths = [len(c[0]) for c in conversations]
    rows = [pack_bin([conversations[i] for i in members]) for members in first_fit_decreasing(lengths, 256)]
    assert all(len(row["input_ids"]) <= 256 for row in rows)
    packed = Counter(t for row in rows for t in row["input_ids"])
    assert packed == Counter(t for c in conversations for t in c[0])


def test_pack_bin_accepts_objects_with_template_fields() -> None:
    class Tokenized:
        input_ids = [1, 2]
        weights = [0.0, 1.0]
        condition = "GPT4"

    assert pack_bin([Tokenized()]) == pack_bin([([1, 2], [0.0, 1.0], "GPT4")])


# --- collate ----------------------------------------------------------------------------------------------------


def test_collate_pads_and_marks_padding() -> None:
    rows = [pack_bin([([1, 2], [0.0, 1.0], "GPT3"), ([3], [0.0], "GPT4")]), pack_bin([([4], [1.0], "GPT4")])]
    batch = collate(rows, pad_to=4, pad_id=PAD_ID, conditions=["GPT4", "GPT3"])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert batch["labels"].tolist() == [[2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX] * 4]
    assert batch["weights"].tolist() == [[1.0, 0.0, 0.0, 0.0], [0.0] * 4]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 1, PADDING], [0, PADDING, PADDING, PADDING]]
    assert batch["class_ids"].tolist() == [[1, 1, 0, PADDING], [0, PADDING, PADDING, PADDING]]


def test_collate_mask_is_block_diagonal_causal_and_padding_attends_only_to_itself() -> None:
    rows = [pack_bin([([1, 2], [0.0, 1.0], "GPT4"), ([3, 4], [0.0, 1.0], "GPT4")])]
    mask = collate(rows, pad_to=6, pad_id=PAD_ID)["attention_mask"]
    assert mask.dtype == torch.bool and mask.shape == (1, 1, 6, 6)
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]


def test_collate_gives_eager_an_additive_mask() -> None:
    rows = [pack_bin([([1, 2], [0.0, 1.0], "GPT4")])]
    mask = collate(rows, pad_to=None, pad_id=PAD_ID, attn_implementation="eager", dtype=torch.bfloat16)
    blocked = torch.finfo(torch.bfloat16).min
    assert mask["attention_mask"].dtype == torch.bfloat16
    assert mask["attention_mask"][0, 0].tolist() == [[0.0, blocked], [0.0, 0.0]]


def test_collate_rejects_pad_to_shorter_than_a_row_and_unknown_classes() -> None:
    rows = [pack_bin([([1, 2, 3], [0.0, 1.0, 1.0], "GPT4")])]
    with pytest.raises(ValueError, match="pad_to=2 is shorter than the longest row"):
        collate(rows, pad_to=2, pad_id=PAD_ID)
    with pytest.raises(ValueError, match=r"\['GPT4'\] are not among the classes \['GPT3'\]"):
        collate(rows, pad_to=None, pad_id=PAD_ID, conditions=["GPT3"])


# --- the packed forward -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return _tiny_llama("sdpa").state_dict()


def _tiny_llama(attn_implementation: str) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_forward_equals_each_conversation_alone(
    attn_implementation: str, tiny_llama_state: dict[str, torch.Tensor]
) -> None:
    model = _tiny_llama(attn_implementation)
    model.load_state_dict(tiny_llama_state)
    assert model.config._attn_implementation == attn_implementation
    rng = random.Random(6)
    conversations = [_conversation(n, "GPT4", rng) for n in (17, 5, 30)]
    row_a = pack_bin(conversations)
    row_b = pack_bin([_conversation(9, "GPT4", rng)])  # a shorter second row: padding in the batch
    batch = collate([row_a, row_b], pad_to=64, pad_id=PAD_ID, attn_implementation=attn_implementation)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits
        start = 0
        for input_ids, _, _ in conversations:
            alone = model(input_ids=torch.tensor([input_ids])).logits[0]
            torch.testing.assert_close(packed[0, start : start + len(input_ids)], alone, atol=1e-5, rtol=0)
            start += len(input_ids)
    assert torch.isfinite(packed).all()  # padding rows attend to themselves: no NaN anywhere
