"""The generation engine without Ray: batching changes nothing but speed; stops, streaming and usage are exact."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from crlft.config import Config
from crlft.data.records import Message
from crlft.export import ExportedModel, ModelMeta, load_exported, save_exported
from crlft.inference.generate import BatchGenerator, EngineLoop, GenerationRequest
from crlft.inference.sampling import Completion, SamplingParams, StopText, sample_next
from crlft.model import load_model_and_tokenizer
from crlft.presets import init_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    base = init_model(tmp_path_factory.mktemp("base"))
    model, tokenizer = load_model_and_tokenizer(str(base))
    out = save_exported(model, tokenizer, tmp_path_factory.mktemp("exported"), ModelMeta.from_config(Config()))
    torch.set_num_threads(1)  # the tiny model is fastest on one thread; the box is shared
    return load_exported(out)


def _engine(exported: ExportedModel, **kwargs: int) -> BatchGenerator:
    return BatchGenerator(exported.model, exported.tokenizer, [exported.template_tokenizer.eot_id], **kwargs)


def _prompt(exported: ExportedModel, text: str) -> list[int]:
    return exported.template_tokenizer.tokenize_prompt([Message("user", text)])


def _greedy(prompt: list[int], max_tokens: int, **kwargs: object) -> GenerationRequest:
    return GenerationRequest(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs))


PROMPTS = ["hi", "tell me about the moon and the river", "2 + 2 =", "a much longer question " * 6]


def test_batched_greedy_generation_equals_one_request_at_a_time(exported: ExportedModel) -> None:
    prompts = [_prompt(exported, p) for p in PROMPTS]
    engine = _engine(exported)
    alone = [engine.generate([_greedy(p, 24)])[0] for p in prompts]
    together = engine.generate([_greedy(p, 24 - 5 * i) for i, p in enumerate(prompts)])
    for one, batched in zip(alone, together, strict=True):
        assert batched.token_ids == one.token_ids[: len(batched.token_ids)]


def test_requests_joining_a_running_batch_get_the_same_tokens_as_alone(exported: ExportedModel) -> None:
    prompts = [_prompt(exported, p) for p in PROMPTS]
    engine = _engine(exported)
    alone = [engine.generate([_greedy(p, 16)])[0].token_ids for p in prompts]
    results: dict[int, Completion] = {}
    for i, prompt in enumerate(prompts):  # each joins after the earlier ones have decoded a few tokens
        engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=16, temperature=0.0),
                                        on_finish=lambda c, i=i: results.__setitem__(i, c)))
        for _ in range(3):
            engine.step()
    while engine.has_work():
        engine.step()
    assert [results[i].token_ids for i in range(len(prompts))] == alone


def test_the_batch_never_exceeds_max_batch_size_and_queued_requests_still_finish(exported: ExportedModel) -> None:
    engine = _engine(exported, max_batch_size=2)
    requests = [_greedy(_prompt(exported, p), 8) for p in PROMPTS]
    for r in requests:
        engine.submit(r)
    seen = 0
    while engine.has_work():
        engine.step()
        seen = max(seen, engine.num_running)
    assert seen == 2
    assert engine.num_running == engine.num_waiting == 0


def test_usage_counts_are_exact_and_length_stops_at_max_tokens(exported: ExportedModel) -> None:
    prompt = _prompt(exported, "count my tokens")
    [done] = _engine(exported).generate([_greedy(prompt, 7)])
    assert done.finish_reason == "length"
    assert done.prompt_tokens == len(prompt)
    assert done.completion_tokens == len(done.token_ids) == 7


def test_generation_stops_at_end_of_turn_which_counts_as_a_token_but_is_not_text(exported: ExportedModel) -> None:
    eot = exported.template_tokenizer.eot_id

    def force_end_of_turn(_module: torch.nn.Module, _inputs: object, logits: torch.Tensor) -> torch.Tensor:
        logits[..., eot] += 1e4
        return logits

    hook = exported.model.lm_head.register_forward_hook(force_end_of_turn)
    try:
        [done] = _engine(exported).generate([_greedy(_prompt(exported, "say nothing"), 50)])
    finally:
        hook.remove()
    assert (done.finish_reason, done.text, done.token_ids) == ("stop", "", (eot,))


def test_stop_string_ends_the_text_before_it_and_is_never_streamed(exported: ExportedModel) -> None:
    prompt = _prompt(exported, "tell me about the moon")
    engine = _engine(exported)
    [free] = engine.generate([_greedy(prompt, 30)])
    assert len(free.text) > 8, "the fixture model must say something to cut"
    stop = free.text[5:8]
    pieces: list[str] = []
    request = GenerationRequest(prompt, SamplingParams(max_tokens=30, temperature=0.0, stop=("<never>", stop)),
                                on_text=pieces.append)
    [done] = engine.generate([request])
    assert done.finish_reason == "stop"
    assert done.text == free.text[: free.text.find(stop)]
    assert "".join(pieces) == done.text
    assert done.token_ids == free.token_ids[: len(done.token_ids)]
    assert done.completion_tokens < free.completion_tokens


def test_streamed_pieces_add_up_to_the_final_text(exported: ExportedModel) -> None:
    pieces: list[str] = []
    request = GenerationRequest(_prompt(exported, "stream please"), SamplingParams(max_tokens=25, seed=3),
                                on_text=pieces.append)
    [done] = _engine(exported).generate([request])
    assert len(pieces) > 1
    assert "".join(pieces) == done.text


def test_same_seed_gives_the_same_sample_whatever_else_is_in_the_batch(exported: ExportedModel) -> None:
    prompt = _prompt(exported, "surprise me")
    engine = _engine(exported)

    def sampled(seed: int) -> GenerationRequest:
        return GenerationRequest(prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=seed))

    [alone] = engine.generate([sampled(11)])
    batched = engine.generate([_greedy(_prompt(exported, "other"), 20), sampled(11), sampled(12)])
    assert batched[1].token_ids == alone.token_ids
    assert batched[2].token_ids != alone.token_ids


def test_a_tiny_top_p_keeps_only_the_most_likely_token() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 4.9]])
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    assert sample_next(logits, [1.5, 1.0], [1e-6, 1e-6], generators) == [1, 0]
    assert sample_next(logits, [0.0, 0.0], [1.0, 1.0], [None, None]) == [1, 0]


def test_the_context_bounds_prompts_and_answers(exported: ExportedModel) -> None:
    prompt = _prompt(exported, "hi")
    engine = _engine(exported, context_len=len(prompt) + 3)
    [done] = engine.generate([_greedy(prompt, 100)])
    assert (done.finish_reason, done.completion_tokens) == ("length", 3)
    with pytest.raises(ValueError, match="context"):
        engine.submit(_greedy(_prompt(exported, "a much longer prompt than that"), 1))


def test_a_cancelled_request_finishes_as_cancelled_and_the_others_go_on(exported: ExportedModel) -> None:
    engine = _engine(exported)
    results: dict[str, Completion] = {}
    keep = GenerationRequest(_prompt(exported, "keep"), SamplingParams(max_tokens=10, temperature=0.0),
                             on_finish=lambda c: results.__setitem__("keep", c))
    drop = GenerationRequest(_prompt(exported, "drop"), SamplingParams(max_tokens=10, temperature=0.0),
                             on_finish=lambda c: results.__setitem__("drop", c))
    engine.submit(keep)
    engine.submit(drop)
    engine.step()
    engine.cancel(drop)
    while engine.has_work():
        engine.step()
    assert results["drop"].finish_reason == "cancelled"
    assert (results["keep"].finish_reason, results["keep"].completion_tokens) == ("length", 10)


class _FakeTokenizer:
    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab

    def decode(self, ids: list[int], **_: object) -> str:
        return "".join(self.vocab[i] for i in ids)


def test_stop_text_holds_back_what_may_still_become_a_stop_string() -> None:
    text = StopText(_FakeTokenizer(["Hello ", "wo", "rld", "END", "\ufffd"]), ["world!", "END"])  # type: ignore[arg-type]
    assert text.update([0]) == ("Hello ", False)
    assert text.update([0, 1]) == ("", False)  # "wo" may begin "world!"
    assert text.update([0, 1, 2]) == ("", False)
    assert text.update([0, 1, 2, 4]) == ("", False)  # half a character, which may complete to "!"
    assert text.update([0, 1, 2, 4, 3]) == ("world\ufffd", True)  # it did not; "END" ends the text
    assert text.text == "Hello world\ufffd"


def test_incremental_text_equals_decoding_everything_at_once(exported: ExportedModel) -> None:
    text = "Unicode: café, naïve, 東京 😀👍 and plain words that run on, token after token."
    ids = exported.tokenizer(text, add_special_tokens=False)["input_ids"]
    tracker = StopText(exported.tokenizer, [])
    pieces = [tracker.update(ids[: n + 1])[0] for n in range(len(ids))]
    pieces.append(tracker.flush())
    assert "".join(pieces) == exported.tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # half characters are never shown


def _run_loop(loop: EngineLoop, requests: list[GenerationRequest]) -> list[Completion]:
    done = threading.Semaphore(0)
    results: dict[int, Completion] = {}
    for i, request in enumerate(requests):
        def finish(c: Completion, i: int = i) -> None:
            results[i] = c
            done.release()

        request.on_finish = finish
        loop.submit(request)
    for _ in requests:
        assert done.acquire(timeout=60), "a request never finished"
    return [results[i] for i in range(len(requests))]


@pytest.fixture
def engine_loop(exported: ExportedModel) -> Iterator[EngineLoop]:
    loop = EngineLoop(_engine(exported), batch_wait_s=0.01)
    yield loop
    loop.stop()


def test_engine_loop_serves_requests_from_other_threads(engine_loop: EngineLoop, exported: ExportedModel) -> None:
    prompts = [_prompt(exported, p) for p in PROMPTS]
    expected = _engine(exported).generate([_greedy(p, 12) for p in prompts])
    got = _run_loop(engine_loop, [_greedy(p, 12) for p in prompts])
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]


def test_a_failing_step_fails_its_requests_instead_of_hanging_and_the_loop_goes_on(exported: ExportedModel) -> None:
    def explode(*_: object) -> None:
        raise RuntimeError("boom")

    loop = EngineLoop(_engine(exported))
    hook = exported.model.register_forward_pre_hook(explode)
    try:
        got = _run_loop(loop, [_greedy(_prompt(exported, p), 5) for p in PROMPTS[:2]])
    finally:
        hook.remove()
    try:
        assert {c.finish_reason for c in got} == {"error"}
        assert all("boom" in (c.error or "") for c in got)
        assert loop.failed_steps >= 1 and isinstance(loop.last_error, RuntimeError)
        [after] = _run_loop(loop, [_greedy(_prompt(exported, "again"), 5)])
        assert after.finish_reason == "length"
    finally:
        loop.stop()


def test_draining_finishes_work_in_flight_then_stops(exported: ExportedModel) -> None:
    loop = EngineLoop(_engine(exported))
    request = _greedy(_prompt(exported, "finish me"), 10)
    finished = threading.Event()
    request.on_finish = lambda c: finished.set() if c.finish_reason == "length" else None
    loop.submit(request)
    loop.drain()
    loop.join(60)
    assert finished.is_set() and not loop.alive()
    with pytest.raises(RuntimeError, match="shutting down"):
        loop.submit(_greedy(_prompt(exported, "too late"), 1))
