"""Completions, feedback and canary verdicts to Kafka, through a spool on disk while Kafka cannot take them.

One sender thread hands every event to the producer: kafka-python's send() may block (metadata, a full
buffer), never on the event loop. An event the producer could not take, or did not deliver within
`ack_timeout_s` (its delivery timeout; what it still holds a second later is taken back), goes to the spool
(serving/spool.py); while the spool holds anything, new events queue behind it there. A replayer thread sends the spool's records in order once Kafka is back,
with back-off, and moves the spool's cursor only past what Kafka acknowledged. Delivery is at least once
(a replay after a lost acknowledgement, or after a crash before the cursor moved, sends a record again);
the trainer stores each event id once. Events in flight when Kafka failed may land after later ones.

Feedback is answered only once it is durable: acknowledged by Kafka (acks=all) or fsynced to the spool. Its
request awaits an asyncio future that the producer's callbacks settle through call_soon_threadsafe, so no
thread waits per request. A full spool refuses feedback (EventLogUnavailable: 503 with Retry-After) and drops
completion events (counted). Canary verdicts are not spooled: their caller logs the failure, and the
registry keeps the verdict for every later start.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kafka import KafkaProducer
from kafka.errors import CorruptRecordError, InvalidRecordError, KafkaTimeoutError, MessageSizeTooLargeError

from common.kafka import ensure_topics, make_producer, wait_for_broker
from common.keys import policy_signing_key
from common.settings import SharedSettings
from feedback import CompletionEvent, FeedbackEvent, PolicyEvent, referenced_choices
from serving import metrics
from serving.settings import ServingSettings
from serving.spool import Spool, SpooledRecord, SpoolFull

log = logging.getLogger(__name__)

REPLAY_BATCH = 500
GRACE_S = 1.0  # past the delivery timeout, an event the producer still holds is taken back and spooled
SWEEP_S = 0.25  # how often the sender looks for such events when idle
BACKOFF_S = (0.2, 10.0)  # first and longest pause between replays that failed
LINGER_MS = 5
# Kafka refuses these for the record itself: retrying cannot help, so a replay drops the record (counted).
_REJECTED = (MessageSizeTooLargeError, InvalidRecordError, CorruptRecordError)


class EventLogUnavailable(Exception):
    """The event could not be stored durably; the client may retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EventSink(Protocol):
    def log_completion(self, event: CompletionEvent) -> None: ...

    async def record_feedback(self, event: FeedbackEvent) -> None: ...

    async def announce_policy(self, event: PolicyEvent) -> None: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class _Pending:
    kind: str  # 'completion', 'feedback' or 'policy': the metrics' label
    topic: str
    key: str
    value: str
    settle: Callable[[BaseException | None], None] | None = None  # told once the event is durable, or not
    spool: bool = True  # False: a failure goes to `settle`, not to the spool
    failed: bool = False  # the producer gave up on it: to the spool


_STOP = object()


