"""vLLM's CPU LoRA ops, applied as matrix products of the batch instead of per-token copies of each adapter.

vLLM's CPU platform applies adapters with the torch ops of `vllm/lora/ops/torch_ops/lora_ops.py`: each token gathers
its adapter's A or B (`weights[indices]`, a full copy per token, per adapted layer) and multiplies it in a batched
einsum of tiny matrices. Here a batch whose tokens share one adapter, the usual case, takes one matrix product per op,
and a batch of several adapters one batched product over a grid of their slots. A token of slot -1 (a request without
an adapter: vLLM's "no LoRA") gets nothing, as vLLM's GPU kernels give it; the torch ops gave it the last slot's
adapter.

The adapted linear layers (a Llama layer's q/k/v, o, gate/up and down) go around the ops: `add_lora_linear` replaces the
CPU punica wrapper's method of that name and applies every slice of a layer (q, k and v; gate and up) in one call, with
the batch's slots read once, when vLLM updates the wrapper (`update_metadata`). In float32 it multiplies each token by
its own slot only, compiled (`crlft/inference/lora_kernel.py`); other number types take torch ops. The ops serve the
embedding and the logits.

`register` is a vLLM general plugin (pyproject's `vllm.general_plugins` entry point), so it runs in every vLLM process,
the engine core included; vLLM's `VLLM_PLUGINS` can leave it out. The gain is in benchmarks/RESULTS.md, "Many adapters
behind one endpoint".
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Above this many tokens (prefill), a product against every slot's B stacked beats the batched product on CPUs.
PADDED_MAX_TOKENS = 256


def adapter_products(inputs: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """Each token's row of `inputs` (tokens x in) times its adapter slot's matrix of `weights` (slots x [1 x] out x in),
    in `dtype`: tokens x out. Slot -1: zeros. One adapter for every token: one product; several: `TokenGroups`."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    n_slots, out, width = weights.shape
    first = int(slots[0])
    if bool((slots == first).all()):
        if first < 0:
            return inputs.new_zeros((inputs.shape[0], out))
        return inputs @ weights[first].to(dtype).T  # only that slot converted, where the number types differ
    weights = weights.to(dtype)
    groups = TokenGroups.of(slots, n_slots)
    if out > width and inputs.shape[0] > PADDED_MAX_TOKENS:
        return groups.stacked_product(inputs, weights)
    return groups.padded_product(inputs, weights)


