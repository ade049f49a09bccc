"""Training: the pure step/schedule pieces (fast), and Ray Train end to end on real local Ray (slow).

The Ray tests share one Ray session, one tiny model and small packed datasets written here directly with
crlft.data.template + crlft.data.pack (the same rows the data stage writes), so the number of bins is exact.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from crlft.config import Config, Mode, load_config, overridden
from crlft.data.pack import PackedRow, collate, pack_bin
from crlft.data.records import Conversation, Message
from crlft.data.template import Template, TemplateTokenizer
from crlft.environ import set_offline_defaults
from crlft.errors import CrlftError
from crlft.train.batches import (
    applied_rewards,
    collate_micro_batch,
    model_inputs,
    rescale_row,
    reward_scale,
    sequence_starts,
)
from crlft.train.checkpoint import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    TrainingPosition,
    load_model_weights,
    load_training_state,
    save_training_state,
)
from crlft.train.loss import token_cross_entropy
from crlft.train.lr import auto_lr, supervised_tokens_per_step
from crlft.train.rng import restore_rng_state, seed_everything
from crlft.train.schedule import build_optimizer, build_scheduler, lr_factor, plan_steps, warmup_steps
from crlft.train.step import train_step
from crlft.train.wrap import wrap_lora

set_offline_defaults()

CONDITIONS = ["GPT4", "GPT3"]
# The default LoRA targets (all-linear): every linear layer of a Llama but the output head.
LINEAR_WEIGHTS = tuple(f"{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"))


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny model and packed datasets


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from crlft.presets import init_model

    return init_model(tmp_path_factory.mktemp("models") / "tiny")


def arithmetic_conversations(n: int, seed: int = 0) -> list[Conversation]:
    """Expert (GPT4) conversations answer sums right; sub-optimal (GPT3) ones are often off."""
    rng = random.Random(seed)
    conversations = []
    for i in range(n):
        a, b = rng.randint(0, 30), rng.randint(0, 30)
        expert = i % 2 == 0
        answer = f"{a} + {b} = {a + b}." if expert else f"{a} + {b} = {a + b + rng.randint(-3, 3)}, I think."
        messages = (Message("user", f"What is {a} + {b}?"), Message("assistant", answer))
        conversations.append(Conversation(messages, "GPT4" if expert else "GPT3"))
    return conversations


def config(tmp: Path, **overrides: Any) -> Config:
    base = {
        "state_dir": str(tmp / "state"),
        "registry.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "train.storage_path": str(tmp / "ray_results"),
        "train.cpus_per_worker": 0.5,
        "train.lr": 3e-3,
        "data.max_len": 256,
        "data.pack_len": 256,
    }
    return load_config(None, {**base, **overrides})


def packed_rows(model_dir: Path, cfg: Config, bins: int, per_bin: int, seed: int = 0) -> list[PackedRow]:
    """`bins` rows of `per_bin` conversations each, tokenized with the template of `cfg`'s mode."""
    from crlft.model import load_tokenizer

    template_tokenizer = TemplateTokenizer(Template.from_config(cfg), load_tokenizer(str(model_dir)))
    rewards = {name: cfg.reward(name) for name in cfg.classes}
    tokenized = [template_tokenizer.tokenize_conversation(c, rewards)
                 for c in arithmetic_conversations(bins * per_bin, seed)]
    return [pack_bin(tokenized[i * per_bin : (i + 1) * per_bin]) for i in range(bins)]


