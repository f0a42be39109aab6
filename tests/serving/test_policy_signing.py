"""Signed policy announcements: serving acts only on what the shared key signed. A forged announcement (no
signature, another key, a signature copied from another event) changes nothing and is counted; a signed one
is followed. The follower runs against the real broker (embedded Tansu, or KAFKA_BOOTSTRAP_SERVERS)."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import asynccontextmanager

import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr

from common.kafka import make_producer
from common.keys import policy_signing_keys
from common.registry import PolicyRegistry
from feedback import PolicyEvent
from serving.canary import CanaryConfig
from serving.policy import PolicyFollower, PolicyManager
from tests.adapters import fake_base_model
from tests.serving.fakes import FakeEngine
from tests.serving.test_policy import publish_fake_adapter

KEY, PREVIOUS_KEY, OTHER_KEY = "k" * 32, "p" * 32, "o" * 32


def rejected(reason: str) -> float:
    return REGISTRY.get_sample_value("rlhf_policy_events_rejected_total", {"reason": reason}) or 0.0


# --- The signature ---------------------------------------------------------------------------------


def test_a_signature_covers_every_field_and_survives_the_wire():
    event = PolicyEvent(version="v3", base_model="base", metrics={"reward": 0.25}).signed(KEY)
    assert PolicyEvent.model_validate_json(event.model_dump_json()).signed_by([KEY])
    assert event.signed_by([OTHER_KEY, KEY]) and not event.signed_by([OTHER_KEY])
    for change in ({"version": "v4"}, {"action": "promoted"}, {"metrics": {"reward": 0.5}}, {"schema_version": 1},
                   {"base_model": "other"}):
        assert not event.model_copy(update=change).signed_by([KEY]), change
    assert not PolicyEvent(version="v3", base_model="base").signed_by([KEY])
    assert not event.model_copy(update={"signature": "é" * 64}).signed_by([KEY])  # refused, not an exception


def test_keys_from_settings_or_the_local_file(kafka_settings, tmp_path):
    local = kafka_settings.model_copy(update={"policy_signing_key_file": tmp_path / "key"})
    assert policy_signing_keys(local) == policy_signing_keys(local) and len(policy_signing_keys(local)[0]) >= 32
    rotating = local.model_copy(update={"policy_signing_key": SecretStr(KEY),
                                        "policy_signing_previous_key": SecretStr(PREVIOUS_KEY)})
    assert policy_signing_keys(rotating) == [KEY, PREVIOUS_KEY]


# --- The follower, on the real broker --------------------------------------------------------------


@asynccontextmanager
async def following_without_canary(settings, registry: PolicyRegistry, engine: FakeEngine):
    """A policy manager (every version to all traffic at once) and its follower on `settings`' policy topic,
    with a producer to announce on it."""
    manager = PolicyManager(engine, registry, "m", CanaryConfig(fraction=0), announce=None,
                            base_model=fake_base_model())
    follower = PolicyFollower(settings, manager, asyncio.get_running_loop())
    await asyncio.to_thread(follower.start)
    producer = make_producer(settings)
    try:
        yield manager, producer
    finally:
        await asyncio.to_thread(follower.stop)
        producer.close()


async def until(condition, timeout_s: float = 20.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)


@pytest.mark.kafka
def test_a_forged_announcement_changes_nothing_and_a_signed_one_is_followed(kafka_settings, tmp_path):
    settings = kafka_settings.model_copy(update={
        "topic_prefix": f"{kafka_settings.topic_prefix}{uuid.uuid4().hex[:8]}.",
        "policy_signing_key": SecretStr(KEY), "policy_signing_previous_key": SecretStr(PREVIOUS_KEY)})
    registry = PolicyRegistry(tmp_path / "registry")
    engine = FakeEngine()
    v1, v2, v3 = (publish_fake_adapter(registry, tmp_path) for _ in range(3))
    before = {reason: rejected(reason) for reason in ("unsigned", "bad_signature")}
    borrowed = PolicyEvent(version=v1, base_model="base").signed(KEY).signature
    forged = [
        PolicyEvent(version=v3, base_model="base"),  # no signature
        PolicyEvent(version=v3, base_model="base").signed(OTHER_KEY),  # someone else's key
        PolicyEvent(version=v3, base_model="base", signature=borrowed),  # a signature of another event
    ]

    async def scenario() -> list[str]:
        async with following_without_canary(settings, registry, engine) as (manager, producer):
            # The forged ones name the newest version: had one been followed, v1 (older) would be ignored.
            for event in [*forged, PolicyEvent(version=v1, base_model="base").signed(KEY)]:
                producer.send(settings.policy_topic, key=event.version, value=event).get(10)
            # One partition, read in order: once v1 is served, the forged ones before it were handled.
            await until(lambda: manager.current.name == v1)
            served = [manager.current.name]
            # After a rotation, announcements signed by the previous key are still followed.
            rotated = PolicyEvent(version=v2, base_model="base").signed(PREVIOUS_KEY)
            producer.send(settings.policy_topic, key=v2, value=rotated).get(10)
            await until(lambda: manager.current.name == v2)
            return served + [manager.current.name]

    assert asyncio.run(scenario()) == [v1, v2]
    assert engine.loaded == [v1, v2]  # v3 was never loaded
    assert rejected("unsigned") - before["unsigned"] == 1
    assert rejected("bad_signature") - before["bad_signature"] == 2