@dataclass(frozen=True)
class TokenGroups:
    """A batch's tokens grouped by adapter slot: token i goes to row `rows[i]` of a (slots x `depth`) grid, so that one
    batched product serves every slot (the ops' way: the logits' B has a row per word, too many to multiply by every
    slot), and a one-hot mask of each token's slot (`_grouped_linear`'s way). Every op of a forward pass sees the same
    slots: the last grouping is reused."""

    slots: torch.Tensor
    n_slots: int
    depth: int  # the most tokens of one slot
    rows: torch.Tensor  # the grid row (slot * depth + rank within the slot) of each token with an adapter, in order
    valid: torch.Tensor | None  # the tokens with an adapter, where some have none (slot -1)
    sources: torch.Tensor  # each grid row's token; a row no token fills repeats token 0, and is never read back
    own: torch.Tensor  # tokens x 1 x slots x 1: 1.0 at each token's slot, else 0.0 (all 0.0 for slot -1)
    order: np.ndarray  # the tokens sorted by slot (stable), those without an adapter last ...
    starts: np.ndarray  # ... slot s's at order[starts[s]:starts[s + 1]] (`lora_kernel.own_slot_products`)

    @classmethod
    def of(cls, slots: torch.Tensor, n_slots: int) -> TokenGroups:
        last = _last_groups[0]
        if last is not None and last.n_slots == n_slots and last.slots.shape == slots.shape \
                and torch.equal(last.slots, slots):
            return last
        valid = slots >= 0
        slot = torch.where(valid, slots, n_slots)  # the tokens without an adapter last, in a group of their own
        counts = torch.bincount(slot, minlength=n_slots + 1)
        depth = max(1, int(counts[:n_slots].max()))
        order = torch.argsort(slot, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(slot)
        rank[order] = torch.arange(len(slot)) - starts[slot[order]]
        some_without = not bool(valid.all())
        tokens = valid.nonzero()[:, 0] if some_without else None
        rows = (slot * depth + rank)[valid] if some_without else slot * depth + rank
        sources = torch.zeros(n_slots * depth, dtype=torch.long)
        sources[rows] = torch.arange(len(slot)) if tokens is None else tokens
        own = torch.nn.functional.one_hot(slot, n_slots + 1)[:, :n_slots].to(torch.float32)
        groups = cls(slots.clone(), n_slots, depth, rows, tokens, sources, own.view(len(slot), 1, n_slots, 1),
                     order.numpy(), starts.numpy())  # starts[n_slots]: where the tokens without an adapter begin
        _last_groups[0] = groups
        return groups

    def grid(self, inputs: torch.Tensor) -> torch.Tensor:
        """The tokens (tokens x width) placed in a (slots x depth x width) grid; a place no token fills holds a copy
        of token 0, whose products `tokens` never reads. `index_select` both ways, the cheapest gather on CPUs
        (benchmarks/RESULTS.md, "The grid filled and read back with index_select")."""
        return inputs.index_select(0, self.sources).view(self.n_slots, self.depth, -1)

    def tokens(self, products: torch.Tensor) -> torch.Tensor:
        """A grid's products (slots x depth x out) read back per token (tokens x out); a token without an adapter:
        zeros."""
        products = products.reshape(self.n_slots * self.depth, -1).index_select(0, self.rows)
        if self.valid is None:
            return products
        return products.new_zeros((self.slots.shape[0], products.shape[1])).index_copy_(0, self.valid, products)

    def padded_product(self, inputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The tokens placed in the grid, one batched product with every slot's matrix, read back per token."""
        return self.tokens(torch.bmm(self.grid(inputs), weights.transpose(1, 2)))

    def stacked_product(self, inputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each token's input in its slot's block of a row (zeros elsewhere) against every slot's matrix stacked."""
        n_slots, out, width = weights.shape
        own = torch.nn.functional.one_hot(self.slots.clamp(min=0), n_slots).to(inputs.dtype)
        if self.valid is not None:
            own = own * (self.slots >= 0).unsqueeze(1).to(inputs.dtype)
        blocks = (own.unsqueeze(2) * inputs.unsqueeze(1)).view(-1, n_slots * width)
        return blocks @ weights.transpose(1, 2).reshape(n_slots * width, out)


_last_groups: list[TokenGroups | None] = [None]


# The ops as vLLM 0.32 defines them (same signatures, same writes into `output_tensor`), but for the products.


def bgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, add_inputs: bool = True) -> None:  # fmt: skip
    outputs = adapter_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad the output differently
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_shrink(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, scaling: float = 1.0) -> None:  # fmt: skip
    outputs = adapter_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                      lora_indices_tensor: torch.Tensor, slice_offset: int, slice_size: int,
                      add_inputs: bool = True) -> None:  # fmt: skip
    outputs = adapter_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


# The sequence-wise ops vLLM's V1 engine calls for every batch (its punica wrapper runs them in "prefill" mode): the
# slots come a run of equal ones at a time (`lora_indices_tensor`, `seq_len_tensor`), expanded per token only when the
# batch mixes adapters (vLLM expanded them in every call).


def token_slots(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    """Each token's slot; a batch of one slot is that slot alone, which stands for every token in `adapter_products`."""
    first = lora_indices_tensor[:1]
    if bool((lora_indices_tensor == first).all()):
        return first
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                batches: int, max_seq_length: int, token_nums: int, add_inputs: bool = False) -> None:  # fmt: skip
    bgmv_expand(inputs, lora_b_weights, output_tensor, token_slots(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
                b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                batches: int, max_seq_length: int, token_nums: int, scaling: float) -> None:  # fmt: skip
    bgmv_shrink(inputs, lora_a_weights, output_tensor, token_slots(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                      b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                      batches: int, max_seq_length: int, token_nums: int, slice_offset: int, slice_size: int,
                      add_inputs: bool = False) -> None:  # fmt: skip
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, token_slots(lora_indices_tensor, seq_len_tensor),
                      slice_offset, slice_size, add_inputs)


# vLLM's CPU punica wrapper applies a linear layer's adapter slice by slice (q, k and v: three shrinks, three expands),
# each through several of its Python frames that find the op's slots anew. Here the batch's slots are read once, when
# vLLM updates the wrapper's metadata, and one call applies every slice of a layer.


def update_metadata(self: Any, mapping: Any, lora_index_to_id: list[int | None], *args: Any, **kwargs: Any) -> None:
    """`PunicaWrapperCPU.update_metadata`, then the batch's slots for `add_lora_linear`: the one slot every token
    shares (-1: no adapter), or the tokens grouped by slot."""
    _VLLM["update_metadata"](self, mapping, lora_index_to_id, *args, **kwargs)
    slots = self.token_lora_indices
    first = int(slots[0]) if slots.shape[0] else -1
    self.crlft_slots = first if bool((slots == first).all()) else TokenGroups.of(slots, len(lora_index_to_id))


def add_lora_linear(self: Any, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                    lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...],
                    **kwargs: Any) -> None:  # fmt: skip
    """`PunicaWrapperCPU.add_lora_linear` (`self` is the wrapper): y[:, slice i] += scale * x @ A_i.T @ B_i.T, each
    token with its slot's A (slots x 1 x rank x in) and B (slots x 1 x out_i x rank); slot -1: nothing."""
    slots = getattr(self, "crlft_slots", None)
    x = x.view(-1, x.shape[-1])
    if isinstance(slots, TokenGroups) and slots.slots.shape[0] != x.shape[0]:
        slots = None  # not the batch the slots were read for (vLLM pads it on other platforms): vLLM's own way
    if slots is None:
        _VLLM["add_lora_linear"](self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, **kwargs)
        return
    if isinstance(slots, int) and slots < 0:
        return
    layer = LayerSlots.of(self, lora_a_stacked, lora_b_stacked)
    out = y.view(-1, y.shape[-1])
    if x.dtype == out.dtype == torch.float32:
        _compiled_linear(slots, out, x, layer, scale)
    elif isinstance(slots, TokenGroups):
        _grouped_linear(slots, out, x, layer, scale)
    else:
        _one_adapter_linear(slots, out, x, layer, scale)


@dataclass(frozen=True)
class LayerSlots:
    """A layer's adapter slots as the products read them, without a copy: on first sight of a layer its buffers are
    laid out anew in place (`Tensor.set_`, same shapes, same values, the tensors vLLM holds), every slice's A in one
    block (slices x slots x rank rows of `in`) and each B as slots x rank x out_i, and views of them are kept by the
    model's punica wrapper (they live as long as the model). vLLM writes an adapter into its slot only by indexed
    copies into these tensors (`set_lora`, `reset_lora`), which keep whatever layout they find, so the views stay
    current. Every eager op left out of a call counts: a call's small products cost less than the ops around them."""

    a: tuple[torch.Tensor, ...]  # each slice's A, every slot: slots x in x rank
    b: tuple[torch.Tensor, ...]  # each slice's B, every slot: slots x rank x out_i
    a_all: torch.Tensor  # every slice's A of every slot side by side: in x (slices x slots x rank)
    b_rows: tuple[torch.Tensor, ...]  # each slice's B, every slot's rows stacked: (slots x rank) x out_i
    offsets: tuple[int, ...]  # where each slice's output starts

    @functools.cached_property
    def arrays(self) -> tuple[np.ndarray, tuple[np.ndarray, ...], np.ndarray]:
        """The same buffers as numpy arrays (no copy) for the compiled product: every slice's A of every slot as rows
        (slices x slots x rank) x in, each B as slots x rank x out_i, and the slices' offsets."""
        return self.a_all.T.numpy(), tuple(b.numpy() for b in self.b), np.asarray(self.offsets, dtype=np.int64)

    @classmethod
    def of(cls, wrapper: Any, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...]) -> LayerSlots:
        layers = wrapper.__dict__.get("crlft_layer_slots")
        if layers is None:
            layers = wrapper.crlft_layer_slots = {}
        known = layers.get(id(lora_a))
        if known is not None and known[0] is lora_a:
            return known[1]
        n_slots, _, rank, width = lora_a[0].shape
        a_all = torch.cat([a.reshape(n_slots * rank, width) for a in lora_a])  # slices x slots x rank rows
        for i, a in enumerate(lora_a):
            a.set_(a_all.untyped_storage(), i * a.numel(), a.shape, a.stride())
        for b in lora_b:
            rows = b[:, 0].transpose(1, 2).contiguous()  # slots x rank x out
            b.set_(rows.untyped_storage(), 0, b.shape, (rows.stride(0), rows.stride(0), 1, rows.stride(1)))
        offsets = [0]
        for b in lora_b[:-1]:
            offsets.append(offsets[-1] + b.shape[2])
        b_views = tuple(b[:, 0].transpose(1, 2) for b in lora_b)  # each contiguous: its rows stack as views
        layer = cls(a=tuple(a[:, 0].transpose(1, 2) for a in lora_a), b=b_views, a_all=a_all.T,
                    b_rows=tuple(b.view(-1, b.shape[2]) for b in b_views), offsets=tuple(offsets))
        layers[id(lora_a)] = (lora_a, layer)  # the buffers kept with their views: the id stays theirs
        return layer


