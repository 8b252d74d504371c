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

A provider's backend is shared by every company, and a company chooses what it sends:
a prompt that crashes an in-house backend, an input a vendor answers 500 to, each free
(a stream failing before its first token bills nothing). So one company's failures
never open the provider's circuit for the others (`Breakers.for_call`): they open the
company's own circuit, and the provider's opens only on a run of failures from at
least two companies (`companies_to_open`), as a dead backend gives.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

# Own breakers kept at most: one per (provider, company) whose last request failed.
# A company that fails once and never calls that provider again sends no success
# to drop its breaker, so without a bound the map grew by one such company after
# another for as long as the edge ran (review soak: 30,000 companies, 30,000 kept).
MAX_OWN_BREAKERS = 10_000


class CircuitBreaker:
    def __init__(
        self,
        failures: int,
        reset_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        companies_to_open: int = 1,
    ) -> None:
        self._threshold = failures
        self._reset = reset_seconds
        self._clock = clock
        self._companies_to_open = companies_to_open
        self._consecutive = 0
        # The companies whose failures make the current run (at most as many as it
        # takes to open): one company alone never opens a shared circuit.
        self._run_companies: set[str] = set()
        self._opened_at: float | None = None
        self._trial_started_at: float | None = None

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self._reset:
            return "half_open"
        return "open"

    def would_allow(self) -> bool:
        """What `allow` would answer, without starting a trial."""
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            return False
        started = self._trial_started_at
        return started is None or self._clock() - started >= self._reset  # one at a time

    def allow(self) -> bool:
        if not self.would_allow():
            return False
        if self._opened_at is not None:
            self._trial_started_at = self._clock()  # half-open: this request is the trial
        return True

    def record_success(self) -> None:
        self._consecutive = 0
        self._run_companies.clear()
        self._opened_at = None
        self._trial_started_at = None

    def record_failure(self, company: str | None = None) -> None:
        self._consecutive += 1
        self._trial_started_at = None
        if company is not None and len(self._run_companies) < self._companies_to_open:
            self._run_companies.add(company)
        if self._opened_at is not None:
            self._opened_at = self._clock()  # a trial failed: open again
        elif (
            self._consecutive >= self._threshold
            and max(len(self._run_companies), 1) >= self._companies_to_open
        ):
            self._opened_at = self._clock()

    @property
    def in_trial(self) -> bool:
        return self._trial_started_at is not None

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


class Breaker(Protocol):
    """What the upstream client reports an attempt's outcome to."""

    def allow(self) -> bool: ...
    def record_success(self) -> None: ...
    def record_failure(self) -> None: ...
    def record_answer(self) -> None: ...
    def record_abandoned(self) -> None: ...


class Breakers:
    """Per provider, one shared breaker that only failures of two companies or more
    open, and per company a breaker of its own, created at its first failure and
    dropped at its next success (so only companies failing right now take memory)."""

    def __init__(
        self,
        failures: int,
        reset_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_own: int = MAX_OWN_BREAKERS,
    ) -> None:
        self._failures = failures
        self._reset = reset_seconds
        self._clock = clock
        self._max_own = max_own
        self._by_provider: dict[str, CircuitBreaker] = {}
        self._own: dict[tuple[str, str], CircuitBreaker] = {}

    def for_provider(self, name: str) -> CircuitBreaker:
        breaker = self._by_provider.get(name)
        if breaker is None:
            breaker = self._by_provider[name] = CircuitBreaker(
                self._failures, self._reset, self._clock, companies_to_open=2
            )
        return breaker

    def for_call(self, provider: str, company_id: str) -> CompanyBreaker:
        """The breaker one company's request to `provider` goes through."""
        return CompanyBreaker(self, provider, company_id)

    def own(self, provider: str, company_id: str, *, create: bool = False) -> CircuitBreaker | None:
        key = (provider, company_id)
        breaker = self._own.get(key)
        if breaker is None and create:
            if len(self._own) >= self._max_own:
                self._make_room()
            breaker = self._own[key] = CircuitBreaker(self._failures, self._reset, self._clock)
        return breaker

    def _make_room(self) -> None:
        """Down to half the bound (so this runs once per `max_own / 2` new breakers):
        first every circuit not open (a run of failures under the threshold, or one
        whose wait is over: each lets requests through as a fresh breaker would),
        then, only if open circuits alone are more than that, the oldest of them."""
        keep = self._max_own // 2
        self._own = {key: b for key, b in self._own.items() if b.state == "open"}
        for key in list(self._own)[: max(0, len(self._own) - keep)]:
            del self._own[key]

    def __len__(self) -> int:
        """Own breakers held now."""
        return len(self._own)

    def forget_own(self, provider: str, company_id: str) -> None:
        self._own.pop((provider, company_id), None)


class CompanyBreaker:
    """The provider's shared circuit and the company's own: a request goes through
    when both let it; each outcome goes to both, the shared one told whose it was."""

    def __init__(self, breakers: Breakers, provider: str, company_id: str) -> None:
        self._breakers = breakers
        self._provider = provider
        self._company = company_id
        self._shared = breakers.for_provider(provider)

    def _own(self, create: bool = False) -> CircuitBreaker | None:
        return self._breakers.own(self._provider, self._company, create=create)

    def allow(self) -> bool:
        own = self._own()
        # Ask both before either starts a trial: a trial started for a request the
        # other then refuses would never report, and hold its circuit a reset period.
        if not self._shared.would_allow() or (own is not None and not own.would_allow()):
            return False
        self._shared.allow()
        if own is not None:
            own.allow()
        return True

    def record_success(self) -> None:
        self._shared.record_success()
        self._breakers.forget_own(self._provider, self._company)  # pristine again

    def record_failure(self) -> None:
        self._shared.record_failure(self._company)
        own = self._own(create=True)
        assert own is not None
        own.record_failure()

    def record_answer(self) -> None:
        self._shared.record_answer()
        own = self._own()
        if own is not None and own.in_trial:
            self._breakers.forget_own(self._provider, self._company)  # the trial succeeded

    def record_abandoned(self) -> None:
        self._shared.record_abandoned()
        own = self._own()
        if own is not None:
            own.record_abandoned()
