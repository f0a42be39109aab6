"""Token buckets: per app key and per end user, so that neither can flood the feedback topic.

A bucket holds up to `burst` tokens and refills at `rate` per second; a request takes one. Buckets of
names not seen for a while are forgotten (the least recently used beyond `capacity`), which only makes a
forgotten name start again from a full bucket.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBuckets:
    def __init__(self, rate: float, burst: float, capacity: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self._capacity, self._clock = rate, burst, capacity, clock
        self._buckets: OrderedDict[str | None, tuple[float, float]] = OrderedDict()  # name -> (tokens, at)

    def wait(self, name: str | None) -> float:
        """Seconds until `name` has a token (0: it has one now). A rate of 0 means no limit."""
        if self.rate <= 0:
            return 0.0
        tokens = self._tokens(name)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def take(self, name: str | None) -> None:
        if self.rate > 0:
            self._buckets[name] = (self._tokens(name) - 1, self._clock())
            self._buckets.move_to_end(name)
            while len(self._buckets) > self._capacity:
                self._buckets.popitem(last=False)

    def _tokens(self, name: str | None) -> float:
        tokens, at = self._buckets.get(name, (self.burst, self._clock()))
        return min(self.burst, tokens + (self._clock() - at) * self.rate)


class RateLimited(Exception):
    def __init__(self, retry_after_s: float, who: str):
        super().__init__(f"too much feedback from this {who}; retry in {math.ceil(retry_after_s)} s")
        self.retry_after_s = retry_after_s


class FeedbackLimits:
    """One app key's and one user's buckets together: a piece of feedback passes only if both have a token
    (and only then takes one from each)."""

    def __init__(self, per_key: TokenBuckets, per_user: TokenBuckets):
        self._per_key, self._per_user = per_key, per_user

    def admit(self, key_id: str | None, user_hash: str | None) -> None:
        """Take a token for this key and user, or raise RateLimited with the time to wait."""
        waits = {"app key": self._per_key.wait(key_id),
                 "user": self._per_user.wait(user_hash) if user_hash is not None else 0.0}
        who, longest = max(waits.items(), key=lambda item: item[1])
        if longest > 0:
            raise RateLimited(longest, who)
        self._per_key.take(key_id)
        if user_hash is not None:
            self._per_user.take(user_hash)