class KafkaEventLog:
    def __init__(self, settings: SharedSettings, spool_dir: Path, queue_size: int, ack_timeout_s: float,
                 spool_max_bytes: int = 1 << 30):
        wait_for_broker(settings)
        ensure_topics(settings, [settings.completions_topic, settings.feedback_topic, settings.policy_topic])
        self._settings = settings
        self._signing_key = policy_signing_key(settings)
        self._queue_size = queue_size
        self._ack_timeout_s = ack_timeout_s
        delivery_ms = int(ack_timeout_s * 1000)
        self._producer: KafkaProducer = make_producer(
            settings, linger_ms=LINGER_MS, delivery_timeout_ms=delivery_ms,
            request_timeout_ms=max(1, delivery_ms - LINGER_MS), max_block_ms=min(delivery_ms, 2_000),
        )
        self._spool = Spool(spool_dir, spool_max_bytes)
        _watch(self._spool)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight: dict[_Pending, float] = {}  # sent, not yet acknowledged nor failed: by deadline
        self._stopping = threading.Event()
        self._spooled = threading.Event()  # wakes the replayer
        self._replayer = threading.Thread(target=self._replay_loop, name="event-replay", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name="event-sender", daemon=True)
        self._replayer.start()
        self._sender.start()

    @classmethod
    def from_settings(cls, settings: ServingSettings) -> KafkaEventLog:
        spool_dir = settings.spool_dir or Path(f"var/serving/spool-{settings.port}")
        return cls(settings, spool_dir, settings.event_queue_size, settings.feedback_ack_timeout_s,
                   settings.spool_max_bytes)

    # --- The EventSink interface ----------------------------------------------------------------

    def log_completion(self, event: CompletionEvent) -> None:
        if self._queue.qsize() >= self._queue_size:
            metrics.EVENTS_DROPPED.inc()
            return
        self._queue.put(_Pending("completion", self._settings.completions_topic, event.completion_id,
                                 event.model_dump_json()))

    async def record_feedback(self, event: FeedbackEvent) -> None:
        await self._durably("feedback", self._settings.feedback_topic, _feedback_key(event), event, spool=True)

    async def announce_policy(self, event: PolicyEvent) -> None:
        """A canary's verdict, signed: the other replicas act only on signed announcements."""
        signed = event.signed(self._signing_key)
        await self._durably("policy", self._settings.policy_topic, event.version, signed, spool=False)

    def close(self) -> None:
        self._stopping.set()
        self._spooled.set()
        self._replayer.join(timeout=self._ack_timeout_s + 30)
        self._queue.put(_STOP)
        self._sender.join(timeout=self._ack_timeout_s + 30)
        try:
            self._producer.close(timeout=10)
        except KafkaTimeoutError:
            # Kafka is unreachable and the producer still holds records it never expires: they were taken
            # back into the spool when overdue. kafka-python's close() raises on its flush before it stops its
            # sender thread, which would then deliver them later as well: stop it here.
            log.warning("closing during a Kafka outage: what the producer still held is in the spool")
            self._producer._sender.force_close()
        self._spool.close()

    # --- Callers' side --------------------------------------------------------------------------

    async def _durably(self, kind: str, topic: str, key: str, event: FeedbackEvent | PolicyEvent,
                       spool: bool) -> None:
        if self._queue.qsize() >= self._queue_size:
            raise EventLogUnavailable("too many events are waiting for Kafka", retry_after_s=1)
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(error: BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(_settle, future, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        self._queue.put(_Pending(kind, topic, key, event.model_dump_json(), settle, spool))
        # Settled within the delivery timeout and its grace; this bound is for a stuck sender thread only.
        guard = loop.call_later(self._ack_timeout_s + GRACE_S + 10, _expire, future, kind)
        try:
            await future
        finally:
            guard.cancel()

    # --- The sender thread ----------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            try:
                batch = [self._queue.get(timeout=SWEEP_S)]
            except queue.Empty:
                batch = []
            while batch and len(batch) < REPLAY_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = _STOP in batch
            backlog = self._spool.records > 0  # new events queue behind the spooled ones
            to_spool = self._overdue(time.monotonic())
            for pending in batch:
                if pending is _STOP:
                    continue
                if pending.failed or (pending.spool and backlog) or not self._send(pending):
                    to_spool.append(pending)
            self._to_spool(to_spool)
            if stopping:
                self._finish()
                return

    def _send(self, pending: _Pending) -> bool:
        """Hand it to the producer; False if the producer refused it outright and it should be spooled."""
        with self._lock:
            self._in_flight[pending] = time.monotonic() + self._ack_timeout_s + GRACE_S
        try:
            future = self._producer.send(pending.topic, key=pending.key, value=pending.value)
        except Exception as exc:  # any producer error: neither the event nor this thread may be lost
            self._failed(pending, exc, requeue=False)
            return not pending.spool
        future.add_callback(self._delivered, pending)
        future.add_errback(self._failed, pending)
        return True

    def _claim(self, pending: _Pending) -> bool:
        """Whether this outcome is the event's first (an acknowledgement, a failure, or being overdue)."""
        with self._lock:
            return self._in_flight.pop(pending, None) is not None

    def _overdue(self, now: float) -> list[_Pending]:
        """Events sent that the producer has neither delivered nor failed in time: it can hold them without
        expiring them (waiting for a producer id from a broker that is gone), so they are taken back."""
        late = []
        with self._lock:
            while self._in_flight:
                pending, deadline = next(iter(self._in_flight.items()))  # the oldest: deadlines grow in order
                if deadline > now:
                    break
                del self._in_flight[pending]
                late.append(pending)
        spooled = []
        for pending in late:
            metrics.EVENTS_FAILED.labels(pending.kind).inc()
            if pending.spool:
                spooled.append(pending)
            elif pending.settle:
                pending.settle(EventLogUnavailable(f"Kafka did not acknowledge the {pending.kind} event in time"))
        return spooled

    def _delivered(self, pending: _Pending, _metadata) -> None:
        if not self._claim(pending):
            return  # spooled already as overdue: Kafka will have it twice, the consumers keep one
        metrics.EVENTS_SENT.labels(pending.kind).inc()
        if pending.settle:
            pending.settle(None)

    def _failed(self, pending: _Pending, exc: BaseException, requeue: bool = True) -> None:
        """The producer gave up on an event (on its own thread): to the spool, through the sender."""
        if not self._claim(pending):
            return
        metrics.EVENTS_FAILED.labels(pending.kind).inc()
        if not pending.spool:
            if pending.settle:
                pending.settle(EventLogUnavailable(f"Kafka did not take the {pending.kind} event: {exc}"))
            return
        log.debug("%s event not delivered (%s): to the spool", pending.kind, exc)
        pending.failed = True
        if requeue:
            self._queue.put(pending)

    def _to_spool(self, batch: list[_Pending]) -> None:
        """One fsync for the whole batch (a group commit), then each waiting caller is told."""
        if not batch:
            return
        if not self._spool.records:
            log.warning("Kafka is not taking events: spooling them to %s", self._spool.directory)
        try:
            self._spool.append([_encode(p.topic, p.key, p.value) for p in batch])
        except (SpoolFull, OSError) as exc:
            log.error("spool refused %d event(s): %s", len(batch), exc)
            for pending in batch:
                if pending.settle:
                    pending.settle(EventLogUnavailable(f"Kafka is unreachable and {exc}", retry_after_s=30))
                else:
                    metrics.SPOOL_DROPPED.labels("full").inc()
            return
        for pending in batch:
            metrics.EVENTS_SPOOLED.labels(pending.kind).inc()
            if pending.settle:
                pending.settle(None)
        self._spooled.set()

    def _finish(self) -> None:
        """At close: wait for what is in flight; what Kafka has not taken by then is spooled for the next start."""
        try:
            self._producer.flush(timeout=self._ack_timeout_s + GRACE_S)
        except Exception as exc:
            log.warning("flush at close: %s", exc)
        leftovers = self._overdue(float("inf"))
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                break
            if pending is _STOP:
                continue
            if pending.spool:
                leftovers.append(pending)
            elif pending.settle:
                pending.settle(EventLogUnavailable("the event log is closing"))
        self._to_spool(leftovers)

    # --- The replayer thread --------------------------------------------------------------------

    def _replay_loop(self) -> None:
        pause, probing = BACKOFF_S[0], False
        while not self._stopping.is_set():
            records = self._spool.read(1 if probing else REPLAY_BATCH)  # one record tells if Kafka is back
            if not records:
                self._spooled.wait(timeout=1.0)
                self._spooled.clear()
                continue
            try:
                ok = self._replay(records)
            except Exception:  # the spool's disk, or anything else: back off and try again, never die
                log.exception("replay failed")
                ok = False
            if ok:
                if not self._spool.records:
                    log.info("the spool is replayed: events go straight to Kafka again")
                pause, probing = BACKOFF_S[0], False
            else:
                probing = True
                self._stopping.wait(pause)
                pause = min(2 * pause, BACKOFF_S[1])

    def _replay(self, records: list[SpooledRecord]) -> bool:
        """Send records in order and commit the spool up to the last one Kafka took; False at the first failure."""
        futures = []
        for record in records:
            topic, key, value = _decode(record.payload)
            try:
                futures.append((record, topic, self._producer.send(topic, key=key, value=value)))
            except Exception as exc:
                futures.append((record, topic, exc))
                break
        delivered = None
        try:
            for record, topic, future in futures:
                kind = "completion" if topic == self._settings.completions_topic else "feedback"
                error = future if isinstance(future, Exception) else _outcome(future, self._ack_timeout_s + 5)
                if isinstance(error, _REJECTED):
                    log.error("Kafka rejected a spooled %s event; dropped: %s", kind, error)
                    metrics.SPOOL_DROPPED.labels("rejected").inc()
                elif error is not None:
                    log.info("replay stopped (%s); %d spooled event(s) wait", error, self._spool.records)
                    return False
                else:
                    metrics.EVENTS_REPLAYED.labels(kind).inc()
                delivered = record
            return True
        finally:
            if delivered is not None:
                self._spool.commit(delivered.position)


def _outcome(future, timeout_s: float) -> BaseException | None:
    try:
        future.get(timeout=timeout_s)
    except Exception as exc:
        return exc
    return None


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the request gave up (timeout, client gone)
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _expire(future: asyncio.Future, kind: str) -> None:
    _settle(future, EventLogUnavailable(f"the {kind} event was not stored in time"))


def _watch(spool: Spool) -> None:
    """The spool's depth and age, read at each scrape."""
    metrics.SPOOL_RECORDS.set_function(lambda: spool.records)
    metrics.SPOOL_BYTES.set_function(lambda: spool.bytes)
    metrics.SPOOL_OLDEST_AGE.set_function(spool.oldest_age_s)
    metrics.SPOOL_MAX_BYTES.set(spool.max_bytes)
    if spool.corrupt_records:
        log.error("spool %s: %d corrupt record(s) skipped", spool.directory, spool.corrupt_records)
        metrics.SPOOL_DROPPED.labels("corrupt").inc(spool.corrupt_records)


_LENGTHS = struct.Struct("<HH")


def _encode(topic: str, key: str, value: str) -> bytes:
    t, k = topic.encode(), key.encode()
    return _LENGTHS.pack(len(t), len(k)) + t + k + value.encode()


def _decode(payload: bytes) -> tuple[str, str, str]:
    t, k = _LENGTHS.unpack_from(payload)
    start = _LENGTHS.size
    return (payload[start:start + t].decode(), payload[start + t:start + t + k].decode(),
            payload[start + t + k:].decode())


def _feedback_key(event: FeedbackEvent) -> str:
    # Keyed like the completion it is about, so both land in the same partition of their topics.
    return referenced_choices(event.feedback)[0].completion_id
