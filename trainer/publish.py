"""A trained adapter becomes a policy version: copied into the registry, then announced on the topic."""

from __future__ import annotations

from pathlib import Path

from kafka import KafkaProducer

from common.adapter_check import BadAdapter, check_adapter
from common.keys import policy_signing_key
from common.registry import PolicyRegistry, PolicyVersion, report_corrupt
from common.settings import SharedSettings
from feedback.events import PolicyEvent

ANNOUNCE_TIMEOUT_S = 30.0


def publish_policy(
    adapter_dir: Path,
    *,
    registry: PolicyRegistry,
    producer: KafkaProducer,
    settings: SharedSettings,
    parent: str,
    metrics: dict[str, float],
    gate: list[str],
    source: str,
) -> PolicyVersion:
    """Publish `adapter_dir` as the next version and return it once the broker acknowledged the PolicyEvent.

    `metrics` are the round's figures and `gate` the evaluation gate's reasons (trainer.evaluation.gate); both
    go into the version's manifest.

    The registry comes first so that serving never hears of a version it cannot load. Publishing again
    from the same `source` (a round resumed after a crash between the two steps) finds the version
    already there and announces it again, which followers ignore if they have it. If the announcement
    fails the version still exists; the next round builds on it and announces its own successor.

    An adapter that fails the check (common/adapter_check.py: it loads, fits the base model, is finite) is
    never published: BadAdapter is raised, logged and counted (rlhf_registry_corrupt_total{what="adapter"}).
    """
    if registry.find(source) is None:  # else published before a crash: announce it again
        try:
            check_adapter(adapter_dir, settings.base_model)
        except BadAdapter as exc:
            report_corrupt("adapter", source, f"{exc}; not published")
            raise
    version = registry.publish(
        adapter_dir, base_model=str(settings.base_model), parent=parent, metrics=metrics, gate=gate,
        source=source,
    )  # fmt: skip
    event = PolicyEvent(version=version.name, base_model=str(settings.base_model), metrics=metrics)
    event = event.signed(policy_signing_key(settings))  # serving ignores unsigned announcements
    producer.send(settings.policy_topic, key=version.name, value=event).get(timeout=ANNOUNCE_TIMEOUT_S)
    return version
