"""Self-distillation of the replay answers: besides the cross-entropy on the base model's greedy answers, the fine-tune
is held to the base model's whole next-token distribution over them (crlft.data.replay makes the answers).

    loss = C-RLFT loss + train.replay_kl * sum_t KL(p_base(. | its prompt, a_<t) || p_model(. | crlft's prompt, a_<t))
                                          / sum_t w_t

t runs over each replay answer's tokens but the first (its leading space differs between the two prompts) and its end
of turn (the base model ends its turn with its own token); the sum is normalised as the C-RLFT loss is, by the step's
global weight sum (crlft.train.loss). The base model is asked as it answered, in its own chat template, and is the
LoRA model with its adapters off (PEFT's `disable_adapter`): no second copy of the weights, one forward without
gradient over the replay answers. A full fine-tune has no base model left to ask: the term needs LoRA.
Distillation from the teacher's full distribution rather than its samples: Hinton et al. 2015 (arXiv 1503.02531); what
it kept here against cross-entropy alone is in RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from crlft.errors import CrlftError
from crlft.train.precision import autocast_context


def replay_kl_sum(
    model: nn.Module, logits: torch.Tensor, batch: Mapping[str, torch.Tensor], autocast_dtype: torch.dtype | None
) -> torch.Tensor:
    """Sum over the batch's distilled tokens of KL(base || model), differentiable in `logits` (the model's forward on
    the packed row); the teacher's tensors come from crlft.train.batches.teacher_inputs."""
    peft_model = getattr(model, "module", model)  # DDP wraps the model; FSDP2 shards it in place
    if not hasattr(peft_model, "disable_adapter"):
        raise CrlftError("train.replay_kl needs LoRA (train.lora.enabled=true): the base model is the model with its "
                         "adapters off; set train.replay_kl=0 for a full fine-tune")
    training = peft_model.training
    peft_model.eval()  # the base model as it answered: no dropout
    try:
        with torch.no_grad(), peft_model.disable_adapter(), autocast_context(logits.device, autocast_dtype):
            teacher_logits = peft_model(input_ids=batch["teacher_ids"], attention_mask=batch["teacher_mask"],
                                        use_cache=False).logits
    finally:
        peft_model.train(training)
    vocab = logits.shape[-1]
    teacher = teacher_logits.reshape(-1, vocab)[batch["teacher_positions"]].float().log_softmax(-1)
    student = logits.reshape(-1, vocab)[batch["student_positions"]].float().log_softmax(-1)
    return F.kl_div(student, teacher, reduction="sum", log_target=True)
