"""`python -m feedback tail` and `export` against the real broker."""

from __future__ import annotations

import io
import json
import threading
import time
import uuid

import pytest

from common.kafka import ensure_topics, make_producer
from feedback.cli import export, main, tail
from tests.feedback.test_dataset import COMPLETIONS, completion, event, ref

pytestmark = pytest.mark.kafka


@pytest.fixture
def settings(kafka_settings):
    settings = kafka_settings.model_copy(update={"topic_prefix": f"{kafka_settings.topic_prefix}{uuid.uuid4().hex[:8]}."})
    ensure_topics(settings, [settings.completions_topic, settings.feedback_topic])
    return settings


def produce(settings, completions, feedback, raw_feedback=()) -> None:
    producer = make_producer(settings)
    for c in completions:
        producer.send(settings.completions_topic, key=c.completion_id, value=c)
    for f in feedback:
        producer.send(settings.feedback_topic, key="c1", value=f)
    for value in raw_feedback:
        producer.send(settings.feedback_topic, value=value)
    producer.flush()
    producer.close()


def test_export_writes_the_joined_dataset_in_trl_formats(settings, tmp_path, monkeypatch):
    produce(settings, COMPLETIONS.values(), [
        event(0, type="pairwise", a=ref(0), b=ref(1), preference="b"),
        event(1, type="thumbs", rating="down", **ref(2)),
        event(2, event_id="twice", type="thumbs", rating="up", **ref(0)),
        event(2, event_id="twice", type="thumbs", rating="up", **ref(0)),  # a retry accepted by another replica
    ], raw_feedback=["not json"])
    for name, value in (("KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers),
                        ("RLHF_TOPIC_PREFIX", settings.topic_prefix)):
        monkeypatch.setenv(name, value)
    main(["export", "--out", str(tmp_path / "pairs.jsonl"), "--unpaired-out", str(tmp_path / "kto.jsonl")])
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    unpaired = [json.loads(line) for line in (tmp_path / "kto.jsonl").read_text().splitlines()]
    assert pairs == [{"prompt": [{"role": "user", "content": "What colour is snow?"}],
                      "chosen": [{"role": "assistant", "content": "Blue."}],
                      "rejected": [{"role": "assistant", "content": "White."}]}]
    assert [(row["completion"][0]["content"], row["label"]) for row in unpaired] == [("Green.", False), ("White.", True)]
    assert export(settings, io.StringIO(), None)["skipped_records"] == 1


def test_tail_prints_new_events_filtered_by_kind_and_version(settings):
    out, stop, ready = io.StringIO(), threading.Event(), threading.Event()
    thread = threading.Thread(target=tail, args=(settings, out, ["completion", "thumbs"], "v2"),
                              kwargs={"stop": stop, "ready": ready})
    v2 = completion("c2", "Two.").model_copy(update={"policy_version": "v2"})
    produce(settings, [v2.model_copy(update={"completion_id": "old"})], [])  # before the tail: not shown
    thread.start()
    assert ready.wait(30)
    produce(settings, [COMPLETIONS["c1"], v2], [
        event(0, type="thumbs", rating="up", **ref(0)),  # on a v0 answer
        event(1, type="thumbs", rating="up", completion_id="c2"),
        event(2, type="rating", score=7, completion_id="c2"),  # not a kind asked for
    ])
    deadline = time.monotonic() + 20
    while out.getvalue().count("\n") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    thread.join(10)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(line["event_type"], line.get("completion_id") or line["feedback"]["completion_id"]) for line in lines] \
        == [("completion", "c2"), ("feedback", "c2")]
