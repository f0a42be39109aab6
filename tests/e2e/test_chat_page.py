"""The end-user page in headless Chromium, against the real server: a click on a thumb must put a feedback
event on the Kafka topic. Saves a screenshot to test-artifacts/chat-page.png."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from common.kafka import make_consumer
from feedback import FeedbackEvent
from tests.conftest import ARTIFACTS

pytestmark = [pytest.mark.slow, pytest.mark.kafka]

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def page():
    if CHROMIUM is None:
        pytest.fail("Chromium not found: `make test` installs Debian's chromium; or set CHROMIUM_PATH")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser.new_page(viewport={"width": 1100, "height": 800})
        browser.close()


def feedback_events(kafka_settings, timeout_s: float, want) -> list[FeedbackEvent]:
    consumer = make_consumer(kafka_settings, [kafka_settings.feedback_topic], group_id=None)
    found, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline and not any(want(e) for e in found):
        for records in consumer.poll(timeout_ms=200).values():
            found += [FeedbackEvent.model_validate_json(r.value) for r in records]
    consumer.close()
    return [e for e in found if want(e)]


def test_thumb_click_sends_feedback_to_kafka(serving, kafka_settings, page):
    page.goto(serving.url + "/")
    page.fill("#prompt", "What is the capital of France?")
    with page.expect_response("**/v1/chat/completions") as chat:
        page.click("#send")
    completion_id = chat.value.json()["id"]
    page.wait_for_selector(".answer .text")
    assert page.inner_text(".answer .text").strip()

    with page.expect_response("**/v1/feedback") as sent:
        page.click(".answer .thumb-up")
    assert sent.value.status == 202
    page.wait_for_selector(".answer .thumb-up.chosen")

    page.check("#compare")
    page.fill("#prompt", "Tell me about cats.")
    page.click("#send")
    page.wait_for_selector(".answers.pair .prefer-a")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-page.png"), full_page=True)

    [event] = feedback_events(kafka_settings, 20, lambda e: getattr(e.feedback, "completion_id", None) == completion_id)
    assert event.feedback.type == "thumbs" and event.feedback.rating == "up" and event.feedback.choice_index == 0

    with page.expect_response("**/v1/feedback") as sent:
        page.click(".answers.pair .prefer-b")
    assert sent.value.status == 202
    pairwise = feedback_events(kafka_settings, 20, lambda e: e.feedback.type == "pairwise")
    assert pairwise and pairwise[-1].feedback.preference == "b"
