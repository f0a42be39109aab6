"""Recently served completion ids and the policy version of each of their choices: feedback on an id this
server never issued (or a choice it never returned) is refused at once instead of poisoning the training
set, and feedback on an answer counts as evidence about the version that wrote it (the canary's).

Bounded, least-recently-served first out. It is per process: behind a load balancer, feedback must reach
the replica that served the completion (sticky sessions) or the capacity must cover the feedback window.
"""

from collections import OrderedDict
from threading import Lock


class CompletionIndex:
    def __init__(self, capacity: int):
        self._capacity = capacity
        self._choices: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self._lock = Lock()

    def add(self, completion_id: str, versions: list[str]) -> None:
        """Remember a completion: `versions[i]` wrote its choice i."""
        with self._lock:
            self._choices[completion_id] = tuple(versions)
            self._choices.move_to_end(completion_id)
            while len(self._choices) > self._capacity:
                self._choices.popitem(last=False)

    def versions(self, completion_id: str) -> tuple[str, ...] | None:
        """The versions that wrote that completion's choices, or None if unknown."""
        with self._lock:
            return self._choices.get(completion_id)
