"""Which policy version serves new requests: the current one, a newer one in canary, the hot swap.

A request resolves its PolicyVersion once, at its start, and keeps it to the end: a swap changes only
what later requests get. The new adapter is loaded into the engine before the pointer moves, and older
adapters stay resident, so no request waits for a load or fails during a swap. A version the trainer
publishes first serves a share of the traffic as a canary (serving/canary.py); its verdict, promoted or
rolled back, goes to the registry and, through the policy topic, to every replica.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from common.adapter_check import check_adapter
from common.dead_letters import DeadLetter, DeadLetterProducer, parse_record
from common.kafka import ensure_topics, make_consumer
from common.keys import policy_signing_keys
from common.registry import BASE_POLICY, PROMOTED, PolicyRegistry, PolicyVersion, report_corrupt
from common.settings import SharedSettings
from feedback import Feedback, PolicyEvent
from serving import metrics
from serving.canary import CanaryConfig, CanaryTrial, Verdict
from serving.completion_ids import ServedAnswer
from serving.engine import EngineClient

log = logging.getLogger(__name__)


class UnknownPolicy(LookupError):
    """A model or version name that does not exist; the API answers 404."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class UnservablePolicy(UnknownPolicy):
    """A version whose adapter failed its check (common/adapter_check.py); never loaded into the engine."""


