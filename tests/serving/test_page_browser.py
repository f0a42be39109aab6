"""The end-user page in headless Chromium with authentication on (SERVING_AUTH=keys), against a real HTTP
server (uvicorn, the fake engine): it chats and sends feedback with the session token serving mints for
it, holding no key, and gets a new token when its own is refused."""

from __future__ import annotations

import threading

import pytest
import uvicorn

from deploy.local_broker import free_port
from serving.app import build_app
from serving.page_sessions import PageSessions
from tests.e2e.test_chat_page import CHROMIUM, CHROMIUM_ARGS
from tests.serving.fakes import FakeEngine
from tests.serving.test_auth import keyed

pytestmark = pytest.mark.slow


@pytest.fixture
def server(settings, events):
    engine = FakeEngine(max_model_len=512)  # room for the page's 128 tokens
    app = build_app(keyed(settings), lambda: engine, lambda: events)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            pytest.fail("the server did not start")
        thread.join(0.05)
    yield app, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def page():
    if CHROMIUM is None:
        pytest.fail("Chromium not found: `make test` installs Debian's chromium; or set CHROMIUM_PATH")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser.new_page()
        browser.close()


def answered(path: str):
    """The response to the call of `path` that was not refused for its token (a refused one is retried)."""
    return lambda response: response.url.endswith(path) and response.status != 401


def ask_and_thumb(page, prompt: str) -> tuple[str, str]:
    """Send `prompt`, thumb the newest answer up; the bearer token each call carried."""
    page.fill("#prompt", prompt)
    with page.expect_response(answered("/v1/chat/completions")) as chat:
        page.click("#send")
    assert chat.value.status == 200
    page.wait_for_selector(".answer .text")
    with page.expect_response(answered("/v1/feedback")) as sent:
        page.locator(".answer .thumb-up").last.click()
    assert sent.value.status == 202
    return chat.value.request.headers["authorization"], sent.value.request.headers["authorization"]


def test_the_page_chats_and_sends_feedback_with_its_session_token(server, page, events):
    app, url = server
    page.goto(url + "/")
    for token in ask_and_thumb(page, "What is the capital of France?"):
        assert token.startswith("Bearer page.") and app.state.page_sessions.valid(token.removeprefix("Bearer "))
    [event] = events.feedback
    assert event.feedback.rating == "up" and event.app_key_id.startswith("page-")

    # Its token no longer accepted (as after it expired): the page fetches a new one and goes on.
    app.state.page_sessions = PageSessions("n" * 32)
    chat_token, feedback_token = ask_and_thumb(page, "Tell me about cats.")
    assert app.state.page_sessions.valid(chat_token.removeprefix("Bearer "))
    assert len(events.feedback) == 2 and page.inner_text("#status") == ""