def write_dataset(out: Path, model_dir: Path, mode: str, bins: int, per_bin: int = 4, val_bins: int = 0) -> Path:
    """A data folder as jobs.build_dataset writes it: train/ (and val/) Parquet shards of packed rows, stats.json."""
    from crlft.model import load_tokenizer

    cfg = load_config(None, {"train.mode": mode})
    rows = packed_rows(model_dir, cfg, bins + val_bins, per_bin)
    for split, split_rows in (("train", rows[:bins]), ("val", rows[bins:])):
        if split_rows:
            (out / split).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(split_rows), out / split / f"{split}-00000.parquet")
    per_class = {name: {"records": 0, "tokens": 0, "supervised_tokens": 0, "truncated": 0} for name in cfg.classes}
    for row in rows:
        for condition, length in zip(row["seq_conditions"], row["seq_lens"], strict=True):
            per_class[condition]["records"] += 1
            per_class[condition]["tokens"] += length
        for condition, start, length in zip(row["seq_conditions"], sequence_starts(row["seq_lens"]), row["seq_lens"],
                                            strict=True):
            per_class[condition]["supervised_tokens"] += sum(w > 0 for w in row["weights"][start : start + length])
    fingerprint = TemplateTokenizer(Template.from_config(cfg), load_tokenizer(str(model_dir))).fingerprint()
    stats = {
        "mode": mode, "conditions": list(cfg.classes), "rewards": {c: cfg.reward(c) for c in cfg.classes},
        "pack_len": 256, "bins": bins + val_bins, "per_class": per_class, "tokenizer": str(model_dir),
        "fingerprints": {"inputs": f"test-{mode}-{bins}", "tokenizer_template": fingerprint},
    }  # fmt: skip
    (out / "stats.json").write_text(json.dumps(stats))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Learning rate, schedule, plan


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor() -> None:
    total, warmup, floor = 100, warmup_steps(100, 0.05), 0.1
    factors = [lr_factor(step, total, warmup, floor) for step in range(total)]
    assert warmup == 5
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[5] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[5:], factors[6:], strict=False))
    assert factors[-1] == pytest.approx(floor)
    midway = 5 + (total - 5 - 1) / 2
    assert lr_factor(int(midway), total, warmup, floor) == pytest.approx(floor + (1 - floor) / 2, abs=0.02)


def test_a_single_step_run_uses_the_peak_without_warmup_and_ends_on_it() -> None:
    assert lr_factor(0, 1, 0, 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 1, 1, 0.1) == pytest.approx(1.0)


def test_auto_lr_is_the_reference_rule() -> None:
    assert auto_lr(4e6) == pytest.approx(3e-4)
    assert auto_lr(1e6) == pytest.approx(1.5e-4)
    # the paper's 13B run: ~200k supervised tokens a step -> ~6.7e-5
    assert auto_lr(2e5) == pytest.approx(6.7e-5, rel=0.01)
    assert supervised_tokens_per_step(pack_len=4096, world_size=8, grad_accum=2, supervised_ratio=0.5) == 32768
    with pytest.raises(CrlftError, match="no supervised tokens"):
        auto_lr(0)


def test_the_scheduler_drives_the_optimizer_lr_and_only_matrices_decay() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    cfg = load_config(None, {"train.warmup": 0.5, "train.lr_floor": 0.0})
    optimizer = build_optimizer(model, cfg.train, lr=1.0)
    scheduler = build_scheduler(optimizer, total_steps=4, train=cfg.train)
    decays = {group["weight_decay"]: len(group["params"]) for group in optimizer.param_groups}
    assert decays == {0.1: 1, 0.0: 3}  # the Linear weight decays; its bias and the norm's weight and bias do not
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95) and optimizer.param_groups[0]["eps"] == 1e-5
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.0])


def test_the_plan_gives_each_rank_an_equal_share_and_a_partial_last_step() -> None:
    plan = plan_steps(bins=11, world_size=2, grad_accum=2, epochs=3, max_steps=None)
    assert (plan.bins_per_rank, plan.steps_per_epoch, plan.total_steps, plan.epochs) == (5, 3, 9, 3)
    cut = plan_steps(bins=11, world_size=2, grad_accum=2, epochs=3, max_steps=4)
    assert (cut.total_steps, cut.epochs) == (4, 2)
    with pytest.raises(CrlftError, match="fewer than the 4 workers"):
        plan_steps(bins=3, world_size=4, grad_accum=1, epochs=1, max_steps=None)


