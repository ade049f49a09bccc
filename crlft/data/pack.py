"""Packing tokenized conversations into fixed-capacity bins, and collating bins into model inputs.

A bin holds whole conversations back to back (first-fit-decreasing, as the reference packs its data). Inside a bin
every conversation keeps its own position ids (restarting at 0), its own next-token labels (never pointing into
the next conversation), and an attention mask that never crosses a conversation boundary, so a packed forward
computes for each conversation exactly what it would compute alone.

How transformers 5.23 takes the mask (read from masking_utils.py and models/llama/modeling_llama.py):
`create_causal_mask` returns any 4D tensor as it is, for every attention implementation, and skips its own packed
sequence detection from position ids. The tensor then reaches the kernel untouched:
- "sdpa" hands it to torch's scaled_dot_product_attention: a bool mask (True = may attend) or an additive float.
- "eager" ADDS it to the attention scores: it must be an additive float (0 = attend, dtype minimum = blocked);
  a bool mask there would silently add 0/1 and mask nothing.
- "flex_attention" takes a BlockMask (torch.nn.attention.flex_attention) instead of a tensor: the same mask, stored
  as the tiles that hold any allowed pair, so the kernel skips the rest. It has no backward pass on CPU (torch 2.13).
A row with nothing to attend to yields zeros (torch's safe softmax, sdpa on CPU) or NaN (some GPU kernels) or a
uniform average (eager); to stay out of that, every padding token attends to itself only.
Without a mask, transformers infers packing from position ids only when no KV cache exists (use_cache=False);
with the default cache of an eval forward it silently attends across conversations: the explicit mask has no such trap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NotRequired, Protocol, TypedDict

import torch

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

IGNORE_INDEX = -100  # label of a position with no next-token target; torch's cross-entropy default ignore_index
PADDING = -1  # sequence id and class id of padding positions
MIN_TRAIN_BINS = 64  # bins (steps an epoch, for one worker) an unset data.pack_len packs a small training set into
PACK_LEN_MULTIPLE = 16  # an unset data.pack_len is a multiple of this, but for a longest conversation above it


class PackedRow(TypedDict):
    """One bin: plain Python lists, so that it stores as a Parquet row as it is."""

    input_ids: list[int]
    labels: list[int]  # labels[i] = input_ids[i + 1] inside a conversation; IGNORE_INDEX on its last token
    weights: list[float]  # loss weight of labels[i] (the target token's weight, shifted like the labels)
    position_ids: list[int]  # restart at 0 for each conversation
    seq_lens: list[int]
    seq_conditions: list[str]
    # Per conversation, a replay answer's teacher (crlft.data.replay.TeacherFields; empty ids: none). Absent in rows
    # packed without them; crlft.train.distill reads them.
    seq_teacher_ids: NotRequired[list[list[int]]]
    seq_teacher_from: NotRequired[list[int]]
    seq_student_from: NotRequired[list[int]]


class TokenizedLike(Protocol):
    """What the template produces (crlft.data.template.TokenizedConversation has these fields)."""

    @property
    def input_ids(self) -> Sequence[int]: ...

    @property
    def weights(self) -> Sequence[float]: ...

    @property
    def condition(self) -> str: ...


# A conversation to pack: (input_ids, weights, condition) or an object with those three fields.
Tokenized = tuple[Sequence[int], Sequence[float], str] | TokenizedLike


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` per bin: longest first (ties by index), each into the first bin it fits.

    Deterministic. Runs in O(n log n): a max segment tree over the bins' free space finds the first bin that fits
    (a plain scan over all open bins is quadratic, minutes on a real data set).
    """
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    for index, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"sequence {index} has {length} tokens, more than the bin capacity {capacity}")
        if length <= 0:
            raise ValueError(f"sequence {index} has {length} tokens; every sequence needs at least one")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    leaves = 1
    while leaves < max(len(lengths), 1):
        leaves *= 2
    # free[leaves + b] = free space of bin b (capacity for bins not opened yet); free[node] = max of its children.
    free = [capacity] * (2 * leaves)
    bins: list[list[int]] = []
    for index in order:
        length = lengths[index]
        node = 1
        while node < leaves:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        bin_index = node - leaves
        if bin_index == len(bins):
            bins.append([])
        bins[bin_index].append(index)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def auto_pack_len(max_len: int, train_tokens: int, longest: int) -> int:
    """data.pack_len when unset: max_len, or for a training set of fewer than MIN_TRAIN_BINS bins of it, the largest
    multiple of PACK_LEN_MULTIPLE that packs the set into at least MIN_TRAIN_BINS bins, never below its longest
    conversation. Packed into max_len bins, a small set makes a handful of optimiser steps an epoch (144 short
    conversations in 2048-token bins: 6), too few to learn from; shorter bins keep an epoch's tokens, not its steps."""
    target = train_tokens // MIN_TRAIN_BINS // PACK_LEN_MULTIPLE * PACK_LEN_MULTIPLE
    return min(max_len, max(longest, target, PACK_LEN_MULTIPLE))


