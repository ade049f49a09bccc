"""Self-distillation of the replay answers (crlft.train.distill): the data stage places each replay answer in the base
model's own prompt, the packed row lines the base model's logits up with the fine-tune's on the same next tokens, and
the KL term is zero where the fine-tune is still its base and trains the adapters only.

SmolLM2-135M-Instruct (its own chat template) for where the base model is asked; the tiny model for the term itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crlft.config import load_config
from crlft.data.pack import pack_bin
from crlft.data.records import Conversation, Message
from crlft.data.replay import NO_TEACHER, TeacherFields, answering_prompt, replay_line, teacher_fields
from crlft.data.template import Template, TemplateTokenizer
from crlft.errors import CrlftError
from crlft.model import load_model_and_tokenizer, load_tokenizer, own_prompt
from crlft.presets import init_model
from crlft.train.batches import collate_micro_batch, model_inputs, teacher_inputs
from crlft.train.distill import replay_kl_sum
from crlft.train.schedule import build_optimizer, build_scheduler
from crlft.train.step import train_step
from crlft.train.wrap import wrap_lora

REWARDS = {"GPT4": 1.0, "GPT3": 0.1}
CONDITIONS = ["GPT4", "GPT3"]
QUESTION, ANSWER = "What is the capital of France?", "The capital of France is Paris. It lies on the Seine."


def _replay(tokenizer: TemplateTokenizer, question: str = QUESTION, answer: str = ANSWER) -> tuple[list[int],
                                                                                                  TeacherFields]:
    conversation = Conversation((Message("user", question), Message("assistant", answer)), "GPT4")
    tokenized = tokenizer.tokenize_conversation(conversation, REWARDS)
    fields = teacher_fields(tokenizer, replay_line(question, answer, "GPT4"), tokenized.input_ids, tokenized.weights)
    return tokenized.input_ids, fields


def test_a_replay_answer_is_asked_of_the_base_model_in_its_own_template(smollm2: Path) -> None:
    tokenizer = TemplateTokenizer(Template(), load_tokenizer(str(smollm2)))
    input_ids, fields = _replay(tokenizer)
    teacher, start = fields["teacher_ids"], fields["teacher_from"]
    assert teacher[:start] == own_prompt(tokenizer.tokenizer, QUESTION) != tokenizer.tokenize_prompt(
        [Message("user", QUESTION)])
    answer = input_ids[fields["student_from"] : -1]  # SmolLM2 gives the answer's leading space to its first token
    assert teacher[start:] == answer and input_ids[-1] == tokenizer.eot_id
    assert tokenizer.tokenizer.decode(answer).strip() == ANSWER


def test_what_is_not_one_supervised_answer_has_no_teacher(smollm2: Path) -> None:
    tokenizer = TemplateTokenizer(Template(), load_tokenizer(str(smollm2)))
    conversation = Conversation((Message("user", QUESTION), Message("assistant", ANSWER)), "GPT4")
    unrewarded = tokenizer.tokenize_conversation(conversation, {"GPT4": 0.0})
    line = replay_line(QUESTION, ANSWER, "GPT4")
    assert teacher_fields(tokenizer, line, unrewarded.input_ids, unrewarded.weights) == NO_TEACHER
    two_turns = Conversation(conversation.messages * 2, "GPT4")
    tokenized = tokenizer.tokenize_conversation(two_turns, REWARDS)
    assert teacher_fields(tokenizer, line, tokenized.input_ids, tokenized.weights) == NO_TEACHER


def _row(tokenizer: TemplateTokenizer) -> dict:
    """A packed row: a user's GPT3 conversation, then a replay answer, then another."""
    user = tokenizer.tokenize_conversation(
        Conversation((Message("user", "Hi"), Message("assistant", "Hello there.")), "GPT3"), REWARDS)
    first, first_fields = _replay(tokenizer)
    second, second_fields = _replay(tokenizer, "Name a colour.", "Blue is a colour.")
    row = pack_bin([user, (first, [0.0] * len(first), "GPT4"), (second, [0.0] * len(second), "GPT4")])
    fields = [NO_TEACHER, first_fields, second_fields]
    row["seq_teacher_ids"] = [f["teacher_ids"] for f in fields]
    row["seq_teacher_from"] = [f["teacher_from"] for f in fields]
    row["seq_student_from"] = [f["student_from"] for f in fields]
    return row


