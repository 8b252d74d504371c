"""The circuit breaker never sticks (issue 11.11): every half-open trial ends in a
success or a failure, whatever the backend answers and even when the stream is
cancelled mid-trial; otherwise `allow()` stays false for the life of the process
and one provider fails fast forever. Injected clock, fake transport: no sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared.retry import Backoff
from stream_edge.breaker import MAX_OWN_BREAKERS, Breakers, CircuitBreaker
from stream_edge.errors import EdgeError
from stream_edge.http1_connection import Headers
from stream_edge.upstream.base import HttpRequest
from stream_edge.upstream_client import RetryPolicy, open_stream

RESET = 30.0
REQUEST = HttpRequest(url="http://backend.invalid/v1/chat", headers={}, body=b"{}")
NO_RETRIES = RetryPolicy(retries=0, backoff=Backoff(base=0.0, cap=0.0))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeResponse:
    """Headers in, body canned (no connection behind it)."""

    def __init__(self, status: int) -> None:
        self.status_code = status
        self.headers = Headers([])

    async def aread(self) -> bytes:
        return b'{"error": {"message": "no"}}'

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        yield await self.aread()

    async def aclose(self) -> None:
        return None


class FakeClient:
    """Answers each send with the next status; ``"hang"`` never answers."""

    def __init__(self, *answers: int | str) -> None:
        self.answers = list(answers)
        self.sent = 0
        self.waiting = asyncio.Event()

    async def send(
        self, method: str, url: str, headers: Any, body: bytes, company: str | None = None
    ) -> FakeResponse:
        self.sent += 1
        answer = self.answers.pop(0)
        if answer == "hang":
            self.waiting.set()
            await asyncio.Event().wait()
        assert isinstance(answer, int)
        return FakeResponse(answer)


def open_breaker(clock: Clock) -> CircuitBreaker:
    breaker = CircuitBreaker(failures=2, reset_seconds=RESET, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.now += RESET
    assert breaker.state == "half_open"
    return breaker


async def _open(client: FakeClient, breaker: CircuitBreaker) -> Any:
    return await open_stream(client, REQUEST, breaker=breaker, policy=NO_RETRIES)  # type: ignore[arg-type]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 429])
async def test_a_trial_answered_with_a_4xx_ends_the_trial(status: int) -> None:
    """The backend answered: it is up, so the trial closes the circuit."""
    clock = Clock()
    breaker = open_breaker(clock)
    with pytest.raises(EdgeError):
        await _open(FakeClient(status), breaker)
    assert breaker.state == "closed"
    assert breaker.allow()


async def test_a_cancelled_trial_counts_as_failed_and_a_new_trial_follows() -> None:
    clock = Clock()
    breaker = open_breaker(clock)
    client = FakeClient("hang")
    task = asyncio.create_task(_open(client, breaker))
    await client.waiting.wait()
    assert not breaker.allow()  # one trial at a time
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state == "open"  # the trial failed: wait again, then retry
    clock.now += RESET
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed"


async def test_a_trial_answered_with_a_5xx_reopens_and_a_2xx_closes() -> None:
    clock = Clock()
    breaker = open_breaker(clock)
    with pytest.raises(EdgeError):
        await _open(FakeClient(503), breaker)
    assert breaker.state == "open" and not breaker.allow()
    clock.now += RESET
    response = await _open(FakeClient(200), breaker)
    assert response.status_code == 200 and breaker.state == "closed"


async def test_a_4xx_in_the_closed_state_does_not_reset_the_failure_count() -> None:
    """A client error says nothing about the backend's health."""
    clock = Clock()
    breaker = CircuitBreaker(failures=2, reset_seconds=RESET, clock=clock)
    with pytest.raises(EdgeError):
        await _open(FakeClient(500), breaker)
    with pytest.raises(EdgeError):
        await _open(FakeClient(401), breaker)
    with pytest.raises(EdgeError):
        await _open(FakeClient(500), breaker)
    assert breaker.state == "open"


