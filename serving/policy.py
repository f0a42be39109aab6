"""Which policy version serves new requests, and the hot swap to a new one.

A request resolves its PolicyVersion once, at its start, and keeps it to the end: a swap changes only
what later requests get. The new adapter is loaded into the engine before the pointer moves, and older
adapters stay resident, so no request waits for a load or fails during a swap.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from common.kafka import ensure_topics, make_consumer
from common.registry import PolicyRegistry, PolicyVersion, version_number
from common.settings import SharedSettings
from feedback import PolicyEvent
from serving import metrics
from serving.engine import EngineClient

log = logging.getLogger(__name__)


class UnknownPolicy(LookupError):
    """A model or version name that does not exist; the API answers 404."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class PolicyManager:
    def __init__(self, engine: EngineClient, registry: PolicyRegistry, served_model_name: str):
        self._engine = engine
        self._registry = registry
        self.served_model_name = served_model_name
        self.current: PolicyVersion = registry.get("v0")
        self.candidate: PolicyVersion | None = None  # compared against `current` in A/B requests
        self._lock = asyncio.Lock()
        metrics.POLICY_VERSION.labels(self.current.name).set(1)

    async def activate(self, name: str) -> PolicyVersion:
        """Load version `name` and make it the one new requests get."""
        async with self._lock:
            policy = self._lookup(name, param="version")
            if policy.number == self.current.number:
                return policy
            await self._engine.load_policy(policy)
            previous, self.current = self.current, policy
            metrics.POLICY_VERSION.labels(previous.name).set(0)
            metrics.POLICY_VERSION.labels(policy.name).set(1)
            metrics.POLICY_NUMBER.set(policy.number)
            metrics.POLICY_SWITCHES.inc()
            log.info("serving policy %s (was %s)", policy.name, previous.name)
            return policy

    async def set_candidate(self, name: str | None) -> None:
        """Load version `name` as the A/B challenger of the current one (None: no candidate)."""
        async with self._lock:
            if name is None:
                self.candidate = None
                return
            policy = self._lookup(name, param="version")
            await self._engine.load_policy(policy)
            self.candidate = policy

    async def activate_latest(self) -> PolicyVersion:
        return await self.activate(self._registry.latest().name)

    def resolve(self, model: str | None) -> PolicyVersion:
        """The version a request's `model` field asks for: the served name (current version), or
        `<name>@<version>` to pin one. Raises UnknownPolicy."""
        if model is None or model == self.served_model_name:
            return self.current
        name, _, version = model.partition("@")
        if name != self.served_model_name or not version:
            raise UnknownPolicy(f"model {model!r} does not exist; this server serves {self.served_model_name!r}",
                                param="model")
        return self._lookup(version, param="model")

    def _lookup(self, name: str, param: str) -> PolicyVersion:
        try:
            return self._registry.get(name)
        except (KeyError, ValueError):
            raise UnknownPolicy(f"policy version {name!r} does not exist", param=param) from None

    def versions(self) -> list[PolicyVersion]:
        return self._registry.list()


class PolicyFollower:
    """Follows the policy topic on its own thread and activates each newer announced version.

    Every serving replica must see every announcement, so it reads without a consumer group, from the end
    of the topic. It is started before the registry is read at start-up: a version published in between is
    both in the registry and on the topic, and activating it twice is a no-op.
    """

    def __init__(self, settings: SharedSettings, manager: PolicyManager, loop: asyncio.AbstractEventLoop):
        ensure_topics(settings, [settings.policy_topic])  # one partition: announcements stay in order
        self._consumer = make_consumer(settings, [settings.policy_topic], group_id=None, auto_offset_reset="latest")
        self._manager = manager
        self._loop = loop
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="policy-follower", daemon=True)

    def start(self) -> None:
        # Poll once here so that partitions are assigned and the position fixed before we return.
        while not self._consumer.assignment():
            self._consumer.poll(timeout_ms=100)
        self._consumer.seek_to_end()
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        self._consumer.close()

    def _follow(self) -> None:
        while not self._stopping.is_set():
            for records in self._consumer.poll(timeout_ms=500).values():
                for record in records:
                    self._handle(record.value)

    def _handle(self, raw: str) -> None:
        try:
            event = PolicyEvent.model_validate_json(raw)
            if version_number(event.version) <= self._manager.current.number:
                return
            future = asyncio.run_coroutine_threadsafe(self._manager.activate(event.version), self._loop)
            future.result(timeout=120)
        except Exception:
            log.exception("could not switch to the announced policy: %s", raw[:500])
