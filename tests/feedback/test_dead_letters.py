"""No record stops a consumer: what does not parse goes to the dead-letter topic with why and where from."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError

from common.dead_letters import DeadLetter, DeadLetterProducer, parse_record
from common.kafka import make_producer
from common.keys import policy_signing_key
from common.settings import SharedSettings
from feedback import FeedbackEvent, PolicyEvent
from serving.policy import PolicyFollower
from tests.feedback.topics import whole_topic
from tests.trainer.data.test_ingest import ingest_until, isolated_settings, produce
from trainer.data.store import FeedbackStore

GOOD = PolicyEvent(version="v1", base_model="base").model_dump_json()
NEWER = json.dumps({**json.loads(GOOD), "schema_version": 99})


def record(value: str | None, offset: int = 3) -> ConsumerRecord:
    return ConsumerRecord(topic="rlhf.policy", partition=0, leader_epoch=0, offset=offset, timestamp=0,
                          timestamp_type=0, key="k", value=value, headers=[], checksum=None,
                          serialized_key_size=1, serialized_value_size=0, serialized_header_size=0)


@pytest.mark.parametrize("value, reason", [
    (None, "no value"), ("no json", "json"), ('{"version": "v1"}', "base_model"), (NEWER, "newer"),
])
def test_what_does_not_parse_becomes_a_dead_letter_saying_why(value, reason):
    letter = parse_record(record(value, offset=7), PolicyEvent.model_validate_json, consumer="serving")
    assert isinstance(letter, DeadLetter)
    assert (letter.topic, letter.partition, letter.offset, letter.key, letter.value, letter.consumer) == (
        "rlhf.policy", 0, 7, "k", value, "serving")
    assert reason in letter.reason.lower()


def test_a_good_record_parses():
    assert parse_record(record(GOOD), PolicyEvent.model_validate_json, consumer="serving").version == "v1"


def test_feedback_of_schema_version_1_still_parses():
    v1 = ('{"event_type":"feedback","schema_version":1,"event_id":"e","received_at":"2025-01-01T00:00:00Z",'
          '"feedback":{"type":"thumbs","completion_id":"c","choice_index":0,"rating":"up"},"user_hash":null}')
    event = FeedbackEvent.model_validate_json(v1)
    assert (event.schema_version, event.feedback.source, event.feedback.metadata, event.app_key_id) == (
        1, "end_user", {}, None)


class _Manager:
    def __init__(self):
        self.followed: list[PolicyEvent] = []

    async def follow(self, event: PolicyEvent) -> None:
        self.followed.append(event)


@pytest.mark.kafka
def test_bad_policy_records_do_not_stop_the_follower(kafka_settings):
    settings = kafka_settings.model_copy(update={"topic_prefix": f"{kafka_settings.topic_prefix}{uuid.uuid4().hex[:8]}."})

    async def scenario() -> list[PolicyEvent]:
        manager = _Manager()
        follower = PolicyFollower(settings, manager, asyncio.get_running_loop())
        await asyncio.to_thread(follower.start)
        producer = make_producer(settings)
        signed = PolicyEvent.model_validate_json(GOOD).signed(policy_signing_key(settings))
        for value in (None, "no json", NEWER, signed):  # a null value used to kill the follower's thread
            producer.send(settings.policy_topic, key="policy", value=value).get(10)
        producer.close()
        for _ in range(400):
            if manager.followed:
                break
            await asyncio.sleep(0.05)
        await asyncio.to_thread(follower.stop)
        return manager.followed

    assert [event.version for event in asyncio.run(scenario())] == ["v1"]
    letters = [DeadLetter.model_validate_json(r.value) for batch in
               whole_topic(settings, settings.dead_letter_topic).values() for r in batch]
    assert [(letter.topic, letter.offset, letter.consumer) for letter in letters] == [
        (settings.policy_topic, offset, "serving") for offset in (0, 1, 2)]
    assert "no value" in letters[0].reason and "newer" in letters[2].reason


@pytest.mark.kafka
def test_the_trainer_sends_what_it_cannot_parse_to_the_dead_letter_topic(kafka_settings, tmp_path):
    settings = isolated_settings(kafka_settings, tmp_path)
    produce(settings, [], [], raw_feedback=["no json", '{"feedback": 1}'])
    store = FeedbackStore(settings.store_path)
    ingest_until(settings, store, lambda: store.row_counts()["dead_letters"] == 2, what="the dead letters")
    store.close()
    letters = [DeadLetter.model_validate_json(r.value) for batch in
               whole_topic(settings, settings.dead_letter_topic).values() for r in batch]
    assert sorted((letter.topic, letter.offset, letter.consumer) for letter in letters) == [
        (settings.feedback_topic, 0, "trainer"), (settings.feedback_topic, 1, "trainer")]


def test_a_dead_letter_that_cannot_be_sent_is_logged_not_raised(monkeypatch, caplog):
    def unreachable(*args, **kwargs):
        raise KafkaError("no broker")

    monkeypatch.setattr("common.dead_letters.ensure_topics", unreachable)
    broken = DeadLetterProducer(SharedSettings())
    broken.send(DeadLetter(topic="t", partition=0, offset=0, value=None, reason="x", consumer="trainer"))
    assert "could not send a dead letter" in caplog.text
