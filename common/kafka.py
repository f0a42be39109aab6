"""Kafka clients configured once for both services: JSON values, string keys, topics created on demand, and
the security settings (SASL, TLS) on every client."""

from __future__ import annotations

import logging
import time

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.serializer import Deserializer, Serializer
from pydantic import BaseModel

from common.settings import SharedSettings

log = logging.getLogger(__name__)

# A group joins in seconds with these instead of ~20 s with the client's defaults; poll loops in this
# project run on their own thread, so a long training step never starves the heartbeat.
GROUP_TIMEOUTS = dict(session_timeout_ms=10_000, heartbeat_interval_ms=1_000, max_poll_interval_ms=60_000)


class _TextSerializer(Serializer):
    """str keys as UTF-8; pydantic models as their JSON; str values as they are."""

    def serialize(self, topic, headers, data):
        if data is None:
            return None
        if isinstance(data, BaseModel):
            return data.model_dump_json().encode()
        return data.encode()


class _TextDeserializer(Deserializer):
    def deserialize(self, topic, headers, data):
        return None if data is None else data.decode("utf-8", errors="replace")


def connection(settings: SharedSettings) -> dict:
    """What every client (producer, consumer, admin) needs to reach the cluster: its addresses, and the
    security settings (SASL credentials, TLS files) under kafka-python's names."""
    config = dict(
        bootstrap_servers=[s.strip() for s in settings.kafka_bootstrap_servers.split(",") if s.strip()],
        security_protocol=settings.kafka_security_protocol,
    )
    if settings.kafka_sasl_mechanism:
        config.update(sasl_mechanism=settings.kafka_sasl_mechanism, sasl_plain_username=settings.kafka_sasl_username,
                      sasl_plain_password=settings.kafka_sasl_password.get_secret_value())
    for name in ("cafile", "certfile", "keyfile"):
        if (path := getattr(settings, f"kafka_ssl_{name}")) is not None:
            config[f"ssl_{name}"] = str(path)
    return config


def wait_for_broker(settings: SharedSettings, timeout_s: float = 30.0) -> None:
    """Block until the cluster answers a metadata request; raise TimeoutError otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(**connection(settings), request_timeout_ms=5_000)
            admin.list_topics()
            admin.close()
            return
        except (KafkaError, OSError) as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no Kafka broker at {settings.kafka_bootstrap_servers}: {exc}") from exc
            time.sleep(0.5)


def ensure_topics(settings: SharedSettings, topics: list[str], partitions: int = 1) -> None:
    admin = KafkaAdminClient(**connection(settings))
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(name=t, num_partitions=partitions, replication_factor=settings.kafka_replication_factor)
            for t in topics
            if t not in existing
        ]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # another process created it between our list and create
    finally:
        admin.close()


def make_producer(settings: SharedSettings, **overrides) -> KafkaProducer:
    config = dict(
        **connection(settings),
        key_serializer=_TextSerializer(),
        value_serializer=_TextSerializer(),
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
    )
    config.update(overrides)
    return KafkaProducer(**config)


def make_consumer(settings: SharedSettings, topics: list[str], group_id: str | None, **overrides) -> KafkaConsumer:
    config = dict(
        **connection(settings),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        value_deserializer=_TextDeserializer(),
        key_deserializer=_TextDeserializer(),
        **GROUP_TIMEOUTS,
    )
    config.update(overrides)
    return KafkaConsumer(*topics, **config)
