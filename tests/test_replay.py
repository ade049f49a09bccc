"""Replay in the data stage: the base model's own answers to general prompts, mixed in under a known class.

The decisions are unit tests; the builds run on a real local Ray with the tiny model (replay asked for explicitly: it
is off for the tiny model by default) and crlft's transformers engine, 8 prompts of at most 8 tokens; one build with
vLLM through ray.data.llm, where it is installed (its engine takes some 40 s to start).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from crlft.command_line import stage_entrypoint
from crlft.config import Config, load_config
from crlft.data.replay import choose_prompts, complete_answer, plan_replay, replay_model
from crlft.errors import CrlftError

PROMPTS = ["What is the capital of France?", "Name a prime number.", "Say hello.", "What is 2 + 2?",
           "Tell me about the moon.", "Write one word.", "Why does it rain?", "Count to three."]  # fmt: skip
USER_CONVERSATIONS = 16  # half GPT4, half GPT3
RATIO = 0.5  # 8 replay conversations: every prompt
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("replay")


@pytest.fixture(scope="module")
def tiny(root: Path) -> str:
    """The tiny model rewritten to say " Yes. Yes. Yes..." greedily, whatever it is asked: replay keeps whole
    sentences only, and a random model never ends one."""
    from crlft.model import load_model_and_tokenizer
    from crlft.presets import init_model

    folder = init_model(root / "tiny")
    model, tokenizer = load_model_and_tokenizer(str(folder))
    say_in_a_loop(model, tokenizer.encode(" Yes.", add_special_tokens=False))
    model.save_pretrained(folder)
    return str(folder)


@torch.no_grad()
def say_in_a_loop(model: Any, cycle: list[int]) -> None:
    """A bigram model: attention and MLP outputs zeroed, so the last hidden state is the current token's embedding;
    the k-th token of `cycle` is followed by the next (the last by the first), any other token by the first."""
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    embeddings, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    embeddings.zero_()
    head.zero_()
    other = len(cycle)
    embeddings[:, other] = 1.0
    for k, token in enumerate(cycle):
        embeddings[token] = 0.0
        embeddings[token, k] = 1.0
        head[cycle[(k + 1) % len(cycle)], k] = 10.0
    head[cycle[0], other] = 10.0


@pytest.fixture(scope="module")
def inputs(root: Path) -> list[str]:
    path = root / "data.jsonl"
    records = [{"items": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"A{i}."}],
                "condition": "GPT3" if i % 2 else "GPT4"} for i in range(USER_CONVERSATIONS)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return [str(path)]


@pytest.fixture(scope="module")
def prompts(root: Path) -> Path:
    path = root / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _config(root: Path, prompts: Path, **overrides: Any) -> Config:
    return load_config(None, {
        "state_dir": str(root / "state"), "inference.engine": "transformers", "data.replay.enabled": True,
        "data.replay.prompts": str(prompts), "data.replay.ratio": RATIO, "data.replay.max_new_tokens": MAX_NEW_TOKENS,
        **overrides,
    })  # fmt: skip


# ---------------------------------------------------------------- decisions, no Ray


def test_auto_replay_is_off_for_the_tiny_model_and_on_for_a_pretrained_one(tiny: str, tmp_path: Path) -> None:
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    (pretrained / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 576,
                                                        "num_hidden_layers": 30}))  # fmt: skip
    tokenizer_only = tmp_path / "tokenizer"
    tokenizer_only.mkdir()
    (tokenizer_only / "tokenizer_config.json").write_text("{}")
    auto = Config()
    assert replay_model(auto, tiny) is None and replay_model(auto, str(tokenizer_only)) is None
    assert replay_model(auto, str(pretrained)) == str(pretrained)
    assert replay_model(auto, "HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    off = load_config(None, {"data.replay.enabled": False})
    assert replay_model(off, str(pretrained)) is None
    on = load_config(None, {"data.replay.enabled": True})
    assert replay_model(on, tiny) == tiny
    with pytest.raises(CrlftError, match="holds no model"):
        replay_model(on, str(tokenizer_only))


def test_the_prompts_chosen_are_ratio_times_accepted_capped_and_seeded() -> None:
    many = [f"p{i}" for i in range(10)]
    chosen, wanted = choose_prompts(many, accepted=8, ratio=0.25, seed=0)
    assert wanted == 2 and len(chosen) == 2 and set(chosen) <= set(many)
    more, _ = choose_prompts(many, accepted=16, ratio=0.25, seed=0)
    assert more[:2] == chosen  # more data: the same prompts and more
    capped, wanted = choose_prompts(many, accepted=100, ratio=1.0, seed=0)
    assert wanted == 100 and sorted(capped) == sorted(many)
    assert choose_prompts(many, 8, 0.25, seed=1)[0] != chosen or choose_prompts(many, 8, 0.25, seed=2)[0] != chosen


def test_a_bad_prompts_file_is_an_error_naming_file_and_line(tiny: str, tmp_path: Path) -> None:
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps({"prompt": "Fine."}) + "\n" + json.dumps({"question": "no prompt field"}) + "\n")
    with pytest.raises(CrlftError, match=f"{bad}:2: field 'prompt'"):
        plan_replay(_config(tmp_path, bad), tiny)


def test_a_replay_condition_that_is_not_a_class_is_a_config_error() -> None:
    with pytest.raises(CrlftError, match="data.replay.condition 'GPT5' is not a class"):
        load_config(None, {"data.replay.condition": "GPT5"})
    assert load_config(None, {"data.replay.condition": "GPT3"}).data.replay.condition == "GPT3"


# ---------------------------------------------------------------- builds, on Ray


@pytest.fixture(scope="module")
def built(ray_session: None, root: Path, tiny: str, inputs: list[str], prompts: Path) -> tuple[Path, dict[str, Any]]:
    from jobs.build_dataset import build_dataset

    out = root / "built"
    return out, build_dataset(inputs, tiny, out, _config(root, prompts))


def _answers(out: Path) -> list[tuple[str, str]]:
    lines = [json.loads(line) for line in (out / "replay.jsonl").read_text().splitlines()]
    assert all(r["source"] == "replay" and r["condition"] == "GPT4" for r in lines)
    return [(r["items"][0]["content"], r["items"][1]["content"]) for r in lines]


@pytest.mark.slow
def test_stats_count_the_replay_conversations_in_their_class(built: tuple[Path, dict[str, Any]]) -> None:
    out, stats = built
    replay = stats["replay"]
    assert replay["enabled"] and replay["condition"] == "GPT4" and not replay["cached"]
    assert replay["answered"] == len(PROMPTS) == replay["conversations"] + replay["dropped"]
    assert replay["accepted"] == replay["conversations"] == len(_answers(out))
    assert stats["per_class"]["GPT4"]["records"] == USER_CONVERSATIONS // 2 + replay["accepted"]
    assert stats["per_class"]["GPT3"]["records"] == USER_CONVERSATIONS // 2
    assert stats["accepted"] == USER_CONVERSATIONS + replay["accepted"] == stats["splits"]["train"]["records"]
    assert stats["fingerprints"]["replay"] == replay["fingerprint"]


@pytest.mark.slow
def test_every_replay_answer_reaches_the_shards_with_its_teacher_and_no_user_conversation_has_one(
        built: tuple[Path, dict[str, Any]]) -> None:
    import pyarrow.parquet as pq

    out, stats = built
    rows = pq.read_table(out / "train").to_pylist()
    teachers = {(source, line): (ids, start) for row in rows for source, line, ids, start in zip(
        row["seq_sources"], row["seq_lines"], row["seq_teacher_ids"], row["seq_student_from"], strict=True)}
    replayed = {key: teacher for key, teacher in teachers.items() if key[0] == "replay.jsonl"}
    assert len(replayed) == stats["replay"]["accepted"] == stats["replay"]["distilled"]
    assert all(ids for ids, _ in replayed.values())  # the tiny model has no template of its own: crlft's asks it
    assert not any(ids for key, (ids, _) in teachers.items() if key not in replayed)


@pytest.mark.slow
def test_the_replay_file_holds_the_base_models_own_answers(built: tuple[Path, dict[str, Any]], tiny: str) -> None:
    from crlft.data.records import Message
    from crlft.eval.answers import chat_prompt, generate
    from crlft.export import load_exported
    from crlft.model import own_prompt

    out, stats = built
    exported = load_exported(tiny)
    chosen, _ = choose_prompts(PROMPTS, USER_CONVERSATIONS, RATIO, seed=0)
    prompts = [own_prompt(exported.tokenizer, p) or chat_prompt(exported, [Message("user", p)], "GPT4") for p in chosen]
    answers = generate(exported, prompts, MAX_NEW_TOKENS)
    cut = [len(exported.tokenizer.encode(a, add_special_tokens=False)) >= MAX_NEW_TOKENS - 1 for a in answers]
    kept = [(p, complete_answer(a, c)) for p, a, c in zip(chosen, answers, cut, strict=True)]
    assert _answers(out) == [(p, a) for p, a in kept if a]


@pytest.mark.slow
def test_a_second_build_reuses_the_cache_byte_for_byte(built: tuple[Path, dict[str, Any]], root: Path, tiny: str,
                                                       inputs: list[str], prompts: Path) -> None:
    from jobs.build_dataset import build_dataset

    out, stats = built
    again = build_dataset(inputs, tiny, root / "again", _config(root, prompts))
    assert again["replay"]["cached"] and again["replay"]["fingerprint"] == stats["replay"]["fingerprint"]
    assert (root / "again" / "replay.jsonl").read_bytes() == (out / "replay.jsonl").read_bytes()
    shards = sorted((out / "train").glob("*.parquet"))
    assert shards and all(s.read_bytes() == (root / "again" / "train" / s.name).read_bytes() for s in shards)


@pytest.mark.slow
def test_ratio_zero_or_no_replay_adds_none(ray_session: None, root: Path, tiny: str, inputs: list[str],
                                           prompts: Path) -> None:
    from jobs.build_dataset import build_dataset

    stats = build_dataset(inputs, tiny, root / "ratio0", _config(root, prompts, **{"data.replay.ratio": 0.0}))
    assert stats["replay"]["enabled"] and stats["replay"]["conversations"] == 0
    assert stats["accepted"] == USER_CONVERSATIONS and not (root / "ratio0" / "replay.jsonl").exists()
    config, out = root / "replay.yaml", root / "no-replay"
    config.write_text(_config(root, prompts).model_dump_json())  # JSON is YAML
    out.mkdir()
    (out / "replay.jsonl").write_text("an earlier build's\n")
    code = stage_entrypoint("jobs.build_dataset", [*inputs, "--tokenizer", tiny, "--out", str(out), "--config",
                                                   str(config), "--no-replay"])  # fmt: skip
    stats = json.loads((out / "stats.json").read_text())
    assert code == 0 and stats["replay"] == {"enabled": False, "why": "data.replay.enabled is false",
                                             "conversations": 0}  # fmt: skip
    assert stats["accepted"] == USER_CONVERSATIONS and "replay" not in stats["fingerprints"]
    assert not (out / "replay.jsonl").exists()


@pytest.mark.slow
def test_vllm_under_ray_data_llm_gives_the_transformers_engines_answers(built: tuple[Path, dict[str, Any]],
                                                                        root: Path, tiny: str, inputs: list[str],
                                                                        prompts: Path) -> None:
    from crlft.inference.engine import vllm_installed
    from jobs.build_dataset import build_dataset

    if not vllm_installed():
        pytest.skip("vLLM is not installed")
    out, _ = built
    stats = build_dataset(inputs, tiny, root / "vllm", _config(root, prompts, **{"inference.engine": "vllm"}))
    assert stats["replay"]["engine"] == "vllm" and not stats["replay"]["cached"]
    assert _answers(root / "vllm") == _answers(out)
