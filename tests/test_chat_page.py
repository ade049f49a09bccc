"""The chat page at `/` of the endpoint, end to end: real Ray Serve on loopback, driven in headless Chromium
(Debian's /usr/bin/chromium, installed by `make browser`) with Playwright.

Two apps in one Serve instance: an open one at `/` and one with API keys and a completion store at `/keyed`
(its answers get thumbs and a "better answer" form, whose feedback lands in the store). The tiny untrained model
answers gibberish; what matters is that it arrives in pieces and that each request carries what the page shows.
A screenshot of a two-turn conversation is kept at test-artifacts/chat-page.png, one of the feedback controls at
test-artifacts/chat-page-feedback.png.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cluster.session import free_port, ingress_env
from crlft.config import Config, load_config
from crlft.environ import environment
from crlft.export import ModelMeta, save_exported
from crlft.model import load_model_and_tokenizer
from crlft.presets import init_model
from services.page import add_chat_page

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "test-artifacts" / "chat-page.png"
FEEDBACK_SCREENSHOT = REPO / "test-artifacts" / "chat-page-feedback.png"  # a rated answer, its correction being written
CHROMIUM = "/usr/bin/chromium"
# Per /work/.library/env/machines/python.md: no sandbox as root, nothing reaching out to the closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
MODEL_NAME = "tiny-chat"
KEY = "page-key"
ANSWER_TIMEOUT_MS = 60_000

# Records every length the last answer's text goes through, to see it grow while it streams.
RECORD_ANSWER_GROWTH = """
window.answerLengths = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll(".msg.assistant .text");
  if (!answers.length) return;
  const length = answers[answers.length - 1].textContent.length;
  const seen = window.answerLengths;
  if (seen[seen.length - 1] !== length) seen.push(length);
}).observe(document, { subtree: true, childList: true, characterData: true });
"""


# ---------------------------------------------------------------------------------------------------------------------
# Without Ray or a browser


def test_the_page_is_one_self_contained_file_under_a_strict_content_security_policy() -> None:
    app = FastAPI()
    add_chat_page(app)
    response = TestClient(app).get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    html = response.text
    assert "<script src" not in html and "<link rel=\"stylesheet\"" not in html  # nothing to fetch: works offline
    assert "http://" not in html and "https://" not in html


# ---------------------------------------------------------------------------------------------------------------------
# Real Serve, real browser


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The completion store of the keyed app."""
    return tmp_path_factory.mktemp("chat-page-store")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, store_dir: Path) -> Iterator[str]:
    import ray
    from ray import serve

    from services.chat import chat_application
    from services.local import public_url, shutdown, wait_until_ready

    root = tmp_path_factory.mktemp("chat-page")
    model, tokenizer = load_model_and_tokenizer(str(init_model(root / "base", seed=0)))
    exported = save_exported(model, tokenizer, root / "exported", ModelMeta.from_config(Config()))
    overrides = {"state_dir": str(root / "state"), "serve.port": free_port(), "serve.cpus_per_replica": 0.25,
                 "serve.max_replicas": 1, "serve.model_name": MODEL_NAME, "serve.max_new_tokens": 128}
    cfg = load_config(None, overrides)
    stored = load_config(None, {**overrides, "serve.store.uri": str(store_dir), "serve.store.flush_s": 0.2})
    with environment(ingress_env(cfg)):  # the ingress `crlft serve` puts in front
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        serve.run_many([
            serve.RunTarget(chat_application(str(exported), cfg), name="open"),
            serve.RunTarget(chat_application(str(exported), stored, api_keys=[KEY]), name="keyed",
                            route_prefix="/keyed"),
        ])
        url = public_url(cfg.serve.host, cfg.serve.port)
        for app_url in (url, url + "/keyed"):
            wait_until_ready(app_url)
        yield url
    finally:
        shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright comes with the dev extra: make install")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: run `make browser`")
    profile = tempfile.mkdtemp(prefix="chromium-profile-")  # a new empty --user-data-dir
    try:
        with sync_api.sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1180, "height": 760})
            context.set_default_timeout(ANSWER_TIMEOUT_MS)
            context.add_init_script(RECORD_ANSWER_GROWTH)
            yield context
            context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    page = browser.new_page()
    page.chat_requests = []  # the JSON bodies the page POSTs to /v1/chat/completions, in order
    page.on("request", lambda r: page.chat_requests.append(r.post_data_json)
            if r.url.endswith("/v1/chat/completions") else None)
    yield page
    page.close()


