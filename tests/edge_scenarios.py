"""Scenarios driven through the in-process gateway (`tests/inproc.py`) that more than
one test file checks from its own side: what the client and the usage record see
(test_edge_lifecycle.py), what the edge's metrics count (test_edge_metrics_agree.py).
Each drives the scenario to its end and leaves every assertion to the test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from stream_edge.memory_transport import Faults
from tests.inproc import MOCK, Gateway, eventually
from tests.token_claims import jti_of

# 600 tokens 20 ms apart: a whole answer still running seconds after it began.
LONG_ANSWER = [{"role": "user", "content": "whole [[mock tokens=600 delay_ms=20]]"}]


async def revoke_a_whole_answer_midway(gw: Gateway, grant: dict[str, Any]) -> tuple[int, Any]:
    """Ask for `LONG_ANSWER` whole (`stream: false`) with the grant's stream token,
    revoke the token once the backend is answering, and return what the client got
    (its status and JSON), within a bound."""
    stats = gw.stats
    active = stats.active
    body = {"model": "mock-fast", "messages": LONG_ANSWER, "stream": False}
    answer = asyncio.create_task(gw.complete(grant["stream_token"], body))
    await eventually(lambda: stats.active > active, "the whole answer under way")
    revoked = await gw.admin(
        "POST", "/v1/admin/revocations", json={"jti": jti_of(grant["stream_token"])}
    )
    assert revoked.status_code == 201, revoked.text
    async with asyncio.timeout(6):  # a bound: the watcher passes every second
        return await answer


@contextlib.asynccontextmanager
async def backend_headers_stalled(gw: Gateway, requests: int = 1) -> AsyncIterator[Faults]:
    """The mock's next `requests` answers do not start (no headers) until released;
    on exit every stall the edge may still wait on is let go."""
    faults = gw.backends.faults_for(MOCK)
    faults.stalled.clear()
    faults.stall_headers = requests
    try:
        yield faults
    finally:
        faults.stall_headers = 0
        faults.release.set()
        await asyncio.sleep(0)
        faults.release.clear()


async def ask_until_the_backend_stalls(
    gw: Gateway, faults: Faults, grant: dict[str, Any], body: dict[str, Any]
) -> asyncio.Task[Any]:
    """POST `body` to `/v1/chat/completions` with the grant's stream token and wait
    until the backend holds its answer's headers: the client's request, still waiting."""
    headers = {"Authorization": f"Bearer {grant['stream_token']}"}
    client = asyncio.create_task(gw.post("/v1/chat/completions", orjson.dumps(body), headers))
    await faults.stalled.wait()
    return client


async def leave(client: asyncio.Task[Any]) -> None:
    """The client gives up waiting: its connection closes."""
    client.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await client


def slow_report_store(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Event, asyncio.Event]:
    """Edge "edge"'s usage reports wait on the way to the store (a store answering
    slowly at the shutdown): the first event is set when one reaches it, and it goes
    on once the second is set."""
    state = gw.edge_state()
    reached, go_on = asyncio.Event(), asyncio.Event()
    enqueue = state.outbox.enqueue

    async def slow_enqueue(*args: Any, **kwargs: Any) -> None:
        reached.set()
        await go_on.wait()
        await enqueue(*args, **kwargs)

    monkeypatch.setattr(state.outbox, "enqueue", slow_enqueue)
    return reached, go_on


async def cancel_as_the_server(
    gw: Gateway, asking: asyncio.Task[Any], go_on: asyncio.Event
) -> None:
    """Cancel the one request the edges are running, as the server does when its
    graceful time is over (uvicorn's `task.cancel()`), let a held report go on, and
    wait (bounded) for the client's side to end, however it ends."""
    (request,) = [e for e in gw.clients._open if not e.task.done()]
    request.task.cancel()
    await asyncio.sleep(0)
    go_on.set()
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(asking, 5)
