"""The event log through broker outages: a real broker (Tansu on an S3 store) stopped and started again."""

from __future__ import annotations

import asyncio

import pytest
from kafka.errors import KafkaTimeoutError
from prometheus_client import REGISTRY

from common.settings import SharedSettings
from feedback import CompletionEvent, FeedbackEvent, parse_feedback
from serving import event_log
from serving.event_log import EventLogUnavailable, KafkaEventLog
from tests.durable_broker import durable_broker, skip_on_external_cluster
from tests.serving.test_kafka_integration import read_topic

pytestmark = pytest.mark.kafka

ACK_TIMEOUT_S = 1.0  # the producer's delivery window: an outage longer than this sends events to the spool


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    skip_on_external_cluster()
    with durable_broker(tmp_path_factory.mktemp("broker") / "tansu.log") as broker:
        yield broker


@pytest.fixture
def topics(broker, request) -> SharedSettings:
    """Settings naming the durable broker and topics of the test's own."""
    if broker._process.poll() is not None:  # a failed test left it stopped
        broker.start()
    return SharedSettings(kafka_bootstrap_servers=broker.bootstrap_servers, topic_prefix=f"{request.node.name}.")


def completion(completion_id: str, text: str = "hello") -> CompletionEvent:
    return CompletionEvent.model_validate({
        "completion_id": completion_id, "model": "m", "policy_version": "v0",
        "messages": [{"role": "user", "content": "hi"}],
        "choices": [{"index": 0, "text": text, "finish_reason": "stop", "completion_tokens": 1}],
        "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 8}, "prompt_tokens": 3,
    })


def thumbs(completion_id: str) -> FeedbackEvent:
    return FeedbackEvent(feedback=parse_feedback({"type": "thumbs", "completion_id": completion_id, "rating": "up"}))


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def event_ids(settings: SharedSettings, topic: str, expected: int) -> list[str]:
    return [FeedbackEvent.model_validate_json(r.value).event_id if topic == settings.feedback_topic
            else CompletionEvent.model_validate_json(r.value).event_id
            for r in read_topic(settings, topic, expected, timeout_s=60)]


async def test_events_during_an_outage_are_spooled_and_replayed_in_order(broker, topics, tmp_path):
    log = KafkaEventLog(topics, tmp_path / "spool", queue_size=100, ack_timeout_s=ACK_TIMEOUT_S)
    try:
        await log.record_feedback(thumbs("before"))  # straight to Kafka
        assert metric("rlhf_spool_records") == 0
        broker.stop()
        during = [thumbs(f"c{i}") for i in range(20)]
        for event in during:
            await log.record_feedback(event)  # returns once durable: here, fsynced to the spool
        assert metric("rlhf_spool_records") == 20
        assert metric("rlhf_spool_oldest_age_seconds") > 0
        log.log_completion(completions := completion("c0"))
        broker.start()
        arrived = await asyncio.to_thread(event_ids, topics, topics.feedback_topic, 21)
        assert arrived[1:] == [e.event_id for e in during]
        assert await asyncio.to_thread(event_ids, topics, topics.completions_topic, 1) == [completions.event_id]
        assert metric("rlhf_spool_records") == 0
    finally:
        log.close()


class HoldingProducer:
    """Takes every event and never settles it, as kafka-python's idempotent producer does while it waits for
    a producer id (or an epoch bump) from a broker that has gone: it expires nothing meanwhile."""

    def send(self, topic, key, value):
        return self

    def add_callback(self, *args):
        pass

    add_errback = add_callback

    def get(self, timeout):
        raise KafkaTimeoutError("held")

    def flush(self, timeout):
        pass

    def close(self, timeout):
        pass


async def test_events_the_producer_holds_past_the_delivery_timeout_are_spooled(topics, tmp_path, monkeypatch):
    monkeypatch.setattr(event_log, "make_producer", lambda settings, **config: HoldingProducer())
    log = KafkaEventLog(topics, tmp_path / "spool", queue_size=100, ack_timeout_s=ACK_TIMEOUT_S)
    try:
        await log.record_feedback(thumbs("c0"))  # durable: taken back from the producer and spooled
        assert metric("rlhf_spool_records") == 1
    finally:
        log.close()


def test_a_restarted_event_log_replays_what_its_spool_holds(broker, topics, tmp_path):
    log = KafkaEventLog(topics, tmp_path / "spool", queue_size=100, ack_timeout_s=ACK_TIMEOUT_S)
    broker.stop()
    spooled = [thumbs(f"c{i}") for i in range(3)]

    async def send() -> None:
        for event in spooled:
            await log.record_feedback(event)

    asyncio.run(send())
    log.log_completion(last := completion("c2"))  # queued at close: spooled, not lost
    log.close()
    broker.start()
    restarted = KafkaEventLog(topics, tmp_path / "spool", queue_size=100, ack_timeout_s=ACK_TIMEOUT_S)
    try:
        assert event_ids(topics, topics.feedback_topic, 3) == [e.event_id for e in spooled]
        assert event_ids(topics, topics.completions_topic, 1) == [last.event_id]
    finally:
        restarted.close()


async def test_a_full_spool_refuses_feedback_and_drops_completions(broker, topics, tmp_path):
    log = KafkaEventLog(topics, tmp_path / "spool", queue_size=100, ack_timeout_s=ACK_TIMEOUT_S,
                        spool_max_bytes=1000)
    dropped = metric("rlhf_spool_dropped_total", reason="full")
    try:
        broker.stop()
        first = thumbs("c0")
        await log.record_feedback(first)
        with pytest.raises(EventLogUnavailable) as refused:
            for i in range(1, 10):
                await log.record_feedback(thumbs(f"c{i}"))
        assert refused.value.retry_after_s > 0
        log.log_completion(completion("c0"))
        for _ in range(100):
            if metric("rlhf_spool_dropped_total", reason="full") > dropped:
                break
            await asyncio.sleep(0.05)
        assert metric("rlhf_spool_dropped_total", reason="full") == dropped + 1
        broker.start()
        accepted = await asyncio.to_thread(event_ids, topics, topics.feedback_topic, 1)
        assert accepted[0] == first.event_id
    finally:
        log.close()


async def test_a_record_kafka_refuses_is_dropped_and_counted_and_the_log_goes_on(topics, tmp_path):
    log = KafkaEventLog(topics, tmp_path / "spool", queue_size=100, ack_timeout_s=ACK_TIMEOUT_S)
    rejected = metric("rlhf_spool_dropped_total", reason="rejected")
    try:
        log.log_completion(completion("huge", text="x" * 2_000_000))  # over the producer's request size
        log.log_completion(after := completion("after"))
        await log.record_feedback(feedback := thumbs("after"))
        assert await asyncio.to_thread(event_ids, topics, topics.completions_topic, 1) == [after.event_id]
        assert await asyncio.to_thread(event_ids, topics, topics.feedback_topic, 1) == [feedback.event_id]
        assert metric("rlhf_spool_dropped_total", reason="rejected") == rejected + 1
    finally:
        log.close()


def test_feedback_the_event_log_cannot_store_gets_503_with_retry_after(client, events):
    completion_id = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).json()["id"]
    events.available = False
    response = client.post("/v1/feedback", json={"type": "thumbs", "completion_id": completion_id, "rating": "up"})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"]["type"] == "service_unavailable"
