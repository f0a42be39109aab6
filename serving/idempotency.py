"""Idempotency keys within one replica: a retry gets the first answer, and no second event is produced.

A key maps to the fingerprint of the request that first used it and to that request's answer (a future,
so that a retry arriving while the first is still waiting for Kafka waits for the same answer). A key
reused with another body is a conflict (409, as Stripe answers). A failed first attempt is forgotten, so
the retry tries again. Across replicas the event id, derived from the key (feedback.idempotent_event_id),
lets the trainer keep one of the two events.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class IdempotencyConflict(Exception):
    """The key was first used with another request body."""


class IdempotencyCache(Generic[T]):
    def __init__(self, size: int):
        self._size = size
        self._entries: OrderedDict[tuple, tuple[str, asyncio.Future[T]]] = OrderedDict()

    async def run(self, key: tuple, fingerprint: str, produce: Callable[[], Awaitable[T]]) -> T:
        """The answer of the first request under `key`, produced now if there is none."""
        if (entry := self._entries.get(key)) is not None:
            first_fingerprint, answer = entry
            if first_fingerprint != fingerprint:
                raise IdempotencyConflict
            self._entries.move_to_end(key)
            return await asyncio.shield(answer)
        answer: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._entries[key] = (fingerprint, answer)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        try:
            result = await produce()
        except BaseException as exc:
            if self._entries.get(key, (None, None))[1] is answer:
                del self._entries[key]
            answer.set_exception(exc)
            answer.exception()  # retrieved: waiting retries get it, and no one else needs to
            raise
        answer.set_result(result)
        return result
