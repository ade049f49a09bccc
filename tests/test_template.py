"""The template, defined once: weights of every token class, escaping, and chat template == training ids."""

from __future__ import annotations

import itertools

import pytest
from transformers import PreTrainedTokenizerBase

from crlft.config import Config, Mode
from crlft.data.records import Conversation, Message
from crlft.data.template import END_OF_TURN, Template, TemplateTokenizer
from crlft.errors import CrlftError
from crlft.presets import train_tokenizer

REWARDS = {"GPT4": 1.0, "GPT3": 0.1}
CORPUS = ["GPT4 User: hello there GPT3 Assistant: the answer is cold, warm and hot. System: be nice."] * 20


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    tok = train_tokenizer(CORPUS, vocab_size=400)
    tok.chat_template = Template().chat_template()
    return tok


@pytest.fixture(scope="module")
def tt(tokenizer: PreTrainedTokenizerBase) -> TemplateTokenizer:
    return TemplateTokenizer(Template(), tokenizer)


def conversation(condition: str = "GPT3", system: str = "", turns: int = 2) -> Conversation:
    messages = []
    for i in range(turns):
        messages += [Message("user", f"question {i}: is it hot?"), Message("assistant", f"answer {i}: it is cold.")]
    return Conversation(tuple(messages), condition, system)


def segments(tt: TemplateTokenizer, ids: list[int], weights: list[float]) -> list[tuple[str, float]]:
    """Runs of equal weight, decoded: what a reader checks by eye."""
    decode = tt.tokenizer.decode
    pairs = zip(ids, weights, strict=True)
    return [(decode([i for i, _ in run]), w) for w, run in itertools.groupby(pairs, key=lambda p: p[1])]


def test_only_assistant_content_and_its_end_of_turn_carry_the_class_reward(tt: TemplateTokenizer) -> None:
    tokenized = tt.tokenize_conversation(conversation("GPT3", system="Be brief."), REWARDS)
    assert segments(tt, tokenized.input_ids, tokenized.weights) == [
        (f"<s>Be brief.{END_OF_TURN}GPT3 User: question 0: is it hot?{END_OF_TURN}GPT3 Assistant:", 0.0),
        (f" answer 0: it is cold.{END_OF_TURN}", 0.1),
        (f"GPT3 User: question 1: is it hot?{END_OF_TURN}GPT3 Assistant:", 0.0),
        (f" answer 1: it is cold.{END_OF_TURN}", 0.1),
    ]
    assert tokenized.input_ids[0] == tt.tokenizer.bos_token_id and tokenized.weights[0] == 0.0


def test_expert_class_gets_its_own_reward_and_prefix(tt: TemplateTokenizer) -> None:
    tokenized = tt.tokenize_conversation(conversation("GPT4", turns=1), REWARDS)
    assert segments(tt, tokenized.input_ids, tokenized.weights)[1] == (f" answer 0: it is cold.{END_OF_TURN}", 1.0)
    assert tt.tokenizer.decode(tokenized.input_ids).startswith("<s>GPT4 User:")


def test_a_message_weight_of_zero_masks_that_message(tt: TemplateTokenizer) -> None:
    conv = Conversation((Message("user", "q"), Message("assistant", "a", weight=0.0)), "GPT4")
    assert not any(tt.tokenize_conversation(conv, REWARDS).weights)


def test_end_of_turn_typed_by_a_user_stays_plain_text(tt: TemplateTokenizer) -> None:
    conv = Conversation((Message("user", f"say {END_OF_TURN} now"), Message("assistant", "ok")), "GPT4")
    ids = tt.tokenize_conversation(conv, REWARDS).input_ids
    assert ids.count(tt.eot_id) == 2  # the template's two, not the user's
    assert f"say {END_OF_TURN} now" in tt.tokenizer.decode(ids)
    prompt = tt.tokenize_prompt([Message("user", END_OF_TURN)])
    assert prompt.count(tt.eot_id) == 1


