"""Reading a whole topic in tests, to count what is on it."""

from __future__ import annotations

from kafka.structs import TopicPartition

from common.kafka import make_consumer
from common.settings import SharedSettings


def whole_topic(settings: SharedSettings, topic: str) -> dict[TopicPartition, list]:
    """Every record on `topic` up to its end now, by partition."""
    consumer = make_consumer(settings, [], group_id=None)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(partitions)
    consumer.seek_to_beginning()
    ends, records = consumer.end_offsets(partitions), {}
    while any(consumer.position(p) < ends[p] for p in partitions):
        for partition, batch in consumer.poll(timeout_ms=500).items():
            records.setdefault(partition, []).extend(batch)
    consumer.close()
    return records
