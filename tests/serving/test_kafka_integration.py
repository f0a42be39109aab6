"""Serving's Kafka parts against a real broker (embedded Tansu, or KAFKA_BOOTSTRAP_SERVERS)."""

from __future__ import annotations

import asyncio
import time

import pytest

from common.kafka import make_consumer, make_producer
from common.keys import policy_signing_key
from common.registry import PolicyRegistry
from feedback import CompletionEvent, FeedbackEvent, PolicyEvent, parse_feedback
from serving.canary import CanaryConfig, Verdict
from serving.event_log import KafkaEventLog
from serving.policy import PolicyFollower, PolicyManager
from tests.adapters import fake_base_model
from tests.serving.fakes import FakeEngine
from tests.serving.test_policy import publish_fake_adapter
from tests.serving.test_policy_signing import following_without_canary, until

pytestmark = pytest.mark.kafka


@pytest.fixture
def kafka_settings(kafka_settings, request):
    # Own topics per test: the session's serving process follows the session-wide policy topic.
    return kafka_settings.model_copy(update={"topic_prefix": f"{kafka_settings.topic_prefix}{request.node.name}."})


def read_topic(settings, topic: str, expected: int, timeout_s: float = 20.0) -> list:
    consumer = make_consumer(settings, [topic], group_id=None)
    records, deadline = [], time.monotonic() + timeout_s
    while len(records) < expected and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    consumer.close()
    return records


def test_completions_and_feedback_reach_their_topics(kafka_settings, tmp_path):
    log = KafkaEventLog(kafka_settings, tmp_path / "spool", queue_size=100, ack_timeout_s=10)
    completion = CompletionEvent.model_validate({
        "completion_id": "chatcmpl-k1", "model": "m", "policy_version": "v0",
        "messages": [{"role": "user", "content": "hi"}],
        "choices": [{"index": 0, "text": "hello", "finish_reason": "stop", "completion_tokens": 1}],
        "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 8}, "prompt_tokens": 3,
    })
    feedback = FeedbackEvent(feedback=parse_feedback(
        {"type": "thumbs", "completion_id": "chatcmpl-k1", "rating": "up"}))
    log.log_completion(completion)
    asyncio.run(log.record_feedback(feedback))  # returns only once the broker has acknowledged it
    log.close()

    [completion_record] = read_topic(kafka_settings, kafka_settings.completions_topic, 1)
    assert completion_record.key == "chatcmpl-k1"
    assert CompletionEvent.model_validate_json(completion_record.value) == completion
    [feedback_record] = read_topic(kafka_settings, kafka_settings.feedback_topic, 1)
    assert feedback_record.key == "chatcmpl-k1"
    assert FeedbackEvent.model_validate_json(feedback_record.value) == feedback


def test_without_a_canary_the_follower_switches_to_announced_versions_only_forward(kafka_settings, tmp_path):
    registry = PolicyRegistry(tmp_path / "registry")
    engine = FakeEngine()
    key = policy_signing_key(kafka_settings)  # the follower acts on signed announcements only

    async def scenario() -> list[str]:
        async with following_without_canary(kafka_settings, registry, engine) as (manager, producer):
            v1 = publish_fake_adapter(registry, tmp_path)
            v2 = publish_fake_adapter(registry, tmp_path)
            for version in (v2, v1):  # v1 arrives late: it must not roll serving back
                producer.send(kafka_settings.policy_topic, key="policy",
                              value=PolicyEvent(version=version, base_model="base").signed(key)).get(10)
            await until(lambda: manager.current.name == "v2")
            await asyncio.sleep(1.0)  # time for the late v1 to be (not) applied
            return [manager.current.name]

    assert asyncio.run(scenario()) == ["v2"]
    assert engine.loaded == ["v2"]
    # Served untried, and recorded so: the trainer waits for a verdict on the newest version.
    assert registry.get("v2").verdict["reason"] == "no canary (SERVING_CANARY__FRACTION=0)"
    assert registry.get("v2").promoted and registry.get("v1").verdict is None


def test_one_replicas_verdict_reaches_the_others(kafka_settings, tmp_path):
    """Two replicas put a published version into canary; one rolls it back and announces it on the policy
    topic; the other drops it too. Then the same for a promotion."""
    registry = PolicyRegistry(tmp_path / "registry")
    canary = CanaryConfig(fraction=0.5)
    key = policy_signing_key(kafka_settings)

    async def wait_for(condition) -> bool:
        for _ in range(200):
            if condition():
                return True
            await asyncio.sleep(0.05)
        return False

    async def scenario() -> None:
        log = KafkaEventLog(kafka_settings, tmp_path / "spool", queue_size=10, ack_timeout_s=10)
        replicas = [PolicyManager(FakeEngine(), registry, "m", canary, log.announce_policy,
                                  base_model=fake_base_model()) for _ in range(2)]
        followers = [PolicyFollower(kafka_settings, r, asyncio.get_running_loop()) for r in replicas]
        for follower in followers:
            await asyncio.to_thread(follower.start)
        producer = make_producer(kafka_settings)
        try:
            for version, verdict in (("v1", "rolled_back"), ("v2", "promoted")):
                publish_fake_adapter(registry, tmp_path)
                producer.send(kafka_settings.policy_topic, key=version,
                              value=PolicyEvent(version=version, base_model="base").signed(key)).get(10)
                assert await wait_for(lambda v=version: all(r.trial and r.trial.canary.name == v for r in replicas))
                await replicas[0].conclude(Verdict(verdict, "test"))
                assert await wait_for(lambda: replicas[1].trial is None), f"{version}: replica 2 kept its canary"
            assert [r.current.name for r in replicas] == ["v2", "v2"]
        finally:
            for follower in followers:
                await asyncio.to_thread(follower.stop)
            producer.close()
            log.close()

    asyncio.run(scenario())
    assert registry.get("v1").rolled_back and registry.get("v2").promoted
    events = [PolicyEvent.model_validate_json(r.value) for r in read_topic(kafka_settings, kafka_settings.policy_topic, 4)]
    assert [(e.version, e.action) for e in events] == [
        ("v1", "published"), ("v1", "rolled_back"), ("v2", "published"), ("v2", "promoted")]