class PolicyManager:
    """The current version, the canary trial of a newer one, and the verdicts that end it.

    Every change of what is served happens under one lock, and a version is loaded into the engine before
    any request can be routed to it.
    """

    def __init__(self, engine: EngineClient, registry: PolicyRegistry, served_model_name: str,
                 canary: CanaryConfig, announce: Callable[[PolicyEvent], Awaitable[None]], *, base_model: Path):
        self._engine = engine
        self._registry = registry
        self._base_model = base_model
        self._refusals: dict[int, str | None] = {}  # each version's adapter check, once: versions never change
        self._canary = canary
        self._announce = announce
        self.served_model_name = served_model_name
        self.current: PolicyVersion = registry.get("v0")
        self.candidate: PolicyVersion | None = None  # compared against `current` in A/B requests
        self.trial: CanaryTrial | None = None
        self._lock = asyncio.Lock()
        metrics.POLICY_VERSION.labels(self.current.name).set(1)

    async def start(self) -> None:
        """At start-up, serve the newest promoted version and put a newer one into canary (without a canary:
        serve the newest one not rolled back). Versions whose adapter fails its check are passed over."""
        if self._canary.fraction == 0:
            await self._promoted_without_canary(await self.activate(self._newest(lambda v: not v.rolled_back)))
        else:
            await self.activate(self._newest(lambda v: v.promoted))
            await self.offer(self._newest(lambda v: not v.rolled_back))

    async def offer(self, name: str) -> None:
        """A newly published version: into canary (superseding an older canary), or with `fraction` 0 to all
        traffic at once. Versions not newer than what is served or tried, and rolled-back ones, are ignored."""
        async with self._lock:
            try:
                policy = self._lookup(name, param="version")
            except UnservablePolicy:
                return  # logged and counted; what is served stays
            newest = max(self.current.number, self.trial.canary.number if self.trial else 0)
            if policy.number <= newest or policy.rolled_back:
                return
            if self._canary.fraction == 0:
                await self._switch(policy)
                await self._promoted_without_canary(policy)
                return
            await self._engine.load_policy(policy)
            if self.trial:
                log.info("canary %s superseded by %s without a verdict", self.trial.canary.name, policy.name)
            self.trial = CanaryTrial(baseline=self.current, canary=policy, config=self._canary)
            metrics.CANARY_VERSION.set(policy.number)
            log.info("canary %s takes %.0f%% of the traffic beside %s", policy.name, 100 * self._canary.fraction,
                     self.current.name)

    async def activate(self, name: str) -> PolicyVersion:
        """Serve version `name` to all traffic from now on: an operator's rollback or pin. It ends a running
        canary without a verdict (its comparison no longer holds)."""
        async with self._lock:
            policy = self._lookup(name, param="version")
            if policy.number != self.current.number:
                self._end_trial()
            return await self._switch(policy)

    async def set_candidate(self, name: str | None) -> None:
        """Load version `name` as the A/B challenger of the current one (None: no candidate)."""
        async with self._lock:
            if name is None:
                self.candidate = None
                return
            policy = self._lookup(name, param="version")
            await self._engine.load_policy(policy)
            self.candidate = policy

    async def review(self) -> None:
        """Weigh the canary's evidence; conclude the trial when it is enough either way."""
        if (trial := self.trial) is not None:
            for name, value in trial.figures().items():
                metrics.CANARY_FIGURE.labels(name).set(value)
            if (verdict := trial.verdict()) is not None:
                await self.conclude(verdict, of=trial)

    async def conclude(self, verdict: Verdict, of: CanaryTrial | None = None) -> None:
        """Record the verdict on the running canary in the registry, apply it here, and announce it to the
        other replicas. A failed announcement is logged: the registry has the verdict for every later start.

        With `of`, the verdict is the evidence's on trial `of`: it applies only while that trial runs, and
        only if no other replica recorded one first (that one stands: the first verdict is final). Without
        it, an operator's verdict, it replaces any other."""
        async with self._lock:
            trial = self.trial
            if trial is None or (of is not None and trial is not of):
                return
            if of is not None:
                recorded = await asyncio.to_thread(self._registry.get, trial.canary.name)
                if recorded.verdict is not None:  # its announcement is on the way; nothing to add to it
                    first = recorded.verdict["verdict"]
                    log.info("canary %s: another replica's verdict stands (%s)", trial.canary.name, first)
                    await self._settle(recorded, first)
                    return
            figures = trial.figures()
            await asyncio.to_thread(self._registry.record_verdict, trial.canary.name, verdict.verdict,
                                    verdict.reason, figures)
            await self._settle(trial.canary, verdict.verdict)
            metrics.CANARY_VERDICTS.labels(verdict.verdict).inc()
            log.warning("canary %s %s: %s", trial.canary.name, verdict.verdict.replace("_", " "), verdict.reason)
        event = PolicyEvent(version=trial.canary.name, base_model=trial.canary.manifest.get("base_model", ""),
                            action=verdict.verdict, reason=verdict.reason, metrics=figures)
        try:
            await self._announce(event)
        except Exception:
            log.exception("could not announce the verdict on %s", trial.canary.name)

    async def follow(self, event: PolicyEvent) -> None:
        """Apply an announcement: a new version from the trainer, or another replica's verdict."""
        if event.action == "published":
            await self.offer(event.version)
            return
        async with self._lock:
            if self.trial is not None and self.trial.canary.name == event.version:
                await self._settle(self.trial.canary, event.action)

    def resolve(self, model: str | None, user_hash: str | None = None) -> PolicyVersion:
        """The version a request's `model` field asks for: the served name (the current version, or the
        canary for its share of the requests), or `<name>@<version>` to pin one. Raises UnknownPolicy."""
        if self.routes(model):
            trial = self.trial
            return trial.canary if trial is not None and trial.takes(user_hash) else self.current
        name, _, version = model.partition("@")
        if name != self.served_model_name or not version:
            raise UnknownPolicy(f"model {model!r} does not exist; this server serves {self.served_model_name!r}",
                                param="model")
        return self._lookup(version, param="model")

    def routes(self, model: str | None) -> bool:
        """Whether a request's `model` leaves the version to serving (the canary's share, and evidence about
        it), rather than pinning one."""
        return model is None or model == self.served_model_name

    def ab_pair(self, policy: PolicyVersion) -> list[PolicyVersion]:
        """The versions an A/B request for `policy` compares: it and the candidate; without a candidate, the
        baseline and the canary while one runs (head-to-head evidence for its trial); else `policy` twice."""
        if self.candidate is not None:
            return [policy, self.candidate]
        trial = self.trial
        if trial is not None and policy.number in (trial.baseline.number, trial.canary.number):
            return [trial.baseline, trial.canary]
        return [policy, policy]

    def observe_request(self, versions: Sequence[str], failed: bool) -> None:
        """A request this replica routed (see `routes`), not an operator's: evidence for the canary."""
        if self.trial is not None:
            self.trial.observe_request(versions, failed)

    def observe_feedback(self, feedback: Feedback, user_hash: str | None,
                         answers: Sequence[ServedAnswer]) -> None:
        """Feedback on `answers` (what their verified ids say), served by any replica: evidence for the canary
        on answers routed by its rules since its trial started."""
        if self.trial is not None:
            self.trial.observe_feedback(feedback, user_hash, answers)

    def versions(self) -> list[PolicyVersion]:
        return self._registry.list()

    def _lookup(self, name: str, param: str) -> PolicyVersion:
        try:
            policy = self._registry.get(name)
        except (KeyError, ValueError):
            raise UnknownPolicy(f"policy version {name!r} does not exist", param=param) from None
        if not policy.is_base and policy.number not in self._refusals:
            try:
                check_adapter(policy.path, self._base_model)
                self._refusals[policy.number] = None
            except Exception as exc:  # BadAdapter, or files it cannot read: never hand vLLM such weights
                self._refusals[policy.number] = str(exc)
                report_corrupt("adapter", policy.name, f"{exc}; not served")
        if (refusal := self._refusals.get(policy.number)) is not None:
            raise UnservablePolicy(f"policy version {name!r} is not served: its adapter failed its check "
                                   f"({refusal})", param=param)
        return policy

    def _newest(self, wanted: Callable[[PolicyVersion], bool]) -> str:
        """The newest version that is `wanted` and passes its check (v0 at worst)."""
        for version in reversed(self._registry.list()):
            try:
                if wanted(version):
                    return self._lookup(version.name, param="version").name
            except UnservablePolicy:
                continue
        return BASE_POLICY.name

    async def _switch(self, policy: PolicyVersion) -> PolicyVersion:
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

    async def _promoted_without_canary(self, policy: PolicyVersion) -> None:
        """Record that `policy` went to all traffic untried: the trainer waits for a verdict on the newest
        version before its next round (TRAINER_AWAIT_VERDICT_S), and no canary will give one."""
        if policy.verdict is None and not policy.is_base:
            await asyncio.to_thread(self._registry.record_verdict, policy.name, PROMOTED,
                                    "no canary (SERVING_CANARY__FRACTION=0)", {})

    async def _settle(self, canary: PolicyVersion, verdict: str) -> None:
        """End the running trial of `canary` with `verdict`: serve it from now on if promoted. The switch
        comes first: ending the trial first sent the canary's share back to the baseline while the engine
        loaded the promoted version (seen as a flaky closed-loop test)."""
        if verdict == PROMOTED:
            await self._switch(canary)
        self._end_trial()

    def _end_trial(self) -> None:
        self.trial = None
        metrics.CANARY_VERSION.set(0)
        metrics.CANARY_FIGURE.clear()