def _ask(page: Any, question: str) -> str:
    """Types `question`, sends it with Enter and returns the answer once it has finished streaming."""
    from playwright.sync_api import expect

    answers = page.locator(".msg.assistant")
    before = answers.count()
    page.get_by_label("Message").fill(question)
    page.get_by_label("Message").press("Enter")
    expect(answers).to_have_count(before + 1)
    expect(page.locator(".msg.streaming")).to_have_count(0, timeout=ANSWER_TIMEOUT_MS)
    return str(answers.last.locator(".text").text_content())


@pytest.mark.slow
def test_the_page_at_the_root_shows_the_model_and_its_conditions_defaulting_to_the_inference_one(
        server: str, page: Any) -> None:
    from playwright.sync_api import expect

    fetched: list[str] = []
    page.on("request", lambda r: fetched.append(r.url))
    page.goto(server + "/")
    expect(page.locator("#model-text")).to_have_text(f"Model: {MODEL_NAME}")
    condition = page.get_by_label("Condition")
    assert condition.locator("option").evaluate_all("options => options.map(o => o.value)") == ["GPT3", "GPT4"]
    expect(condition).to_have_value("GPT4")
    expect(page.get_by_label("API key")).to_be_hidden()  # this server needs none
    assert fetched and all(url.startswith(server + "/") for url in fetched), fetched  # nothing from elsewhere


@pytest.mark.slow
def test_a_question_is_answered_in_streamed_pieces_under_the_default_condition(server: str, page: Any) -> None:
    page.goto(server + "/")
    answer = _ask(page, "What is the capital of France?")
    assert answer
    assert page.locator(".msg.user .text").all_text_contents() == ["What is the capital of France?"]
    assert page.get_by_label("Message").input_value() == ""
    grew = page.evaluate("window.answerLengths")
    # The first piece is sent at once, the rest every 50 ms: any answer longer than a token shows at least twice. (The
    # untrained model samples; a short answer can be finished by the second piece, so more is not guaranteed.)
    assert len([n for n in grew if n > 0]) >= 2, f"the answer did not arrive in pieces: {grew}"
    shown = page.locator(".msg.assistant .text").last.evaluate("text => text.textContent.length")  # UTF-16 units
    assert grew == sorted(grew) and grew[-1] == shown
    [sent] = page.chat_requests
    assert sent == {"model": MODEL_NAME, "stream": True, "condition": "GPT4",
                    "messages": [{"role": "user", "content": "What is the capital of France?"}]}


@pytest.mark.slow
def test_the_next_turn_sends_the_whole_conversation_with_the_chosen_condition_and_system_prompt(
        server: str, page: Any) -> None:
    page.goto(server + "/")
    first = _ask(page, "Name a prime number.")
    page.get_by_label("Condition").select_option("GPT3")
    page.get_by_label("System prompt").fill("You answer in one short sentence.")
    second = _ask(page, "And another one?")
    assert page.locator(".msg.assistant .tag").all_text_contents() == ["GPT4", "GPT3"]
    assert page.chat_requests[-1]["condition"] == "GPT3"
    assert page.chat_requests[-1]["messages"] == [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And another one?"},
    ]
    assert second
    page.get_by_label("Message").fill("Type here, press Enter.")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))


@pytest.mark.slow
def test_a_new_conversation_starts_from_an_empty_history(server: str, page: Any) -> None:
    from playwright.sync_api import expect

    page.goto(server + "/")
    _ask(page, "Remember the number seven.")
    page.get_by_role("button", name="New conversation").click()
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    _ask(page, "Which number?")
    assert page.chat_requests[-1]["messages"] == [{"role": "user", "content": "Which number?"}]


