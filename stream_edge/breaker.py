"""A per-upstream circuit breaker (pure state machine, clock injected).

After `failures` consecutive failures the circuit opens and requests fail fast for
`reset_seconds`; then one trial request is let through (half-open): success closes
the circuit, failure opens it again. Failing fast keeps a dead backend from tying up
every stream's connect timeout, and gives it room to recover.

Every trial must end (issue 11.11): a trial that never reports would keep `allow()`
false for the life of the process. The caller reports each attempt as a success
(2xx), a failure (connect error, timeout, 5xx), an answer (a 4xx: the backend is up,
which ends a trial as a success but says nothing in the closed state) or abandoned
(cancelled mid-attempt: a trial counts as failed). And should a caller still forget,
a trial older than `reset_seconds` is given up and the next request is the new trial.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitBreaker:
    def __init__(
        self,
        failures: int,
        reset_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = failures
        self._reset = reset_seconds
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trial_started_at: float | None = None

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self._reset:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            return False
        now = self._clock()
        if self._trial_started_at is not None and now - self._trial_started_at < self._reset:
            return False  # one trial at a time
        self._trial_started_at = now
        return True

    def record_success(self) -> None:
        self._consecutive = 0
        self._opened_at = None
        self._trial_started_at = None

    def record_failure(self) -> None:
        self._consecutive += 1
        self._trial_started_at = None
        if self._opened_at is not None or self._consecutive >= self._threshold:
            self._opened_at = self._clock()

    def record_answer(self) -> None:
        """The backend answered with a client error (4xx): it is reachable. A trial
        ends as a success; in the closed state the failure count stays as it is."""
        if self._trial_started_at is not None:
            self.record_success()

    def record_abandoned(self) -> None:
        """An attempt ended without a verdict (cancelled): a trial counts as failed,
        so the circuit re-opens and tries again after `reset_seconds`."""
        if self._trial_started_at is not None:
            self.record_failure()


class Breakers:
    """One breaker per provider, created on first use."""

    def __init__(self, failures: int, reset_seconds: float) -> None:
        self._failures = failures
        self._reset = reset_seconds
        self._by_provider: dict[str, CircuitBreaker] = {}

    def for_provider(self, name: str) -> CircuitBreaker:
        breaker = self._by_provider.get(name)
        if breaker is None:
            breaker = self._by_provider[name] = CircuitBreaker(self._failures, self._reset)
        return breaker