def _compiled_linear(slots: TokenGroups | int, out: torch.Tensor, x: torch.Tensor, layer: LayerSlots, scale: float,
                     products: Callable[..., None] | None = None) -> None:  # fmt: skip
    """Each token times its own slot's A and B only, compiled: the multiplications it needs, in one call a layer.
    `products`: one compiled form of the loops (benchmarks/lora_kernel.py compares them); by default the one that
    `lora_kernel.own_slot_products` picks for the batch."""
    from crlft.inference.lora_kernel import one_slot_order, own_slot_products

    products = products or own_slot_products
    n_slots = layer.b[0].shape[0]
    if isinstance(slots, TokenGroups):
        order, starts = slots.order, slots.starts
    else:
        order, starts = one_slot_order(slots, x.shape[0], n_slots)
    a_rows, b_all, offsets = layer.arrays
    products(out.numpy(), x.contiguous().numpy(), order, starts, a_rows, b_all, offsets, np.float32(scale))


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    """The products between A and B run in float32, as vLLM's buffer between its shrink and expand does."""
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def _one_adapter_linear(slot: int, out: torch.Tensor, x: torch.Tensor, layer: LayerSlots, scale: float) -> None:
    """Every token with the adapter of `slot`: per slice, one product with its A and one `addmm_` with its B."""
    x = _float32(x)
    for a, b, offset in zip(layer.a, layer.b, layer.offsets, strict=True):
        shrunk = x @ _float32(a[slot])  # tokens x rank
        if scale != 1.0:
            shrunk *= scale
        out[:, offset : offset + b.shape[2]].addmm_(shrunk.to(out.dtype), b[slot])