class PolicyFollower:
    """Follows the policy topic on its own thread: new versions, and verdicts on canaries.

    Every serving replica must see every announcement, so it reads without a consumer group, from the end
    of the topic. It is started before the registry is read at start-up: a version published in between is
    both in the registry and on the topic, and offering it twice is a no-op. It acts only on announcements
    signed by the shared key (feedback.PolicyEvent); others are counted, logged and ignored.
    """

    def __init__(self, settings: SharedSettings, manager: PolicyManager, loop: asyncio.AbstractEventLoop):
        ensure_topics(settings, [settings.policy_topic])  # one partition: announcements stay in order
        self._consumer = make_consumer(settings, [settings.policy_topic], group_id=None, auto_offset_reset="latest")
        self._dead_letters = DeadLetterProducer(settings)
        self._keys = policy_signing_keys(settings)
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
        self._dead_letters.close()

    def _follow(self) -> None:
        while not self._stopping.is_set():
            for records in self._consumer.poll(timeout_ms=500).values():
                for record in records:
                    event = parse_record(record, PolicyEvent.model_validate_json, consumer="serving")
                    if isinstance(event, DeadLetter):
                        self._dead_letters.send(event)
                    elif not event.signed_by(self._keys):
                        self._reject(event, record.offset)
                    else:
                        self._apply(event)

    @staticmethod
    def _reject(event: PolicyEvent, offset: int) -> None:
        """An announcement not signed by the trainer's or a replica's key: forged, or from a misconfigured
        producer. Acting on it could serve any version; it changes nothing."""
        reason = "unsigned" if event.signature is None else "bad_signature"
        metrics.POLICY_EVENTS_REJECTED.labels(reason).inc()
        log.warning("ignored a policy announcement at offset %d (%s): %s %s", offset, reason.replace("_", " "),
                    event.action, event.version)

    def _apply(self, event: PolicyEvent) -> None:
        try:
            future = asyncio.run_coroutine_threadsafe(self._manager.follow(event), self._loop)
            future.result(timeout=120)
        except Exception:
            log.exception("could not apply the policy announcement %s", event.model_dump_json())