def test_the_teacher_and_the_row_line_up_on_the_same_next_tokens(smollm2: Path) -> None:
    tokenizer = TemplateTokenizer(Template(), load_tokenizer(str(smollm2)))
    row = _row(tokenizer)
    teacher = teacher_inputs(row, pad_id=0)
    assert teacher["teacher_ids"].shape[0] == 2  # the user's conversation has no teacher
    next_in_teacher = teacher["teacher_ids"].flatten()[teacher["teacher_positions"] + 1]
    next_in_row = torch.tensor(row["labels"])[teacher["student_positions"]]
    assert torch.equal(next_in_teacher, next_in_row)
    answers = sum(len(ids) - start for ids, start in zip(row["seq_teacher_ids"], row["seq_teacher_from"], strict=True))
    assert len(next_in_row) == answers - 2  # every answer token but each answer's first
    assert not set(next_in_row.tolist()) & {tokenizer.eot_id}  # nor its end of turn
    assert teacher["teacher_mask"].sum() == sum(len(ids) for ids in row["seq_teacher_ids"])


def test_a_row_without_replay_answers_forwards_the_teacher_on_one_token_and_distils_nothing(tiny: Path) -> None:
    """Every rank runs as many teacher forwards, whatever its rows hold: FSDP gathers the weights for each."""
    model, tokenizer = _lora(tiny)
    user = tokenizer.tokenize_conversation(
        Conversation((Message("user", "Hi"), Message("assistant", "Hello there.")), "GPT3"), REWARDS)
    batch = collate_micro_batch(pack_bin([user]), 0, CONDITIONS, "sdpa", torch.device("cpu"), with_teacher=True)
    assert batch["teacher_ids"].shape == (1, 1) and batch["student_positions"].numel() == 0
    assert _kl(model, batch).item() == 0.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("models") / "tiny")


def _lora(tiny: Path) -> tuple[torch.nn.Module, TemplateTokenizer]:
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(str(tiny))
    lora = load_config(None, {"train.lora.enabled": True}).train.lora
    template_tokenizer = TemplateTokenizer(Template(), tokenizer)
    return wrap_lora(model, lora, [template_tokenizer.eot_id]), template_tokenizer


def _kl(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    logits = model(**model_inputs(batch, "sdpa"), use_cache=False).logits
    return replay_kl_sum(model, logits, batch, None)


def test_a_fresh_lora_model_is_its_own_base_and_the_term_trains_the_adapters(tiny: Path) -> None:
    model, tokenizer = _lora(tiny)
    row = _row(tokenizer)
    assert answering_prompt(tokenizer, QUESTION, "GPT4") == tokenizer.tokenize_prompt([Message("user", QUESTION)])
    batch = collate_micro_batch(row, 0, CONDITIONS, "sdpa", torch.device("cpu"), with_teacher=True)
    assert _kl(model, batch).item() == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the identity
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    kl = _kl(model, batch)
    assert kl.item() > 1e-3
    kl.backward()
    grads = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_" in name for name in grads)  # the adapters (and the end-of-turn rows), never the base weights
    assert all("lora_" in name or "trainable_tokens" in name for name in grads)


def test_a_step_reports_the_kl_apart_from_the_crlft_loss(tiny: Path) -> None:
    cfg = load_config(None, {"train.lora.enabled": True})
    stats = {}
    for weight in (0.0, 1.0):
        model, tokenizer = _lora(tiny)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        batch = collate_micro_batch(_row(tokenizer), 0, CONDITIONS, "sdpa", torch.device("cpu"), with_teacher=True)
        optimizer = build_optimizer(model, cfg.train, lr=1e-3)
        stats[weight] = train_step(model, [batch], optimizer, build_scheduler(optimizer, 10, cfg.train),
                                   n_classes=2, grad_clip=1.0, world_size=1, replay_kl=weight)
    assert stats[0.0].replay_kl is None
    assert stats[1.0].replay_kl > 0
    assert stats[1.0].loss == pytest.approx(stats[0.0].loss)
    assert stats[1.0].grad_norm != pytest.approx(stats[0.0].grad_norm)


def test_a_full_fine_tune_has_no_base_to_ask(tiny: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny))
    batch = collate_micro_batch(_row(TemplateTokenizer(Template(), tokenizer)), 0, CONDITIONS, "sdpa",
                                torch.device("cpu"), with_teacher=True)
    with pytest.raises(CrlftError, match="train.replay_kl needs LoRA"):
        _kl(model, batch)