def _grouped_linear(groups: TokenGroups, out: torch.Tensor, x: torch.Tensor, layer: LayerSlots, scale: float) -> None:
    """Tokens of several slots: one product with every slot's A of every slice, each token's products with the slots
    not its own zeroed, then per slice one `addmm_` with every slot's B stacked, where those zeros pick the token's
    own. It multiplies by every slot, yet costs no more than a batched product over a grid of the slots where their
    tokens are even, and far less where one slot has most of them (a prompt beside other adapters' decoding), which
    the grid padded every slot to (benchmarks/RESULTS.md, "Every slot's A and B in one product")."""
    shrunk = _float32(x) @ _float32(layer.a_all)  # tokens x (slices x slots x rank)
    n_slices = len(layer.b_rows)
    rank = layer.a[0].shape[2]  # the view fails loudly if the batch's slots are not the buffers'
    shrunk.view(x.shape[0], n_slices, groups.n_slots, rank).mul_(groups.own if scale == 1.0 else scale * groups.own)
    width = shrunk.shape[1] // n_slices
    for i, (b, offset) in enumerate(zip(layer.b_rows, layer.offsets, strict=True)):
        out[:, offset : offset + b.shape[1]].addmm_(shrunk[:, i * width : (i + 1) * width].to(out.dtype), b)


_VLLM: dict[str, Any] = {}  # vLLM's own methods of the CPU punica wrapper, which `register` replaces


OPS = ("bgmv_expand", "bgmv_shrink", "bgmv_expand_slice", "sgmv_expand", "sgmv_shrink", "sgmv_expand_slice")


def register() -> None:
    """On vLLM's CPU platform, put these ops where its CPU punica wrapper looks them up. Idempotent: vLLM may load
    plugins more than once in a process."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for module in (lora_ops, punica_cpu):
        for name in OPS:
            setattr(module, name, globals()[name])
    wrapper = punica_cpu.PunicaWrapperCPU
    for name in ("update_metadata", "add_lora_linear"):
        if getattr(wrapper, name) is not globals()[name]:
            _VLLM[name] = getattr(wrapper, name)
            setattr(wrapper, name, globals()[name])