def test_rescaling_turns_crlft_weights_into_the_weights_of_the_conditioned_mode() -> None:
    data_rewards = applied_rewards(True, {"GPT4": 1.0, "GPT3": 0.1})
    scale = reward_scale(data_rewards, {"GPT4": 1.0, "GPT3": 1.0})
    row = pack_bin([([1, 2, 3], [0.0, 1.0, 1.0], "GPT4"), ([4, 5, 6], [0.0, 0.1, 0.1], "GPT3")])
    rescaled = rescale_row(row, scale)
    assert rescaled["weights"] == pytest.approx([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    assert rescale_row(row, {"GPT4": 1.0, "GPT3": 1.0}) is row
    # data built without rewards (conditioned) carries weight 1: the crlft mode scales GPT3 down to its reward
    assert reward_scale(applied_rewards(False, {"GPT4": 1.0, "GPT3": 0.1}), {"GPT4": 1.0, "GPT3": 0.1}) == {
        "GPT4": 1.0, "GPT3": 0.1}  # fmt: skip
    with pytest.raises(CrlftError, match="does not define"):
        reward_scale({"Human": 1.0}, {"GPT4": 1.0})


# ---------------------------------------------------------------------------------------------------------------------
# The step


def _model(model_dir: Path) -> torch.nn.Module:
    from crlft.model import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(model_dir))
    return model


def _batch(rows: Sequence[PackedRow]) -> dict[str, torch.Tensor]:
    return collate(rows, None, 0, CONDITIONS)


def test_accumulated_micro_batches_make_the_same_step_as_one_batch_of_all_rows(tiny_model: Path) -> None:
    torch.manual_seed(0)
    cfg = load_config(None, {})
    rows = packed_rows(tiny_model, cfg, bins=2, per_bin=3)
    accumulated, whole = _model(tiny_model), _model(tiny_model)
    results = []
    for model, micro_batches in ((accumulated, [_batch(rows[:1]), _batch(rows[1:])]), (whole, [_batch(rows)])):
        optimizer = build_optimizer(model, cfg.train, lr=1e-2)
        scheduler = build_scheduler(optimizer, 10, cfg.train)
        results.append(train_step(model, micro_batches, optimizer, scheduler, n_classes=2, grad_clip=1.0,
                                     world_size=1))
    acc, one = results
    assert acc.loss == pytest.approx(one.loss, rel=1e-5)
    assert acc.grad_norm == pytest.approx(one.grad_norm, rel=1e-4)
    assert acc.supervised_tokens == one.supervised_tokens > 0
    torch.testing.assert_close(acc.class_sums.ce_sum, one.class_sums.ce_sum, rtol=1e-5, atol=1e-4)
    for (name, a), b in zip(accumulated.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_the_step_loss_is_the_weighted_mean_over_every_micro_batch(tiny_model: Path) -> None:
    cfg = load_config(None, {})
    rows = packed_rows(tiny_model, cfg, bins=2, per_bin=2, seed=1)
    model = _model(tiny_model)
    batches = [_batch(rows[:1]), _batch(rows[1:])]
    with torch.no_grad():
        numerator = sum((b["weights"] * token_cross_entropy(model(**model_inputs(b, "sdpa")).logits,
                                                                b["labels"])).sum() for b in batches)
    expected = float(numerator / sum(b["weights"].sum() for b in batches))
    optimizer = build_optimizer(model, cfg.train, lr=1e-3)
    stats = train_step(model, batches, optimizer, build_scheduler(optimizer, 5, cfg.train), n_classes=2,
                          grad_clip=1.0, world_size=1)
    assert stats.loss == pytest.approx(expected, rel=1e-5)
    assert stats.tokens == sum(len(r["input_ids"]) for r in rows)


def test_a_packed_bin_computes_each_conversation_as_if_it_were_alone(tiny_model: Path) -> None:
    cfg = load_config(None, {})
    row = packed_rows(tiny_model, cfg, bins=1, per_bin=3, seed=2)[0]
    model = _model(tiny_model).eval()
    with torch.no_grad():
        packed = collate_micro_batch(row, 0, CONDITIONS, "sdpa", torch.device("cpu"))
        packed_ce = token_cross_entropy(model(**model_inputs(packed, "sdpa")).logits, packed["labels"])[0]
        start = 0
        for length in row["seq_lens"]:
            alone = pack_bin([(row["input_ids"][start : start + length], [0.0] * length, "GPT4")])
            batch = collate([alone], None, 0, CONDITIONS)
            ce = token_cross_entropy(model(**model_inputs(batch, "sdpa")).logits, batch["labels"])[0]
            torch.testing.assert_close(packed_ce[start : start + length], ce, rtol=1e-4, atol=1e-5)
            start += length


def test_training_state_round_trips_weights_optimizer_scheduler_position_and_rng(
    tiny_model: Path, tmp_path: Path
) -> None:
    cfg = load_config(None, {})
    rows = packed_rows(tiny_model, cfg, bins=1, per_bin=2)
    model = wrap_lora(_model(tiny_model), cfg.train.lora, [])
    optimizer = build_optimizer(model, cfg.train, lr=1e-2)
    scheduler = build_scheduler(optimizer, 10, cfg.train)
    train_step(model, [_batch(rows)], optimizer, scheduler, n_classes=2, grad_clip=1.0, world_size=1)
    seed_everything(7)
    save_training_state(tmp_path, model, optimizer, scheduler, TrainingPosition(1, 0, 1), {"run": "x"})
    expected_draws = (random.random(), torch.rand(3))

    restored = wrap_lora(_model(tiny_model), cfg.train.lora, [])
    restored_optimizer = build_optimizer(restored, cfg.train, lr=1e-2)
    restored_scheduler = build_scheduler(restored_optimizer, 10, cfg.train)
    loaded = load_training_state(tmp_path, restored, restored_optimizer, restored_scheduler)
    restore_rng_state(loaded.rng_states[0])

    assert loaded.position == TrainingPosition(1, 0, 1) and loaded.extra == {"run": "x"}
    assert (random.random(), torch.rand(3)) == (expected_draws[0], pytest.approx(expected_draws[1]))
    assert restored_scheduler.state_dict()["last_epoch"] == 1
    saved = torch.load(tmp_path / MODEL_FILE, weights_only=True)
    assert saved and all("lora_" in name for name in saved)  # frozen base weights are not in the checkpoint
    for a, b in zip(model.parameters(), restored.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    state, restored_state = optimizer.state_dict()["state"], restored_optimizer.state_dict()["state"]
    assert state.keys() == restored_state.keys()
    for key in state:
        torch.testing.assert_close(state[key]["exp_avg_sq"], restored_state[key]["exp_avg_sq"])


def test_loading_a_checkpoint_into_a_different_model_says_what_differs(tiny_model: Path, tmp_path: Path) -> None:
    cfg = load_config(None, {})
    lora = wrap_lora(_model(tiny_model), cfg.train.lora, [])
    optimizer = build_optimizer(lora, cfg.train, lr=1e-2)
    save_training_state(tmp_path, lora, optimizer, build_scheduler(optimizer, 2, cfg.train),
                           TrainingPosition())
    with pytest.raises(CrlftError, match="same base model and LoRA settings"):
        load_model_weights(tmp_path, _model(tiny_model))


def test_lora_targets_missing_from_the_model_name_its_layers(tiny_model: Path) -> None:
    cfg = load_config(None, {"train.lora.target_modules": ["c_attn"]})
    with pytest.raises(CrlftError, match="q_proj"):
        wrap_lora(_model(tiny_model), cfg.train.lora, [])


# ---------------------------------------------------------------------------------------------------------------------
# The data description


def test_data_of_another_template_is_refused_with_what_to_rebuild(tiny_model: Path, tmp_path: Path) -> None:
    from jobs.training.data import describe_data

    data = write_dataset(tmp_path / "data", tiny_model, "crlft", bins=2, per_bin=1)
    with pytest.raises(CrlftError, match="rebuild the data with --mode sft"):
        describe_data(data, load_config(None, {"train.mode": "sft"}))
    described = describe_data(data, load_config(None, {"train.mode": "conditioned"}))
    assert described.reward_scale == {"GPT4": 1.0, "GPT3": pytest.approx(10.0)}
    assert 0 < described.supervised_ratio < 1 and not described.has_val
    with pytest.raises(CrlftError, match="build the data first"):
        describe_data(tmp_path / "nothing", load_config(None, {}))


def test_data_tokenized_with_another_tokenizer_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    from crlft.presets import init_model
    from jobs.training.data import check_tokenizer, describe_data

    data = describe_data(write_dataset(tmp_path / "data", tiny_model, "crlft", bins=2, per_bin=1), Config())
    other = init_model(tmp_path / "other", texts=["a completely different corpus 123"] * 20)
    check_tokenizer(data, str(tiny_model), Config())
    with pytest.raises(CrlftError, match="rebuild the data with this model's tokenizer"):
        check_tokenizer(data, str(other), Config())


# ---------------------------------------------------------------------------------------------------------------------
# Ray Train end to end


@pytest.fixture(scope="module")
def datasets(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        # 2 bins: with 2 workers (or 1 worker accumulating 2) every step sees the same global batch
        "conditioned": write_dataset(root / "conditioned", tiny_model, "crlft", bins=2, val_bins=2),
        "plain": write_dataset(root / "plain", tiny_model, "sft", bins=2),
        "long": write_dataset(root / "long", tiny_model, "crlft", bins=24, per_bin=2),
    }


def _train(data: Path, model: Path, out: Path, cfg: Config, resume: bool = False) -> Any:
    from jobs.train import train

    return train(data, str(model), out, cfg, resume=resume)


def _loss_history(cfg: Config, run_id: str, key: str = "loss") -> list[float]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(cfg.registry.tracking_uri).get_metric_history(run_id, key)
    return [m.value for m in sorted(history, key=lambda m: m.step)]


@pytest.fixture(scope="module")
def crlft_two_workers(ray_session: None, datasets: dict[str, Path], tiny_model: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Config]:
    tmp = tmp_path_factory.mktemp("crlft2")
    cfg = config(tmp, **{"train.workers": 2, "train.epochs": 3, "train.checkpoint_every": 1})
    return _train(datasets["conditioned"], tiny_model, tmp / "out", cfg), cfg


def _check_exported(out: Path, mode: Mode) -> None:
    """transformers alone loads it; its chat template prompts with the condition exactly when the mode uses it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True, condition="GPT3")
    assert ("GPT3 User: Hi" in prompt) == mode.uses_condition
    assert prompt.endswith("GPT3 Assistant:" if mode.uses_condition else "Assistant:")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert model(input_ids=ids).logits.isfinite().all()
    assert not any("lora" in name for name, _ in model.named_parameters())


@pytest.mark.slow
def test_two_cpu_workers_train_crlft_track_it_in_mlflow_export_and_register_the_model(
    crlft_two_workers: tuple[Any, Config], tmp_path: Path,
) -> None:
    from mlflow.tracking import MlflowClient

    from crlft.export import read_meta
    from crlft.lineage.promotion import promote
    from jobs.evaluate import evaluate_model

    result, cfg = crlft_two_workers
    assert result.steps == 3 and result.restored_from_step is None
    assert set(result.final_loss_by_class) == {"GPT4", "GPT3"} and set(result.val_loss_by_class) == {"GPT4", "GPT3"}
    losses = _loss_history(cfg, result.mlflow_run_id)
    assert len(losses) == 3 and losses[-1] < losses[0]
    client = MlflowClient(cfg.registry.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert {"loss", "loss_GPT4", "loss_GPT3", "lr", "grad_norm", "supervised_tokens_per_s", "val_loss_GPT4",
            "val_loss_GPT3"} <= set(run.data.metrics)
    assert run.data.params["train.mode"] == "crlft" and run.data.params["data.pack_len"] == "256"
    assert run.data.tags["crlft.data_fingerprint"] == run.data.params["data.fingerprint"]
    assert {a.path for a in client.list_artifacts(result.mlflow_run_id, "model")} >= {"model/crlft.json",
                                                                                    "model/model.safetensors"}
    meta = read_meta(result.out_dir)
    assert meta.mode == "crlft" and meta.extra["mlflow_run_id"] == result.mlflow_run_id
    assert meta.extra["mlflow_artifact_uri"] == result.model_artifact_uri and meta.extra["steps"] == 3
    _check_exported(result.out_dir, Mode.crlft)
    # Registered as a version (lineage tags) that `crlft eval` finds and records on, and `crlft promote` promotes.
    name = cfg.registry.model_name
    version = client.get_model_version(name, result.model_version)
    assert version.run_id == result.mlflow_run_id and version.source == result.model_artifact_uri
    assert version.tags["crlft.mode"] == "crlft" and version.tags["crlft.data_fingerprint"]
    suite = tmp_path / "suite.jsonl"
    suite.write_text("".join(json.dumps({"prompt": f"What is {a}+1?", "answer": f"{a + 1}"}) + "\n" for a in range(3)))
    report = evaluate_model(result.out_dir, suite, overridden(cfg, {"eval.max_new_tokens": 4}),
                            out_dir=tmp_path / "eval")
    assert report["model_version"] == {"name": name, "version": result.model_version}  # found, not registered again
    decision = promote(name, result.model_version, cfg=cfg)
    assert decision.is_champion, decision.summary()


@pytest.mark.slow
def test_a_run_without_a_learning_rate_says_which_it_chose_and_why_and_learns(
    ray_session: None, datasets: dict[str, Path], tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = config(tmp_path, **{"train.lr": None, "train.epochs": 1})  # 24 steps of 2 conversations: a tiny batch
    result = _train(datasets["long"], tiny_model, tmp_path / "out", cfg)
    printed = capsys.readouterr().out
    assert re.search(r"\[train\] learning rate \S+: the reference's rule .* gives \S+, too small", printed), printed
    losses = _loss_history(cfg, result.mlflow_run_id)
    assert sum(losses[-4:]) < 0.9 * sum(losses[:4]), losses


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "data", "settings"),
    [
        ("conditioned", "conditioned", {}),
        ("weighted", "plain", {"train.lora.enabled": True}),
        ("sft", "plain", {"train.strategy": "fsdp", "train.gradient_checkpointing": True}),
    ],
)
def test_two_cpu_workers_train_each_ablation_mode_and_strategy(
    mode: str, data: str, settings: dict[str, Any], ray_session: None, datasets: dict[str, Path], tiny_model: Path,
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path, **{"train.workers": 2, "train.epochs": 2, "train.mode": mode, **settings})
    result = _train(datasets[data], tiny_model, tmp_path / "out", cfg)
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.final_loss))
    _check_exported(result.out_dir, Mode(mode))
    if cfg.train.lora.enabled:  # the merged model differs from the base only through the adapters and end-of-turn rows
        from safetensors.torch import load_file

        base, merged = load_file(tiny_model / "model.safetensors"), load_file(result.out_dir / "model.safetensors")
        assert base.keys() == merged.keys()
        changed = {name for name in base if not torch.equal(base[name], merged[name])}
        assert {"model.embed_tokens.weight", "lm_head.weight"} < changed
        assert all(name.endswith((*LINEAR_WEIGHTS, "embed_tokens.weight", "lm_head.weight"))
                   for name in changed)


@pytest.mark.slow
def test_two_ddp_workers_follow_the_loss_trajectory_of_one_worker_on_the_same_global_batch(
    crlft_two_workers: tuple[Any, Config], datasets: dict[str, Path], tiny_model: Path, tmp_path: Path
) -> None:
    two_workers, two_cfg = crlft_two_workers
    cfg = config(tmp_path, **{"train.workers": 1, "train.grad_accum": 2, "train.epochs": 3})
    one_worker = _train(datasets["conditioned"], tiny_model, tmp_path / "out", cfg)
    expected = _loss_history(cfg, one_worker.mlflow_run_id)
    assert _loss_history(two_cfg, two_workers.mlflow_run_id) == pytest.approx(expected, rel=1e-4)
    for key in ("loss_GPT4", "loss_GPT3", "grad_norm"):
        assert _loss_history(two_cfg, two_workers.mlflow_run_id, key) == pytest.approx(
            _loss_history(cfg, one_worker.mlflow_run_id, key), rel=1e-4)


def in_thread(run: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """`run()` on a daemon thread; the dict gets its "result" or the "error" it raised."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = run()
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def _run_and_kill_a_worker(run: Any, storage: Path, timeout_s: float = 240) -> tuple[Any, BaseException | None]:
    """Start `run` in a thread; once its first checkpoint is registered, SIGKILL one Ray Train worker by pid."""
    from ray.util.state import list_actors

    thread, outcome = in_thread(run)
    deadline = time.monotonic() + timeout_s
    killed = False
    while not killed and thread.is_alive() and time.monotonic() < deadline:
        snapshots = list(storage.glob("*/checkpoint_manager_snapshot.json"))
        registered = any(json.loads(s.read_text() or "{}").get("checkpoint_results") for s in snapshots
                         if s.stat().st_size)
        if registered:
            import ray

            address = ray.get_runtime_context().gcs_address
            workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"),
                                                            ("state", "=", "ALIVE")])
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                killed = True
        time.sleep(0.05)
    thread.join(timeout_s)
    assert killed, "the run ended before a worker could be killed"
    return outcome.get("result"), outcome.get("error")


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_the_run_continues_from_its_checkpoint(
    ray_session: None, datasets: dict[str, Path], tiny_model: Path, tmp_path: Path
) -> None:
    cfg = config(tmp_path, **{"train.workers": 2, "train.epochs": 3, "train.checkpoint_every": 4,
                              "train.max_failures": 1})
    result, error = _run_and_kill_a_worker(lambda: _train(datasets["long"], tiny_model, tmp_path / "out", cfg),
                                           tmp_path / "ray_results")
    assert error is None
    assert result.steps == 36 and result.restored_from_step is not None and result.restored_from_step % 4 == 0


@pytest.mark.slow
def test_a_stopped_run_resumes_to_the_same_steps_and_optimizer_state_as_an_uninterrupted_one(
    ray_session: None, datasets: dict[str, Path], tiny_model: Path, tmp_path: Path
) -> None:
    settings = {"train.workers": 1, "train.epochs": 2, "train.checkpoint_every": 5, "train.max_failures": 0}
    straight_cfg = config(tmp_path / "straight", **settings)
    straight = _train(datasets["long"], tiny_model, tmp_path / "straight" / "out", straight_cfg)

    cfg = config(tmp_path / "stopped", **settings)
    out = tmp_path / "stopped" / "out"
    _, error = _run_and_kill_a_worker(lambda: _train(datasets["long"], tiny_model, out, cfg),
                                      tmp_path / "stopped" / "ray_results")
    assert isinstance(error, CrlftError) and "--resume" in str(error)
    resumed = _train(datasets["long"], tiny_model, out, cfg, resume=True)

    assert resumed.steps == straight.steps == 48
    assert resumed.restored_from_step is not None and resumed.restored_from_step % 5 == 0
    assert resumed.final_loss == pytest.approx(straight.final_loss, rel=1e-5)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.registry.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.registry.experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [resumed.mlflow_run_id]  # the stopped run's MLflow run continued
    resumed_state = torch.load(Path(resumed.checkpoint_path) / OPTIMIZER_FILE, weights_only=True)
    straight_state = torch.load(Path(straight.checkpoint_path) / OPTIMIZER_FILE, weights_only=True)
    assert resumed_state["state"].keys() == straight_state["state"].keys()
    for name, moments in straight_state["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(resumed_state["state"][name][key], moments[key], rtol=1e-4, atol=1e-7)


def test_resume_without_a_run_to_resume_says_so(datasets: dict[str, Path], tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(CrlftError, match="nothing to resume"):
        _train(datasets["plain"], tiny_model, tmp_path / "out", config(tmp_path, **{"train.mode": "sft"}),
               resume=True)


def test_the_cli_maps_its_flags_onto_the_config() -> None:
    import argparse

    from crlft.command_line import config_from_args
    from jobs.train import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--data", "d", "--out", "o", "--mode", "sft", "--workers", "2", "--lora", "--epochs",
                              "1", "--set", "train.grad_accum=4"])
    cfg = config_from_args(args)
    assert (cfg.train.mode, cfg.train.workers, cfg.train.lora.enabled, cfg.train.epochs, cfg.train.grad_accum) == (
        Mode.sft, 2, True, 1, 4)
    assert cfg.train.use_gpu is False and not args.resume


def test_a_failed_run_names_each_workers_cause_and_prefers_the_user_facing_message() -> None:
    from ray.train import WorkerGroupError

    from jobs.train import failure_summary

    wrapped = RuntimeError("worker crashed")
    wrapped.__cause__ = ValueError("shape mismatch in layer 3\ntraceback lines")
    error = WorkerGroupError("Training failed", {0: CrlftError("no model at models/tiny: run init-model"), 1: wrapped})
    expected = "rank 0: no model at models/tiny: run init-model; rank 1: shape mismatch in layer 3"
    assert failure_summary(error) == expected
