"""SASL and TLS settings reach every Kafka client this project makes (producer, consumer, admin).

Unit tests with recording fakes in place of kafka-python's classes: the embedded broker (Tansu 0.6) has
no SASL or TLS listener, so no test here connects with them; the names are kafka-python's own (checked
against each class's DEFAULT_CONFIG below), and deploy/ runs them against Apache Kafka's SASL listener.
"""

from __future__ import annotations

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from pydantic import ValidationError

from common import kafka
from common.settings import SharedSettings

SASL_SSL = dict(kafka_bootstrap_servers="a:9093, b:9093", kafka_security_protocol="SASL_SSL",
                kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="serving", kafka_sasl_password="pw",
                kafka_ssl_cafile="/ca.crt", kafka_ssl_certfile="/client.crt", kafka_ssl_keyfile="/client.key")
EXPECTED = dict(bootstrap_servers=["a:9093", "b:9093"], security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                sasl_plain_username="serving", sasl_plain_password="pw", ssl_cafile="/ca.crt",
                ssl_certfile="/client.crt", ssl_keyfile="/client.key")


class _Recorder:
    made: list[tuple[str, dict]] = []

    def __init__(self, *topics, **config):
        self.made.append((type(self).__name__, config))

    def list_topics(self):
        return []

    def create_topics(self, topics):
        pass

    def close(self):
        pass


@pytest.fixture
def recorded(monkeypatch) -> list[tuple[str, dict]]:
    made: list[tuple[str, dict]] = []
    for real in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
        monkeypatch.setattr(kafka, real.__name__, type(real.__name__, (_Recorder,), {"made": made}))
    return made


def test_every_client_gets_the_security_settings(recorded):
    settings = SharedSettings(**SASL_SSL)
    kafka.make_producer(settings)
    kafka.make_consumer(settings, ["t"], group_id="g")
    kafka.ensure_topics(settings, ["t"])
    kafka.wait_for_broker(settings)
    assert [name for name, _ in recorded] == ["KafkaProducer", "KafkaConsumer", "KafkaAdminClient", "KafkaAdminClient"]
    for name, config in recorded:
        assert {key: config.get(key) for key in EXPECTED} == EXPECTED, name


def test_the_names_are_kafka_pythons():
    for client in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
        assert set(EXPECTED) <= set(client.DEFAULT_CONFIG), client.__name__


def test_plaintext_by_default_with_no_credentials(recorded):
    kafka.make_producer(SharedSettings(kafka_bootstrap_servers="h:9092"))
    [(_, config)] = recorded
    assert config["security_protocol"] == "PLAINTEXT"
    assert not {key for key in config if key.startswith(("sasl_", "ssl_"))}


@pytest.mark.parametrize("changes, complaint", [
    ({"kafka_sasl_password": None}, "needs KAFKA_SASL_MECHANISM"),
    ({"kafka_security_protocol": "SSL"}, "KAFKA_SASL_* are used only with"),
    ({"kafka_security_protocol": "SASL_PLAINTEXT"}, "KAFKA_SSL_* are used only with"),
    ({"kafka_ssl_keyfile": None}, "go together"),
])
def test_inconsistent_security_settings_are_refused(changes, complaint):
    with pytest.raises(ValidationError, match=complaint.replace("*", r"\*")):
        SharedSettings(**{**SASL_SSL, **changes})


def test_the_password_is_kept_out_of_reprs():
    assert "pw" not in repr(SharedSettings(**SASL_SSL))
