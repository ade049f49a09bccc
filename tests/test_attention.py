"""Attention over packed bins: FlexAttention's BlockMask is the block-diagonal causal mask, stored as the tiles that
hold any allowed pair (so the kernel skips the pairs across conversations); train.attention picks the kernel.

FlexAttention's forward is compared with sdpa's on CPU by the GPU check's smoke run (tests/test_gpu_check.py); its
backward exists only on GPUs."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from crlft.data.pack import PADDING, block_causal_mask, collate, flex_block_mask, pack_bin
from crlft.errors import CrlftError
from crlft.train.attention import set_attention
from crlft.train.batches import collate_micro_batch


def _sequence_ids(lengths: list[int], padding: int) -> torch.Tensor:
    ids = [i for i, n in enumerate(lengths) for _ in range(n)] + [PADDING] * padding
    return torch.tensor([ids])


def _every_pair(block_mask: object, length: int) -> torch.Tensor:
    """The BlockMask's mask_mod evaluated on every (query, key) pair of row 0."""
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    zero = torch.zeros((), dtype=torch.long)
    return block_mask.mask_mod(zero, zero, q, k)  # type: ignore[attr-defined]


def test_flex_block_mask_allows_exactly_the_pairs_of_the_dense_mask() -> None:
    sequence_ids = _sequence_ids([70, 1, 150, 33], padding=2)
    length = sequence_ids.shape[1]
    dense = block_causal_mask(sequence_ids)[0, 0]
    assert torch.equal(_every_pair(flex_block_mask(sequence_ids), length), dense)


def test_flex_block_mask_skips_the_tiles_across_conversations() -> None:
    # Four conversations of 128 tokens: one 128 x 128 tile each on the diagonal; causal attention alone needs 10.
    block_mask = flex_block_mask(_sequence_ids([128] * 4, padding=0))
    computed = block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum()
    assert int(computed) == 4


def test_collate_without_an_implementation_builds_no_mask() -> None:
    row = pack_bin([([1, 2, 3], [0.0, 1.0, 1.0], "GPT4")])
    assert "attention_mask" not in collate([row], None, 0, attn_implementation=None)
    assert collate([row], None, 0, attn_implementation="sdpa")["attention_mask"].dtype == torch.bool


def test_micro_batches_carry_the_mask_their_kernel_takes() -> None:
    row = pack_bin([([1, 2, 3], [0.0, 1.0, 1.0], "GPT4"), ([4, 5], [0.0, 1.0], "GPT3")])
    cpu = torch.device("cpu")
    sdpa = collate_micro_batch(row, 0, ["GPT4", "GPT3"], "sdpa", cpu)
    assert torch.equal(sdpa["attention_mask"], block_causal_mask(sdpa["sequence_ids"]))
    assert "attention_mask" not in collate_micro_batch(row, 0, ["GPT4", "GPT3"], "flash_attention_2", cpu)
    flex = collate_micro_batch(row, 0, ["GPT4", "GPT3"], "flex_attention", cpu)
    assert torch.equal(_every_pair(flex["attention_mask"], 5), block_causal_mask(flex["sequence_ids"])[0, 0])


def _llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=64))


def test_auto_keeps_the_models_own_attention_without_flash_attn_on_a_gpu() -> None:
    model = _llama()
    assert set_attention(model, "auto", torch.device("cpu")) == "sdpa"


def test_an_explicit_attention_is_set_on_the_model() -> None:
    model = _llama()
    assert set_attention(model, "eager", torch.device("cpu")) == "eager"
    assert model.config._attn_implementation == "eager"


def test_flex_attention_is_refused_for_training_on_cpu() -> None:
    with pytest.raises(CrlftError, match="no backward pass on CPU"):
        set_attention(_llama(), "flex_attention", torch.device("cpu"))


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed here")
def test_flash_attention_without_flash_attn_is_a_clear_error() -> None:
    with pytest.raises(CrlftError, match="not available"):
        set_attention(_llama(), "flash_attention_2", torch.device("cpu"))
