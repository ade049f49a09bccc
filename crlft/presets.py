"""The embedded default models, built from nothing: the tiny and small Llama presets, the byte-level BPE tokenizer
crlft trains for them (on a built-in corpus unless given texts), and `init_model`, which writes both as a Hugging Face
folder. Loading any model, these included, is crlft/model.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, set_seed

from crlft.errors import CrlftError

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"

# LlamaConfig kwargs; vocab_size and the special-token ids come from the tokenizer at init time.
# tie_word_embeddings is off so that the output row of a newly added token has its own initialisation.
PRESETS: dict[str, dict] = {
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "small": {
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, end_of_turn: str = "<|end_of_turn|>"
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer that encodes any text and never adds BOS/EOS by itself.

    All 256 byte symbols are in the initial alphabet, so there is no unknown token. The template adds BOS
    explicitly, hence no post-processor inserts special tokens.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, end_of_turn],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[end_of_turn],
        add_bos_token=False,
        add_eos_token=False,
    )


def default_corpus() -> list[str]:
    """A small built-in English corpus (chat-like lines, prose, digits, punctuation) to train the default tokenizer."""
    subjects = ["The cat", "My friend", "A student", "The old man", "Our team", "The robot", "She", "He", "They", "We"]
    verbs = ["likes", "reads", "writes", "finds", "builds", "explains", "remembers", "needs", "sees", "wants"]
    objects = [
        "a short story",
        "the answer",
        "fresh bread",
        "a new idea",
        "the red box",
        "three apples",
        "a simple plan",
        "the river",
        "an email",
        "good music",
    ]
    endings = [".", "!", "?", " today.", " every morning.", ", I think.", " again and again."]
    every_fourth_combination = itertools.islice(itertools.product(subjects, verbs, objects), 0, None, 4)
    prose = [
        f"{subject} {verb} {obj}{ending}"
        for (subject, verb, obj), ending in zip(every_fourth_combination, itertools.cycle(endings))
    ]
    questions = ["What is", "Can you explain", "Why is", "How do I use", "Tell me about", "Please describe"]
    topics = [
        "the weather",
        "a binary search",
        "photosynthesis",
        "the capital of France",
        "a good breakfast",
        "prime numbers",
        "the moon",
        "learning to cook",
        "Python lists",
        "a healthy habit",
    ]
    answers = [
        "Sure, here is a clear answer.",
        "It depends on the context, but usually yes.",
        "Here are three steps: first, second, and third.",
        "I am not sure; please give more details.",
        "The short answer is no.",
        "Great question! Let me explain it simply.",
    ]
    chat = [
        f"User: {question} {topic}?\nAssistant: {answer}"
        for (question, topic), answer in zip(itertools.product(questions, topics), itertools.cycle(answers))
    ]
    arithmetic = [f"{a} + {b} = {a + b}; {a} * {b} = {a * b}." for a, b in itertools.product(range(0, 20, 3), repeat=2)]
    misc = [
        "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 -42 1,000,000 50% $9.99 #1 (a) [b] {c} <d>",
        "Punctuation: , . ; : ! ? ' \" - -- ... / \\ | @ & * ^ ~ ` _ = + % $ #",
        "Lists:\n- one\n- two\n- three\n1. first\n2. second",
        "Code: def add(a, b):\n    return a + b\nprint(add(2, 3))",
        "Dates and times: 2024-01-31, 12:30 pm, Monday, March 3rd.",
        "Unicode: café, naïve, résumé, Ünïcödé, 東京, 😀 👍",
    ]
    return prose + chat + arithmetic + misc


def init_model(
    out_dir: str | Path,
    texts: Iterable[str] | None = None,
    preset: str = "tiny",
    seed: int = 0,
    chat_template: str | None = None,
    end_of_turn: str = "<|end_of_turn|>",
) -> Path:
    """Build a freshly initialised Llama model and its tokenizer and save both (safetensors) into out_dir."""
    if preset not in PRESETS:
        raise CrlftError(f"unknown model preset {preset!r}: choose one of {', '.join(sorted(PRESETS))}")
    set_seed(seed)
    tokenizer = train_tokenizer(default_corpus() if texts is None else texts, end_of_turn=end_of_turn)
    model_kwargs = PRESETS[preset]
    tokenizer.model_max_length = model_kwargs["max_position_embeddings"]
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **model_kwargs,
    )
    model = LlamaForCausalLM(config)
    end_of_turn_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = [end_of_turn_id, tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
