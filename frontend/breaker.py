"""A circuit breaker for the model server: after `threshold` tasks in a row failed there, stop starting tasks.

Triton can say "ready" while the pipeline cannot work: a component model's stub process that crashed stays
READY in Triton 2.51 and answers every call "Stub process ... is not healthy". Without a breaker the
queue drains into failures one after another. With it, the queue waits (status `busy`, `/readyz` 503), and
after `cooldown_s` one trial task runs: success closes the breaker, failure opens it for another cool-down.
Triton coming back from being unreachable also closes it (a restarted server deserves a try).
"""

from __future__ import annotations

import math
import time
from typing import Callable


class FailureBreaker:
    def __init__(self, threshold: int = 3, cooldown_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.threshold = threshold  # 0: never opens
        self.cooldown_s = cooldown_s
        self._clock = clock
        self.failures = 0  # in a row
        self._opened_at: float | None = None

    @property
    def open(self) -> bool:
        """Tasks are held back (the cool-down has not elapsed, or a trial is under way)."""
        return self._opened_at is not None

    def record_success(self) -> None:
        self.failures = 0
        self._opened_at = None

    def record_failure(self) -> None:
        self.failures += 1
        if self.threshold and self.failures >= self.threshold:
            self._opened_at = self._clock()  # (again, when a trial failed)

    def reset(self) -> None:
        self.record_success()

    def allows(self, running: int) -> bool:
        """May a task start now, with `running` tasks running? Closed: yes. Open: after the cool-down, one
        trial at a time."""
        if self._opened_at is None:
            return True
        return self._clock() - self._opened_at >= self.cooldown_s and running == 0

    def reason(self) -> str:
        wait = 0.0 if self._opened_at is None else max(0.0, self.cooldown_s - (self._clock() - self._opened_at))
        return (f"the last {self.failures} tasks failed in the model server; "
                f"{'next try in ' + str(math.ceil(wait)) + ' s' if wait > 0 else 'trying one task'}")