@pytest.mark.slow
def test_with_api_keys_a_wrong_key_shows_the_401_and_the_right_one_is_sent_and_kept_for_the_tab(
        server: str, page: Any) -> None:
    from playwright.sync_api import expect

    authorizations: list[str | None] = []
    page.on("request", lambda r: authorizations.append(r.headers.get("authorization")) if "/v1/" in r.url else None)
    page.goto(server + "/keyed")
    key = page.get_by_label("API key")
    expect(key).to_be_visible()  # the server asked for one
    expect(page.get_by_role("alert")).to_contain_text("401")

    key.fill("wrong-key")
    page.get_by_label("Message").fill("Hello?")
    page.get_by_label("Message").press("Enter")
    expect(page.get_by_role("alert")).to_contain_text("incorrect API key")
    expect(page.locator(".msg")).to_have_count(0)  # the refused turn is not part of the conversation
    expect(page.get_by_label("Message")).to_have_value("Hello?")  # ready to send again
    assert authorizations[-1] == "Bearer wrong-key"

    key.fill(KEY)
    key.press("Tab")  # a changed key reconnects
    expect(page.locator("#model-text")).to_have_text(f"Model: {MODEL_NAME}")
    expect(page.get_by_role("alert")).to_have_count(0)  # the error is gone
    page.get_by_label("Message").fill("")
    assert _ask(page, "Hello again?")
    assert page.chat_requests[-1]["messages"] == [{"role": "user", "content": "Hello again?"}]
    assert authorizations[-1] == f"Bearer {KEY}"

    page.reload()  # the key stays for the tab's session
    expect(page.get_by_label("API key")).to_have_value(KEY)
    expect(page.locator("#model-text")).to_have_text(f"Model: {MODEL_NAME}")


@pytest.mark.slow
def test_with_a_store_an_answer_takes_a_thumb_and_a_better_answer_which_the_store_keeps(
        server: str, store_dir: Path, page: Any) -> None:
    from playwright.sync_api import expect

    from crlft.data.store import key_id, read_store

    feedback: list[tuple[Any, str | None]] = []
    page.on("request", lambda r: feedback.append((r.post_data_json, r.headers.get("authorization")))
            if r.url.endswith("/v1/feedback") else None)
    page.goto(server + "/keyed")
    page.get_by_label("API key").fill(KEY)
    page.get_by_label("API key").press("Tab")
    expect(page.locator("#model-text")).to_have_text(f"Model: {MODEL_NAME}")
    answer = _ask(page, "What is two and two?")
    assert page.chat_requests[-1]["store"] is True
    reply = page.locator(".msg.assistant").last
    reply.get_by_role("button", name="Good answer").click()
    expect(reply.get_by_role("status")).to_have_text("Good rating recorded.")
    expect(reply.get_by_role("button", name="Good answer")).to_have_attribute("aria-pressed", "true")
    reply.get_by_role("button", name="Suggest a better answer").click()
    reply.get_by_label("Better answer").fill("Four.")
    page.screenshot(path=str(FEEDBACK_SCREENSHOT))
    reply.get_by_role("button", name="Send correction").click()
    expect(reply.get_by_role("status")).to_have_text("Better answer recorded.")
    expect(reply.get_by_label("Better answer")).to_be_hidden()

    [(rated, auth), (corrected, _)] = feedback
    assert auth == f"Bearer {KEY}" and rated["rating"] == 1
    assert corrected == {"id": rated["id"], "choice": 0, "rating": 1, "correction": "Four."}
    deadline = time.monotonic() + 30
    while not (choices := [c for c in read_store(str(store_dir)).choices if c.completion["id"] == rated["id"]]):
        assert time.monotonic() < deadline, "the answer was not stored"
        time.sleep(0.2)
    [choice] = choices
    assert choice.completion["answer"] == answer and choice.completion["key_id"] == key_id(KEY)
    assert (choice.rating, choice.correction) == (1, "Four.")


@pytest.mark.slow
def test_without_a_store_the_page_asks_for_none_and_offers_no_feedback(server: str, page: Any) -> None:
    page.goto(server + "/")
    _ask(page, "Hello?")
    assert "store" not in page.chat_requests[-1]
    assert page.locator(".feedback").count() == 0
