"""The grouped LoRA ops (crlft/inference/lora_ops.py) write what vLLM's CPU torch ops write, but for a token without an
adapter, and vLLM loads them as a plugin in its processes."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from types import ModuleType

import pytest
import torch

from crlft.inference import lora_ops

vllm_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")
lora_kernel = pytest.importorskip("crlft.inference.lora_kernel")  # numba: with vLLM


def _as_shipped() -> ModuleType:
    """vLLM's ops from their file, whatever the plugin has replaced in the imported module by now."""
    spec = importlib.util.spec_from_file_location("vllm_lora_ops_as_shipped", vllm_ops.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ORIGINAL = {name: getattr(_as_shipped(), name) for name in ("bgmv_expand", "bgmv_shrink", "bgmv_expand_slice")}

SLOTS, RANK, WIDTH, OUT = 4, 8, 48, 80
MIXES = {
    "one adapter": [2] * 7,
    "three adapters, interleaved": [0, 3, 0, 1, 3, 3, 0],
    "one token": [1],
    "a prefill of three adapters": [i % 3 for i in range(lora_ops.PADDED_MAX_TOKENS + 1)],
}


def weights(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(SLOTS, 1, *shape, generator=torch.Generator().manual_seed(sum(shape)))


def inputs(rows: int, width: int) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(rows))


@pytest.mark.parametrize("mix", MIXES.values(), ids=MIXES.keys())
@pytest.mark.parametrize("add_inputs", [True, False])
def test_shrink_and_expand_write_what_vllms_ops_write(mix: list[int], add_inputs: bool) -> None:
    slots = torch.tensor(mix)
    x, a = inputs(len(mix), WIDTH), weights((RANK, WIDTH))
    expected, got = torch.zeros(len(mix), RANK), torch.zeros(len(mix), RANK)
    ORIGINAL["bgmv_shrink"](x, a, expected, slots, 0.5)
    lora_ops.bgmv_shrink(x, a, got, slots, 0.5)
    torch.testing.assert_close(got, expected)

    b = weights((OUT, RANK))
    expected, got = torch.ones(len(mix), OUT + 3), torch.ones(len(mix), OUT + 3)  # the model pads its output
    ORIGINAL["bgmv_expand"](expected[:, :RANK].clone(), b, expected, slots, add_inputs)
    lora_ops.bgmv_expand(got[:, :RANK].clone(), b, got, slots, add_inputs)
    torch.testing.assert_close(got, expected)

    expected, got = torch.ones(len(mix), 3 * OUT), torch.ones(len(mix), 3 * OUT)
    ORIGINAL["bgmv_expand_slice"](x[:, :RANK], b, expected, slots, OUT, OUT, add_inputs)
    lora_ops.bgmv_expand_slice(x[:, :RANK], b, got, slots, OUT, OUT, add_inputs)
    torch.testing.assert_close(got, expected)


def by_hand(x: torch.Tensor, w: torch.Tensor, slots: list[int]) -> torch.Tensor:
    return torch.stack([x[i] @ w[s, 0].T if s >= 0 else torch.zeros(w.shape[2]) for i, s in enumerate(slots)])


@pytest.mark.parametrize("tokens", [6, lora_ops.PADDED_MAX_TOKENS + 2], ids=["decode", "prefill"])
def test_a_token_without_an_adapter_gets_nothing_where_vllms_torch_ops_gave_it_the_last_slots(tokens: int) -> None:
    mix = [[-1, 1, -1, 3, 1, 0][i % 6] for i in range(tokens)]
    x, a, b = inputs(tokens, WIDTH), weights((RANK, WIDTH)), weights((OUT, RANK))
    shrunk = torch.full((tokens, RANK), 7.0)
    lora_ops.bgmv_shrink(x, a, shrunk, torch.tensor(mix))
    torch.testing.assert_close(shrunk, by_hand(x, a, mix))
    expanded = torch.zeros(tokens, OUT)
    lora_ops.bgmv_expand(shrunk, b, expanded, torch.tensor(mix), add_inputs=True)
    torch.testing.assert_close(expanded, by_hand(shrunk, b, mix))

    alone = torch.full((2, RANK), 7.0)
    lora_ops.bgmv_shrink(x[:2], a, alone, torch.tensor([-1, -1]))  # a batch without adapters
    torch.testing.assert_close(alone, torch.zeros(2, RANK))


def test_a_batch_grouped_like_the_last_one_reuses_its_grouping_and_any_other_is_grouped_anew() -> None:
    first = lora_ops.TokenGroups.of(torch.tensor([0, 1, 1, 2]), SLOTS)
    assert lora_ops.TokenGroups.of(torch.tensor([0, 1, 1, 2]), SLOTS) is first
    other = lora_ops.TokenGroups.of(torch.tensor([2, 1, 1, 0]), SLOTS)
    assert other is not first and other.rows.tolist() == [2 * 2, 1 * 2, 1 * 2 + 1, 0]  # slot * depth + rank
    without = lora_ops.TokenGroups.of(torch.tensor([2, -1, 1, 0]), SLOTS)
    assert without.own.view(4, SLOTS).tolist() == [[0, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize("runs", [[(2, 5)], [(0, 3), (3, 1), (-1, 2), (0, 4)]], ids=["one adapter", "mixed"])
def test_the_sequence_wise_ops_write_what_vllms_write_on_each_tokens_slot(runs: list[tuple[int, int]]) -> None:
    """vLLM's V1 engine calls the sgmv ops with runs of equal slots (slot, tokens)."""
    slots, lengths = torch.tensor([s for s, _ in runs]), torch.tensor([n for _, n in runs])
    per_token = torch.repeat_interleave(slots, lengths)
    tokens = int(lengths.sum())
    starts = torch.cumsum(lengths, 0) - lengths
    meta = (starts, lengths, slots, len(runs), int(lengths.max()), tokens)
    x, a, b = inputs(tokens, WIDTH), weights((RANK, WIDTH)), weights((OUT, RANK))
    shrunk = torch.zeros(tokens, RANK)
    lora_ops.sgmv_shrink(x, a, shrunk, *meta, 0.5)
    torch.testing.assert_close(shrunk, 0.5 * by_hand(x, a, per_token.tolist()))
    expected, got = torch.ones(tokens, OUT), torch.ones(tokens, OUT)
    ORIGINAL["bgmv_expand"](shrunk, b, expected, per_token.clamp(min=0), add_inputs=True)
    expected[per_token < 0] = 1.0  # vLLM's torch ops gave these the last slot's adapter
    lora_ops.sgmv_expand(shrunk, b, got, *meta, add_inputs=True)
    torch.testing.assert_close(got, expected)
    sliced = torch.zeros(tokens, 2 * OUT)
    lora_ops.sgmv_expand_slice(shrunk, b, sliced, *meta, OUT, OUT, add_inputs=True)
    torch.testing.assert_close(sliced[:, OUT:], expected - 1.0)


LINEAR_MIXES = {**MIXES, "some tokens without an adapter": [0, -1, 3, 3, -1, 1], "none has an adapter": [-1] * 5}
LAYERS = {"q, k and v": (OUT, 24, 24), "one slice": (OUT,)}


def wrapper_for(mix: list[int]) -> object:
    """vLLM's CPU punica wrapper with the metadata vLLM gives it for a prefill of these slots (-1: no adapter)."""
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    lora_ops.register()
    wrapper = PunicaWrapperCPU(max_num_batched_tokens=1024, max_batches=1024, device="cpu")
    ids = [slot + 1 for slot in mix]  # adapter id = slot + 1 (0: none)
    wrapper.update_metadata(LoRAMapping(ids, ids, is_prefill=True), [s + 1 for s in range(SLOTS)], SLOTS + 1, 1000)
    return wrapper


@pytest.mark.parametrize("mix", LINEAR_MIXES.values(), ids=LINEAR_MIXES.keys())
@pytest.mark.parametrize("slices", LAYERS.values(), ids=LAYERS.keys())
def test_a_linear_layers_adapter_adds_each_tokens_own_product_to_every_slice(mix: list[int], slices: tuple) -> None:
    """The wrapper's add_lora_linear, which crlft replaces: y[:, slice i] += scale * x A_i^T B_i^T with each token's
    slot, nothing for slot -1."""
    wrapper = wrapper_for(mix)
    x, y = inputs(len(mix), WIDTH), torch.randn(len(mix), sum(slices))
    a = tuple(weights((RANK, WIDTH)) * (i + 1) for i in range(len(slices)))
    b = tuple(weights((size, RANK)) for size in slices)
    expected, offset = y.clone(), 0
    for a_i, b_i, size in zip(a, b, slices, strict=True):
        expected[:, offset : offset + size] += by_hand(0.5 * by_hand(x, a_i, mix), b_i, mix)
        offset += size
    wrapper.add_lora_linear(y, x, a, b, 0.5, slices)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-5)  # sums of up to 48 products in another order


ONE_ADAPTER_MANY_TOKENS = [2] * (lora_kernel.THREADS_MIN_TOKENS * 2)


# Enough tokens for threads; slots of several chunks
SEVERAL_ADAPTERS_IN_CHUNKS = ([3] * (2 * lora_kernel.CHUNK_TOKENS + 5) + [-1, 0, 1]
                              + [0] * max(lora_kernel.CHUNK_TOKENS, lora_kernel.THREADS_MIN_TOKENS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("mix", [[0, 3, 3, -1, 1], SEVERAL_ADAPTERS_IN_CHUNKS, [1] * 5, ONE_ADAPTER_MANY_TOKENS],
                         ids=["several adapters", "several adapters, in chunks of a slot's tokens",
                              "one adapter, few tokens", "one adapter, many tokens"])
def test_every_way_a_layers_adapter_is_applied_gives_the_same_sums(mix: list[int], dtype: torch.dtype) -> None:
    """float32 takes the compiled product of each token's own slot (on threads from THREADS_MIN_TOKENS tokens on);
    other number types take torch ops: over every slot, or a product per slice with the one.
    Each adds the same products."""
    wrapper, slices = wrapper_for(mix), (OUT, 24, 24)
    x, y = inputs(len(mix), WIDTH).to(dtype), torch.randn(len(mix), sum(slices)).to(dtype)
    a = tuple((weights((RANK, WIDTH)) * (i + 1)).to(dtype) for i in range(len(slices)))
    b = tuple(weights((size, RANK)).to(dtype) for size in slices)
    expected, offset = y.float(), 0
    for a_i, b_i, size in zip(a, b, slices, strict=True):
        expected[:, offset : offset + size] += by_hand(by_hand(x.float(), a_i.float(), mix), b_i.float(), mix)
        offset += size
    wrapper.add_lora_linear(y, x, a, b, 1.0, slices)
    exact = dtype == torch.float32
    torch.testing.assert_close(y.float(), expected, atol=1e-4 if exact else 0.5, rtol=1e-5 if exact else 0.02)


def test_where_numbas_thread_pool_is_workqueue_the_compiled_product_runs_on_one_thread_with_the_same_sums(
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """numba's fallback pool fights torch's OpenMP threads for the cores: there the same loops run serially."""
    mix, slices = SEVERAL_ADAPTERS_IN_CHUNKS, (OUT, 24, 24)
    x = inputs(len(mix), WIDTH)
    a = tuple(weights((RANK, WIDTH)) * (i + 1) for i in range(len(slices)))
    b = tuple(weights((size, RANK)) for size in slices)
    on_threads, on_one = torch.zeros(len(mix), sum(slices)), torch.zeros(len(mix), sum(slices))
    wrapper_for(mix).add_lora_linear(on_threads, x, a, b, 1.0, slices)
    monkeypatch.setattr(lora_kernel, "_pool", {"pid": os.getpid(), "usable": False})
    monkeypatch.setattr(lora_kernel, "_on_threads", None)  # not called
    wrapper_for(mix).add_lora_linear(on_one, x, a, b, 1.0, slices)
    torch.testing.assert_close(on_one, on_threads, atol=1e-5, rtol=1e-5)


def test_an_adapter_vllm_writes_into_a_slot_after_the_layer_was_laid_out_is_the_one_applied() -> None:
    """crlft lays a layer's buffers out anew on first sight (same shapes, same values); vLLM then loads and removes
    adapters by indexed writes into them, as its `set_lora` and `reset_lora` do."""
    mix, slices = [0, 3, 3, 1], (OUT, 24, 24)
    wrapper = wrapper_for(mix)
    x = inputs(len(mix), WIDTH)
    a = tuple(weights((RANK, WIDTH)) * (i + 1) for i in range(len(slices)))
    b = tuple(weights((size, RANK)) for size in slices)
    before = [t.clone() for t in a + b]
    wrapper.add_lora_linear(torch.zeros(len(mix), sum(slices)), x, a, b, 1.0, slices)
    assert all(torch.equal(t, saved) for t, saved in zip(a + b, before, strict=True))
    for i, size in enumerate(slices):
        a[i][3, 0, : RANK // 2, :].copy_(torch.full((RANK // 2, WIDTH), 0.5))  # a smaller rank than the slot's
        a[i][3, 0, RANK // 2 :, :] = 0
        b[i][3, 0, :, :].copy_(torch.full((size, RANK), 2.0))
        b[i][1] = 0  # the adapter of slot 1 removed
    y, expected, offset = torch.zeros(len(mix), sum(slices)), torch.zeros(len(mix), sum(slices)), 0
    for a_i, b_i, size in zip(a, b, slices, strict=True):
        expected[:, offset : offset + size] = by_hand(by_hand(x, a_i, mix), b_i, mix)
        offset += size
    wrapper.add_lora_linear(y, x, a, b, 1.0, slices)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-5)
    assert y[3].abs().sum() == 0 and y[1].abs().sum() > 0


def test_vllm_finds_the_ops_as_a_general_plugin_and_loading_them_replaces_its_cpu_ops() -> None:
    plugins = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert [p.value for p in plugins if p.name == "crlft_cpu_lora"] == ["crlft.inference.lora_ops:register"]
    from vllm.lora.punica_wrapper import punica_cpu

    lora_ops.register()
    lora_ops.register()  # vLLM may load plugins twice in one process
    for module in (vllm_ops, punica_cpu):
        for name in lora_ops.OPS:
            assert getattr(module, name) is getattr(lora_ops, name)
    for name in ("update_metadata", "add_lora_linear"):
        assert getattr(punica_cpu.PunicaWrapperCPU, name) is getattr(lora_ops, name)
        assert lora_ops._VLLM[name] is not getattr(lora_ops, name)
