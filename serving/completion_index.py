"""Recently served completion ids and their number of choices, so that feedback on an id this server
never issued (or a choice it never returned) is refused at once instead of poisoning the training set.

Bounded, least-recently-served first out. It is per process: behind a load balancer, feedback must reach
the replica that served the completion (sticky sessions) or the capacity must cover the feedback window.
"""

from collections import OrderedDict
from threading import Lock


class CompletionIndex:
    def __init__(self, capacity: int):
        self._capacity = capacity
        self._choices: OrderedDict[str, int] = OrderedDict()
        self._lock = Lock()

    def add(self, completion_id: str, n_choices: int) -> None:
        with self._lock:
            self._choices[completion_id] = n_choices
            self._choices.move_to_end(completion_id)
            while len(self._choices) > self._capacity:
                self._choices.popitem(last=False)

    def choices(self, completion_id: str) -> int | None:
        """Number of choices of that completion, or None if unknown."""
        with self._lock:
            return self._choices.get(completion_id)
