"""Packed rows -> micro-batches: a row as Ray Data yields it as the lists crlft.data.pack takes, its weights rescaled
from the rewards baked into the data to the training mode's, one packed bin a micro-batch on the device, and the model's
inputs for the attention implementation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from crlft.data.pack import PackedRow, attention_mask_for, collate
from crlft.errors import CrlftError


def applied_rewards(mode_uses_reward: bool, rewards: Mapping[str, float]) -> dict[str, float]:
    """The weights a mode writes for each class: its reward, or 1.0 when the mode ignores rewards."""
    return {name: (float(reward) if mode_uses_reward else 1.0) for name, reward in rewards.items()}


def reward_scale(data_rewards: Mapping[str, float], train_rewards: Mapping[str, float]) -> dict[str, float]:
    """Per class, what turns the weights baked into the data into the weights of the training mode.

    Token weights are reward * message weight, so crlft and conditioned (or weighted and sft) data differ only by this
    factor: one tokenized dataset serves both modes of the same template.
    """
    missing = sorted(set(data_rewards) - set(train_rewards))
    if missing:
        raise CrlftError(f"the data has classes {missing} that the configuration does not define")
    return {name: train_rewards[name] / reward for name, reward in data_rewards.items()}


def rescale_row(row: PackedRow, scale: Mapping[str, float]) -> PackedRow:
    """The row with each conversation's weights multiplied by its class's factor (unchanged when all are 1)."""
    factors = [scale[name] for name in row["seq_conditions"]]
    if all(factor == 1.0 for factor in factors):
        return row
    weights = [
        w * factor
        for factor, start, length in zip(factors, sequence_starts(row["seq_lens"]), row["seq_lens"], strict=True)
        for w in row["weights"][start : start + length]
    ]
    return {**row, "weights": weights}


def sequence_starts(lengths: Sequence[int]) -> list[int]:
    """Where each conversation of a packed row starts, from their lengths."""
    return [sum(lengths[:i]) for i in range(len(lengths))]


def as_packed_row(record: Mapping[str, Any]) -> PackedRow:
    """A row as Ray Data / pyarrow yield it (numpy arrays) as the plain lists crlft.data.pack.collate takes."""
    row = PackedRow(
        input_ids=_as_list(record["input_ids"]),
        labels=_as_list(record["labels"]),
        weights=_as_list(record["weights"]),
        position_ids=_as_list(record["position_ids"]),
        seq_lens=_as_list(record["seq_lens"]),
        seq_conditions=[str(c) for c in record["seq_conditions"]],
    )
    if "seq_teacher_ids" in record:  # data built before replay answers carried their teacher has none
        row["seq_teacher_ids"] = [_as_list(ids) for ids in record["seq_teacher_ids"]]
        row["seq_teacher_from"] = _as_list(record["seq_teacher_from"])
        row["seq_student_from"] = _as_list(record["seq_student_from"])
    return row


def _as_list(values: Any) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def teacher_inputs(row: PackedRow, pad_id: int) -> dict[str, torch.Tensor]:
    """What crlft.train.distill needs of a packed row: its replay answers' teacher inputs, right-padded (teacher_ids,
    teacher_mask), and for every distilled token the flat index of its logits in that batch (teacher_positions) and in
    the row (student_positions), in the same order. Logits at index i predict token i + 1: an answer of n tokens gives
    n - 1 (its first token is not distilled). A row without replay answers gets one padding token to forward and no
    position: every rank then runs as many teacher forwards (FSDP gathers the weights on all ranks for each)."""
    teachers = [
        (ids, teacher_from, start + student_from)
        for ids, teacher_from, student_from, start in zip(
            row.get("seq_teacher_ids", []), row.get("seq_teacher_from", []), row.get("seq_student_from", []),
            sequence_starts(row["seq_lens"]), strict=False)  # rows without teachers: no field, nothing to zip
        if len(ids) - teacher_from > 1
    ]  # fmt: skip
    length = max((len(ids) for ids, _, _ in teachers), default=1)
    ids, mask = ([], []) if teachers else ([[pad_id]], [[1]])
    teacher_positions: list[int] = []
    student_positions: list[int] = []
    for index, (teacher_ids, teacher_from, student_from) in enumerate(teachers):
        padding = length - len(teacher_ids)
        ids.append([*teacher_ids, *[pad_id] * padding])
        mask.append([1] * len(teacher_ids) + [0] * padding)
        distilled = range(len(teacher_ids) - teacher_from - 1)
        teacher_positions += [index * length + teacher_from + k for k in distilled]
        student_positions += [student_from + k for k in distilled]
    return {
        "teacher_ids": torch.tensor(ids, dtype=torch.long),
        "teacher_mask": torch.tensor(mask, dtype=torch.long),
        "teacher_positions": torch.tensor(teacher_positions, dtype=torch.long),
        "student_positions": torch.tensor(student_positions, dtype=torch.long),
    }


def collate_micro_batch(
    row: PackedRow, pad_id: int, conditions: Sequence[str], attn_implementation: str, device: torch.device,
    with_teacher: bool = False,
) -> dict[str, torch.Tensor]:
    """One packed bin as a batch of one, on `device`, with the attention mask built there (none for flash attention,
    which reads the conversations from the position ids); `with_teacher`: and its replay answers' `teacher_inputs`."""
    tensors = collate([row], None, pad_id, conditions, attn_implementation=None)
    if with_teacher:
        tensors.update(teacher_inputs(row, pad_id))
    batch = {name: tensor.to(device, non_blocking=True) for name, tensor in tensors.items()}
    if not attn_implementation.startswith("flash"):
        batch["attention_mask"] = attention_mask_for(batch["sequence_ids"], attn_implementation, torch.float32)
    return batch


def model_inputs(batch: Mapping[str, torch.Tensor], attn_implementation: str) -> dict[str, torch.Tensor]:
    """Keyword arguments of the model's forward. Flash attention takes packed sequences from the position ids
    (varlen kernels); the other implementations take the block-diagonal mask."""
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if not attn_implementation.startswith("flash"):
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs
