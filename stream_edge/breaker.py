"""A per-upstream circuit breaker (pure state machine, clock injected).

After `failures` consecutive failures the circuit opens and requests fail fast for
`reset_seconds`; then one trial request is let through (half-open): success closes
the circuit, failure opens it again. Failing fast keeps a dead backend from tying up
every stream's connect timeout, and gives it room to recover.
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
        self._trial_in_flight = False

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
        if state == "half_open" and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self._consecutive = 0
        self._opened_at = None
        self._trial_in_flight = False

    def record_failure(self) -> None:
        self._consecutive += 1
        self._trial_in_flight = False
        if self._opened_at is not None or self._consecutive >= self._threshold:
            self._opened_at = self._clock()


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