def packing_efficiency(lengths: Sequence[int], bins: Sequence[Sequence[int]], capacity: int) -> float:
    """Share of the bins' token slots that hold real tokens."""
    if not bins:
        return 1.0
    return sum(lengths[i] for members in bins for i in members) / (len(bins) * capacity)


def padding_efficiency(lengths: Sequence[int], batch_size: int) -> float:
    """Share of real tokens under naive batching: consecutive batches, each padded to its own longest sequence."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    slots = sum(
        len(batch) * max(batch)
        for batch in (lengths[start : start + batch_size] for start in range(0, len(lengths), batch_size))
    )
    return sum(lengths) / slots if slots else 1.0


def shift_for_next_token(input_ids: Sequence[int], weights: Sequence[float]) -> tuple[list[int], list[float]]:
    """Labels and weights aligned with the logits: position i predicts token i + 1 with that token's weight.

    The last position has no target: label IGNORE_INDEX, weight 0.
    """
    if len(input_ids) != len(weights):
        raise ValueError(f"input_ids has {len(input_ids)} tokens but weights has {len(weights)}")
    labels = [*input_ids[1:], IGNORE_INDEX]
    shifted_weights = [*(float(w) for w in weights[1:]), 0.0]
    return labels, shifted_weights


def _fields(conversation: Tokenized) -> tuple[Sequence[int], Sequence[float], str]:
    if isinstance(conversation, tuple):
        return conversation
    return conversation.input_ids, conversation.weights, conversation.condition


def pack_bin(conversations: Sequence[Tokenized]) -> PackedRow:
    """One row holding `conversations` back to back, each shifted and positioned on its own."""
    row = PackedRow(input_ids=[], labels=[], weights=[], position_ids=[], seq_lens=[], seq_conditions=[])
    for number, conversation in enumerate(conversations):
        input_ids, weights, condition = _fields(conversation)
        if not input_ids:
            raise ValueError(f"conversation {number} of the bin is empty")
        labels, shifted_weights = shift_for_next_token(input_ids, weights)
        row["input_ids"].extend(int(t) for t in input_ids)
        row["labels"].extend(labels)
        row["weights"].extend(shifted_weights)
        row["position_ids"].extend(range(len(input_ids)))
        row["seq_lens"].append(len(input_ids))
        row["seq_conditions"].append(condition)
    return row


def block_causal_mask(sequence_ids: torch.Tensor) -> torch.Tensor:
    """Bool mask (B, 1, T, T), True where query i may attend key j: same conversation and j <= i.

    `sequence_ids` (B, T) numbers the conversations of each row; PADDING positions attend to themselves only.
    """
    length = sequence_ids.shape[1]
    positions = torch.arange(length, device=sequence_ids.device)
    # Give each padding position an id of its own, so its block is the 1x1 diagonal entry.
    blocks = torch.where(sequence_ids == PADDING, -1 - positions, sequence_ids)
    same_block = blocks[:, :, None] == blocks[:, None, :]
    causal = positions[:, None] >= positions[None, :]
    return (same_block & causal).unsqueeze(1)


def flex_block_mask(sequence_ids: torch.Tensor) -> BlockMask:
    """`block_causal_mask` as FlexAttention's BlockMask, built on the device of `sequence_ids`: the kernel skips
    every tile (128 x 128 tokens) in which no query may attend any key, so attention across the conversations of a
    bin is not computed at all, where sdpa computes it and masks it out."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = sequence_ids.shape

    def same_conversation_causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        same = (sequence_ids[b, q] == sequence_ids[b, k]) & (sequence_ids[b, q] != PADDING)
        return (same & (k <= q)) | (q == k)

    return create_block_mask(same_conversation_causal, batch, None, length, length, device=sequence_ids.device)


