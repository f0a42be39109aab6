"""Publishing checks the adapter first: a broken one never becomes a version and is never announced."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from common.adapter_check import BadAdapter
from common.keys import policy_signing_keys
from common.registry import PolicyRegistry
from common.settings import SharedSettings
from tests.adapters import CORRUPTIONS, write_adapter
from trainer.publish import publish_policy


class RecordingProducer:
    def __init__(self):
        self.sent = []

    def send(self, topic, key, value):
        self.sent.append((topic, key, value))
        return self

    def get(self, timeout):  # the broker's acknowledgement
        return None


def publish(adapter, registry, producer, base_model_dir, source="round-1"):
    return publish_policy(adapter, registry=registry, producer=producer, settings=SharedSettings(
        base_model=base_model_dir), parent="v0", metrics={"reward": 1.0}, gate=[], source=source)


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_a_broken_adapter_is_refused_counted_and_not_announced(base_model_dir, tmp_path, corrupt):
    registry, producer = PolicyRegistry(tmp_path / "registry"), RecordingProducer()
    before = REGISTRY.get_sample_value("rlhf_registry_corrupt_total", {"what": "adapter"}) or 0.0
    with pytest.raises(BadAdapter):
        publish(write_adapter(tmp_path / "adapter", base_model_dir, corrupt=corrupt), registry, producer,
                base_model_dir)
    assert [v.name for v in registry.list()] == ["v0"] and producer.sent == []
    assert REGISTRY.get_sample_value("rlhf_registry_corrupt_total", {"what": "adapter"}) == before + 1


def test_a_whole_adapter_is_published_then_announced(base_model_dir, tmp_path):
    registry, producer = PolicyRegistry(tmp_path / "registry"), RecordingProducer()
    version = publish(write_adapter(tmp_path / "adapter", base_model_dir), registry, producer, base_model_dir)
    assert version.name == "v1" and [key for _, key, _ in producer.sent] == ["v1"]
    [(_, _, event)] = producer.sent
    assert event.signed_by(policy_signing_keys(SharedSettings()))  # serving follows signed announcements only