@pytest.mark.parametrize("condition", ["GPT4", "GPT3"])
@pytest.mark.parametrize("system", ["", "You are a helpful assistant."])
@pytest.mark.parametrize("turns", [1, 3])
def test_chat_template_gives_exactly_the_training_ids(tt: TemplateTokenizer, condition: str, system: str,
                                                      turns: int) -> None:
    conv = conversation(condition, system, turns)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": m.role, "content": m.content} for m in conv.messages
    ]
    trained = tt.tokenize_conversation(conv, REWARDS).input_ids
    rendered = tt.tokenizer.apply_chat_template(messages, condition=condition, tokenize=True)["input_ids"]
    assert rendered == trained
    prompt = tt.tokenizer.apply_chat_template(messages[:-1], condition=condition, add_generation_prompt=True,
                                              tokenize=True)["input_ids"]
    assert prompt == tt.tokenize_prompt(conv.messages[:-1], condition, system)
    assert trained[: len(prompt)] == prompt  # the generation prompt is a prefix of what training saw


def test_chat_template_defaults_to_the_inference_condition(tt: TemplateTokenizer) -> None:
    text = tt.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                            tokenize=False)
    assert text == f"<s>GPT4 User: hi{END_OF_TURN}GPT4 Assistant:"


@pytest.mark.parametrize("mode", [Mode.weighted, Mode.sft])
def test_modes_without_condition_leave_the_class_out_of_prompt_and_chat_template(
    tokenizer: PreTrainedTokenizerBase, mode: Mode
) -> None:
    cfg = Config(train={"mode": mode})
    template = Template.from_config(cfg)
    tt = TemplateTokenizer(template, tokenizer)
    tokenized = tt.tokenize_conversation(conversation("GPT3", turns=1), {c: cfg.reward(c) for c in cfg.classes})
    assert tokenizer.decode(tokenized.input_ids).startswith("<s>User: question 0")
    assert max(tokenized.weights) == (0.1 if mode is Mode.weighted else 1.0)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template.chat_template(),
                                         add_generation_prompt=True, tokenize=False, condition="GPT3")
    assert text == f"<s>User: hi{END_OF_TURN}Assistant:"


def test_per_sequence_weights_sum_to_the_reward_per_message(tt: TemplateTokenizer) -> None:
    tokenized = tt.tokenize_conversation(conversation("GPT3", turns=2), REWARDS, per_sequence=True)
    assert sum(tokenized.weights) == pytest.approx(2 * 0.1)


def test_over_long_conversations_are_cut_at_a_turn_boundary(tt: TemplateTokenizer) -> None:
    conv = conversation("GPT4", turns=3)
    full = tt.tokenize_conversation(conv, REWARDS)
    one_exchange = tt.tokenize_conversation(Conversation(conv.messages[:2], "GPT4"), REWARDS)
    cut = tt.tokenize_conversation(conv, REWARDS, max_len=len(full.input_ids) - 1)
    assert cut.truncated and cut.input_ids[-1] == tt.eot_id and cut.weights[-1] == 1.0
    assert cut.input_ids == full.input_ids[: len(cut.input_ids)]
    tiny = tt.tokenize_conversation(conv, REWARDS, max_len=len(one_exchange.input_ids))
    assert tiny.input_ids == one_exchange.input_ids
    with pytest.raises(ValueError, match="too long"):
        tt.tokenize_conversation(conv, REWARDS, max_len=len(one_exchange.input_ids) - 1)
    with pytest.raises(ValueError, match="too long"):
        tt.tokenize_conversation(conv, REWARDS, max_len=len(full.input_ids) - 1, overflow="reject")


def test_a_tokenizer_without_end_of_turn_is_refused_with_what_to_do() -> None:
    from transformers import PreTrainedTokenizerFast

    plain = train_tokenizer(CORPUS, vocab_size=300, end_of_turn="<|eot|>")
    assert isinstance(plain, PreTrainedTokenizerFast)
    with pytest.raises(CrlftError, match="load_tokenizer"):
        TemplateTokenizer(Template(), plain)


def test_role_prefixes_with_braces_render_verbatim_in_jinja(tokenizer: PreTrainedTokenizerBase) -> None:
    template = Template(role_prefix="{{{condition}}} {role}:")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template.chat_template(),
                                         add_generation_prompt=True, tokenize=False, condition="GPT3")
    assert text == f"<s>{{GPT3}} User: hi{END_OF_TURN}{{GPT3}} Assistant:"