def attention_mask_for(
    sequence_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype
) -> torch.Tensor | BlockMask:
    """The conversations' mask in the form the attention implementation consumes (see the module docstring)."""
    if attn_implementation == "flex_attention":
        return flex_block_mask(sequence_ids)
    mask = block_causal_mask(sequence_ids)
    if attn_implementation == "sdpa":
        return mask
    if attn_implementation == "eager":
        blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=mask.device)
        return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), blocked)
    raise ValueError(
        f"packed batches support attn_implementation 'sdpa', 'eager' or 'flex_attention', not "
        f"{attn_implementation!r} (flash attention takes packed sequences as one row with position ids, no mask)"
    )


def collate(
    rows: Sequence[PackedRow],
    pad_to: int | None,
    pad_id: int,
    conditions: Sequence[str] | None = None,
    attn_implementation: str | None = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Packed rows as one right-padded batch.

    Returns input_ids, labels (IGNORE_INDEX on padding), weights (float32, 0 on padding), position_ids (0 on padding),
    attention_mask (B, 1, T, T) for `attn_implementation` (additive in `dtype` for eager, bool for sdpa, a BlockMask
    for flex_attention; no attention_mask when `attn_implementation` is None),
    sequence_ids (B, T) numbering conversations within each row (PADDING on padding) and, when `conditions` gives
    the class order, class_ids (B, T): the index of each token's class in `conditions` (PADDING on padding).
    T is the longest row, or `pad_to`.
    """
    if not rows:
        raise ValueError("cannot collate an empty list of rows")
    longest = max(len(row["input_ids"]) for row in rows)
    if pad_to is not None and pad_to < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({longest} tokens)")
    length = longest if pad_to is None else pad_to
    class_index = {name: index for index, name in enumerate(conditions or ())}

    def padded(values: Sequence[int] | Sequence[float], fill: float) -> list[float]:
        return [*values, *([fill] * (length - len(values)))]

    def per_token(row: PackedRow, values: Sequence[int]) -> list[int]:
        return [value for value, n in zip(values, row["seq_lens"], strict=True) for _ in range(n)]

    def class_ids(row: PackedRow) -> list[int]:
        unknown = sorted(set(row["seq_conditions"]) - set(class_index))
        if unknown:
            raise ValueError(f"row conditions {unknown} are not among the classes {list(class_index)}")
        return per_token(row, [class_index[name] for name in row["seq_conditions"]])

    sequence_ids = torch.tensor(
        [padded(per_token(row, range(len(row["seq_lens"]))), PADDING) for row in rows], dtype=torch.long
    )
    batch = {
        "input_ids": torch.tensor([padded(row["input_ids"], pad_id) for row in rows], dtype=torch.long),
        "labels": torch.tensor([padded(row["labels"], IGNORE_INDEX) for row in rows], dtype=torch.long),
        "weights": torch.tensor([padded(row["weights"], 0.0) for row in rows], dtype=torch.float32),
        "position_ids": torch.tensor([padded(row["position_ids"], 0) for row in rows], dtype=torch.long),
        "sequence_ids": sequence_ids,
    }
    if attn_implementation is not None:
        batch["attention_mask"] = attention_mask_for(sequence_ids, attn_implementation, dtype)
    if conditions is not None:
        batch["class_ids"] = torch.tensor([padded(class_ids(row), PADDING) for row in rows], dtype=torch.long)
    return batch