def test_a_trial_that_never_reports_is_given_up_after_the_reset_time() -> None:
    """Belt and braces: even a trial whose caller forgot to report cannot wedge the
    breaker for longer than one reset period."""
    clock = Clock()
    breaker = open_breaker(clock)
    assert breaker.allow()  # the trial starts, and its outcome is never recorded
    clock.now += RESET - 1
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()


def test_a_dead_backend_failing_two_companies_opens_for_every_company() -> None:
    """The shared circuit still fails fast for everyone once the failures are not one
    company's alone, and a company failing alone opens only its own."""
    clock = Clock()
    breakers = Breakers(failures=3, reset_seconds=RESET, clock=clock)
    a, b, c = (breakers.for_call("p", co) for co in ("a", "b", "c"))
    for _ in range(3):
        assert a.allow()
        a.record_failure()
    assert not a.allow() and b.allow() and c.allow()  # a's failures stay a's
    b.record_failure()
    assert not b.allow() and not c.allow()  # two companies: the backend is down
    assert breakers.for_provider("p").state == "open"


def test_a_companys_success_forgets_its_own_circuit() -> None:
    """Only companies failing right now hold an own breaker in memory."""
    breakers = Breakers(failures=3, reset_seconds=RESET)
    call = breakers.for_call("p", "a")
    call.record_failure()
    assert breakers.own("p", "a") is not None
    call.record_success()
    assert breakers.own("p", "a") is None


def test_a_trial_is_not_started_for_a_request_the_other_circuit_refuses() -> None:
    """The shared circuit half-open while the company's own is open: the request is
    refused without taking the shared trial, which another company then gets."""
    clock = Clock()
    breakers = Breakers(failures=1, reset_seconds=RESET, clock=clock)
    shared = breakers.for_provider("p")
    for co in ("a", "b"):
        breakers.for_call("p", co).record_failure()
    assert shared.state == "open"
    clock.now += RESET / 2
    own = breakers.own("p", "a")
    assert own is not None
    own.record_failure()  # a's own circuit opened again, later than the shared one
    clock.now += RESET / 2
    assert shared.state == "half_open" and own.state == "open"
    assert not breakers.for_call("p", "a").allow()
    assert shared.would_allow() and not shared.in_trial
    assert breakers.for_call("p", "c").allow() and shared.in_trial


async def _one_call(breakers: Breakers, company: str, status: int) -> None:
    """One request of `company` to provider "p", answered `status`."""
    call = breakers.for_call("p", company)
    if status < 400:
        await _open(FakeClient(status), call)  # type: ignore[arg-type]
        return
    with pytest.raises(EdgeError):
        await _open(FakeClient(status), call)  # type: ignore[arg-type]


async def test_companies_that_failed_once_and_left_do_not_pile_up_own_breakers() -> None:
    """Review soak: each company's request that fails at a backend healthy for the
    others (an input a vendor answers 500 to: free, nothing billed) left the company's
    own breaker in memory until its next success, which a company that never calls
    that provider again never sends: one per company ever failing, for as long as the
    edge runs (measured: 30,000 such companies, 30,001 breakers kept). Now bounded,
    and a company whose own circuit is open keeps it while closed ones make room."""
    breakers = Breakers(failures=3, reset_seconds=RESET, clock=Clock())
    for _ in range(3):
        await _one_call(breakers, "stuck", 500)
        await _one_call(breakers, "ok", 200)  # the backend serves the others
    assert not breakers.for_call("p", "stuck").allow()  # its own circuit is open
    for n in range(30_000):
        await _one_call(breakers, f"co-{n}", 500)
        await _one_call(breakers, "ok", 200)
    assert len(breakers) <= MAX_OWN_BREAKERS
    assert not breakers.for_call("p", "stuck").allow()  # an open circuit is kept
    assert breakers.for_provider("p").state == "closed"
