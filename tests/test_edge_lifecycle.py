"""The edge under what networks and backends do, in one process (no sockets, no
sleeps): clients leaving, backends dropping, stalling and failing, idle pings,
retries, the circuit breaker, limits shared by two edges, and resuming a stream on
the other edge. The edges' backend and webhook calls go through `InMemoryTransport`
to the mock and the control plane; the real-socket versions of the behaviours that
only show on a socket stay in test_e2e_edge_lifecycle.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
import pytest_asyncio

from shared.retry import Backoff
from shared.sse import ServerSentEvent
from shared.text_tokens import pieces
from stream_edge.upstream_client import RetryPolicy
from tests import edge_scenarios as scenario
from tests.inproc import MOCK, Gateway, events, eventually, gateway_env, opened

pytestmark = pytest.mark.asyncio(loop_scope="module")

FAST = {
    "LLMGW_WEBHOOK_RETRY_BASE_SECONDS": "0.05",
    "LLMGW_WEBHOOK_RETRY_CAP_SECONDS": "0.5",
    "LLMGW_PING_INTERVAL_SECONDS": "0.1",
    "LLMGW_FIRST_TOKEN_TIMEOUT_SECONDS": "0.3",
    "LLMGW_IDLE_TIMEOUT_SECONDS": "0.3",
    "LLMGW_RESUME_GRACE_SECONDS": "2",
    "LLMGW_BREAKER_FAILURES": "3",
    "LLMGW_BREAKER_RESET_SECONDS": "60",
    "LLMGW_UPSTREAM_RETRIES": "0",
}


@pytest.fixture(autouse=True, scope="module")
def no_sockets() -> Iterator[None]:
    """Every hop is in memory here: a connect would mean a real network call slipped in."""

    def refuse(self: socket.socket, *args: object) -> None:
        raise AssertionError("a socket was connected in an in-process test")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket.socket, "connect_ex", refuse)
        yield


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    tmp = tmp_path_factory.mktemp("edge-lifecycle")
    async with Gateway(gateway_env(str(tmp), **FAST)) as gateway:
        yield gateway


def data(event: ServerSentEvent) -> Any:
    return json.loads(event.data)


async def test_client_disconnect_cancels_the_backend(gw: Gateway) -> None:
    token = await gw.new_user()
    messages = [{"role": "user", "content": "long one [[mock tokens=300 delay_ms=20]]"}]
    grant = await gw.init_ok(token, {"messages": messages})
    cancelled_before = gw.stats.cancelled
    body = orjson.dumps({"model": "mock-fast", "messages": messages, "stream": True})
    headers = {"Authorization": f"Bearer {grant['stream_token']}"}
    async with opened(await gw.post("/v1/chat/completions", body, headers)) as r:
        assert r.status_code == 200
        got = [e for e in await events(r, stop_after=10) if e.data != "[DONE]"]
    await eventually(lambda: gw.stats.cancelled > cancelled_before, "the backend cancelled")
    record = await gw.wait_usage(token, grant["reservation_id"])
    assert record["status"] == "cancelled"
    assert record["usage_source"] == "estimated"
    assert len(got) - 1 <= record["output_tokens"] < 300  # the role chunk carries no token


async def test_idle_streams_get_ping_comments(gw: Gateway) -> None:
    await gw.add_edge("pinging", LLMGW_FIRST_TOKEN_TIMEOUT_SECONDS="30")
    token = await gw.new_user()
    faults = gw.backends.faults_for(MOCK)
    faults.stall_after = 0  # the first token waits until the test has seen a ping
    try:
        grant = await gw.init_ok(token, {"query": "slow start [[mock tokens=2]]"})
        async with opened(await gw.get(grant["stream_url"], edge="pinging")) as r:
            head = b""
            async for raw in r.aiter_raw():
                head += raw
                if b": ping" in head:
                    break
            assert head.startswith(b"retry: 1000\n\n: ping\n\n")
            faults.stall_after = None
            faults.release.set()
            rest = await r.aread()
    finally:
        faults.stall_after = None
        faults.release.clear()
    assert b"event: complete" in rest


@pytest.mark.parametrize(
    ("directive", "fault", "code", "relayed"),
    [
        ("[[mock tokens=20]]", {"reset_after": 5}, "upstream_error", 4),
        ("[[mock tokens=20 drop_after=5]]", {}, "upstream_error", 5),
        ("[[mock tokens=3]]", {"stall_after": 0}, "upstream_timeout", 0),
        ("[[mock tokens=3]]", {"stall_after": 2}, "upstream_timeout", 1),
    ],
    ids=["reset", "drop", "first-token-stall", "idle-stall"],
)
async def test_backend_failures_end_with_an_error_event_and_a_failed_report(
    gw: Gateway, directive: str, fault: dict[str, int], code: str, relayed: int
) -> None:
    token = await gw.new_user()
    faults = gw.backends.faults_for(MOCK)
    for name, value in fault.items():
        setattr(faults, name, value)
    try:
        grant = await gw.init_ok(token, {"query": f"trouble {directive}"})
        async with opened(await gw.get(grant["stream_url"])) as r:
            got = await events(r)
    finally:
        faults.reset_after = faults.stall_after = None
        faults.stall_headers = 0
        faults.release.set()  # let a stalled backend go (its stream was given up)
    faults.release.clear()
    assert got[-1].event == "error"
    assert data(got[-1])["code"] == code
    texts = [data(e)["content"] for e in got if e.event == "chunk"]
    assert len(texts) == relayed
    # A token a delta, but the mock's `" word."` ending a sentence is two (a real
    # vendor streams the word and the period apart: `stream_edge.output_estimate`).
    billed_output = sum(max(1, pieces(text.encode())) for text in texts)
    record = await gw.wait_usage(token, grant["reservation_id"])
    assert (record["status"], record["output_tokens"]) == ("failed", billed_output)
    if relayed == 0:
        assert record["cost"] == "0.000000"  # nothing generated, nothing billed


async def test_backend_errors_before_streaming_are_openai_shaped_and_release_the_hold(
    gw: Gateway,
) -> None:
    token = await gw.new_user()
    for directive, status, code in (
        ("[[mock fail=500]]", 502, "upstream_error"),
        ("[[mock fail=401]]", 502, "upstream_auth"),
    ):
        grant = await gw.init_ok(token, {"query": f"x {directive}"})
        async with opened(await gw.get(grant["stream_url"])) as response:
            text = await response.aread()
        assert response.status_code == status
        assert json.loads(text)["error"]["code"] == code
        assert b"mock" not in text.lower()  # no vendor body leaks
        record = await gw.wait_usage(token, grant["reservation_id"])
        assert record["status"] == "failed" and record["cost"] == "0.000000"
    assert (await gw.credits(token))["held"] == "0.000000"


async def test_a_refused_connect_is_retried_before_the_first_byte(gw: Gateway) -> None:
    await gw.add_edge("retrying", LLMGW_UPSTREAM_RETRIES="2")
    delays = record_retry_delays(gw, "retrying")
    token = await gw.new_user()
    gw.backends.faults_for(MOCK).refuse = 2
    grant = await gw.init_ok(token, {"query": "flaky [[mock tokens=3]]"})
    async with opened(await gw.get(grant["stream_url"], edge="retrying")) as r:
        assert r.status_code == 200
        got = await events(r)
    assert got[-1].event == "complete"
    assert len(delays) == 2 and gw.backends.faults_for(MOCK).refuse == 0


async def test_circuit_breaker_fails_fast_after_repeated_backend_failures(gw: Gateway) -> None:
    await gw.add_edge("breaker")  # a fresh breaker
    token = await gw.new_user()
    for _ in range(3):
        grant = await gw.init_ok(token, {"query": "down [[mock fail=503]]"})
        async with opened(await gw.get(grant["stream_url"], edge="breaker")) as r:
            assert r.status_code == 502
    before = gw.stats.requests
    grant = await gw.init_ok(token, {"query": "healthy again [[mock tokens=2]]"})
    async with opened(await gw.get(grant["stream_url"], edge="breaker")) as r:
        assert r.status_code == 502  # failed fast: the circuit is open
    assert gw.stats.requests == before


async def test_one_companys_failing_requests_cannot_open_the_breaker_for_another(
    gw: Gateway,
) -> None:
    """A tenant whose own requests the shared backend fails on (a prompt that crashes
    an in-house backend, an input a vendor answers 500 to) sends a few of them: free,
    as a stream that fails before its first token bills nothing. The provider's one
    breaker counted them as the backend failing and opened for every company on the
    edge. Measured before the fix: the other company's healthy request was refused
    502 "the backend is failing", never sent to the backend."""
    await gw.add_edge("shared-breaker")  # a fresh breaker
    attacker = await gw.new_user()
    for _ in range(3):  # LLMGW_BREAKER_FAILURES
        grant = await gw.init_ok(attacker, {"query": "poison [[mock fail=500]]"})
        async with opened(await gw.get(grant["stream_url"], edge="shared-breaker")) as r:
            assert r.status_code == 502
        record = await gw.wait_usage(attacker, grant["reservation_id"])
        assert record["status"] == "failed" and record["cost"] == "0.000000"  # free

    victim = await gw.new_user()
    before = gw.stats.requests
    grant = await gw.init_ok(victim, {"query": "hello [[mock tokens=2]]"})
    async with opened(await gw.get(grant["stream_url"], edge="shared-breaker")) as r:
        assert r.status_code == 200
        got = await events(r)
    assert got[-1].event == "complete"
    assert gw.stats.requests == before + 1

    # The attacker's own circuit is open: its next request fails fast, unsent.
    before = gw.stats.requests
    grant = await gw.init_ok(attacker, {"query": "healthy [[mock tokens=2]]"})
    async with opened(await gw.get(grant["stream_url"], edge="shared-breaker")) as r:
        assert r.status_code == 502
    assert gw.stats.requests == before


def record_retry_delays(gw: Gateway, edge: str) -> list[float]:
    """Make `edge`'s retries record their backoff instead of sleeping it (a fake clock
    for the retry schedule); returns the list the delays go to."""
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    state = gw.edge_state(edge)
    state.retry = RetryPolicy(retries=state.retry.retries, backoff=Backoff(0.2, 2.0), sleep=sleep)
    return delays


async def test_a_backend_answering_429_then_succeeding_is_retried_invisibly(
    gw: Gateway,
) -> None:
    await gw.add_edge("patient", LLMGW_UPSTREAM_RETRIES="2")
    delays = record_retry_delays(gw, "patient")
    token = await gw.new_user()
    before = gw.stats.requests
    grant = await gw.init_ok(
        token, {"query": "busy [[mock tokens=4 fail=429 retry_after=1 fail_times=1]]"}
    )
    async with opened(await gw.get(grant["stream_url"], edge="patient")) as r:
        assert r.status_code == 200
        got = await events(r)
    assert got[-1].event == "complete"
    assert delays and delays[0] >= 1.0  # the backend's Retry-After was honoured
    assert gw.stats.requests == before + 2
    # A backend that keeps refusing: its 429 and Retry-After reach the client.
    grant = await gw.init_ok(token, {"query": "always busy [[mock fail=429 retry_after=30]]"})
    async with opened(await gw.get(grant["stream_url"], edge="patient")) as refused:
        await refused.aread()
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "30"


async def test_stream_limits_hold_across_two_edges(gw: Gateway) -> None:
    await gw.add_edge("limited", LLMGW_MAX_STREAMS_PER_USER="2")
    await gw.add_edge("limited2", LLMGW_MAX_STREAMS_PER_USER="2")
    token = await gw.new_user()
    faults = gw.backends.faults_for(MOCK)
    slow = [await gw.init_ok(token, {"query": f"s{i} [[mock tokens=10]]"}) for i in range(2)]
    extra = await gw.init_ok(token, {"query": "third [[mock tokens=2]]"})
    faults.stall_after = 1  # both streams stay open until released
    try:
        a = await gw.get(slow[0]["stream_url"], edge="limited")
        b = await gw.get(slow[1]["stream_url"], edge="limited2")
        async with opened(a), opened(b):
            assert a.status_code == b.status_code == 200
            async with opened(await gw.get(extra["stream_url"], edge="limited2")) as third:
                answer = json.loads(await third.aread())
            assert third.status_code == 429
            assert third.headers["retry-after"] == "1"
            assert answer["error"]["code"] == "too_many_streams"
            faults.stall_after = None
            faults.release.set()
            await events(a), await events(b)
    finally:
        faults.stall_after = None
        faults.release.clear()
    # Slots are released when streams end; the same (unburned) token now works.
    async with opened(await gw.get(extra["stream_url"], edge="limited")) as again:
        assert again.status_code == 200 and b"event: complete" in await again.aread()


async def test_a_dropped_eventsource_resumes_on_the_other_edge_without_losing_tokens(
    gw: Gateway,
) -> None:
    await gw.add_edge("edge2")
    token = await gw.new_user()
    grant = await gw.init_ok(token, {"query": "resume me [[mock tokens=40 delay_ms=5]]"})
    async with opened(await gw.get(grant["stream_url"])) as first:
        head = await events(first, stop_after=8)
    last_id = head[-1].id
    assert last_id == "8"
    second = await gw.get(grant["stream_url"], {"Last-Event-ID": "8"}, edge="edge2")
    async with opened(second):
        assert second.status_code == 200
        tail = await events(second)
    ids = [int(e.id or 0) for e in head + tail]
    assert ids == list(range(1, 42))  # 40 chunks + complete, none lost or repeated
    assert tail[-1].event == "complete"
    text = "".join(data(e)["content"] for e in head + tail if e.event == "chunk")
    assert len(text.split()) == 40
    # The stream ended: a further reconnect gets 204 and EventSource stops.
    done = await gw.get(grant["stream_url"], {"Last-Event-ID": "41"}, edge="edge2")
    async with opened(done):
        assert done.status_code == 204
    record = await gw.wait_usage(token, grant["reservation_id"])
    assert (record["status"], record["output_tokens"]) == ("completed", 40)


async def test_a_reconnect_on_another_edge_supersedes_the_live_connection(gw: Gateway) -> None:
    patient = {"LLMGW_IDLE_TIMEOUT_SECONDS": "30", "LLMGW_FIRST_TOKEN_TIMEOUT_SECONDS": "30"}
    await gw.add_edge("one", **patient)
    await gw.add_edge("other", **patient)
    token = await gw.new_user()
    faults = gw.backends.faults_for(MOCK)
    grant = await gw.init_ok(token, {"query": "shared url [[mock tokens=30]]"})
    faults.stall_after = 2  # the stream stays live (one token out) until released
    try:
        async with opened(await gw.get(grant["stream_url"], edge="one")) as first:
            first_events = await events(first, stop_after=1)
            assert first_events[-1].event == "chunk"
            second = await gw.get(grant["stream_url"], {"Last-Event-ID": "1"}, edge="other")
            async with opened(second):
                assert second.status_code == 200
                rest_of_first = await events(first)  # ends: the other edge took over
                faults.stall_after = None
                faults.release.set()
                tail = await events(second)
        assert not any(e.event == "complete" for e in first_events + rest_of_first)
        assert tail[-1].event == "complete"
    finally:
        faults.stall_after = None
        faults.release.clear()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole-answer"])
async def test_a_client_leaving_while_the_backend_opens_stops_the_opening(
    gw: Gateway, stream: bool
) -> None:
    """The client of `POST /v1/chat/completions` leaves before the backend has
    answered its headers (a vendor queueing the request, retries, a fallback chain
    waiting for a first token). DESIGN §9: its upstream is cancelled within 1 s. A
    whole answer (`stream: false`) watched for the disconnect while it opened; a
    streamed one did not. Measured before the fix (`stream: true`): the edge waited
    on the backend until LLMGW_UPSTREAM_READ_TIMEOUT (120 s), the stream's slot and
    hold held all along, then sent the request the client had left (the backend
    generated the whole answer: 40 tokens for nobody, the client's two slots used)."""
    token = await gw.new_user()
    messages = [{"role": "user", "content": "left early [[mock tokens=40]]"}]
    grant = await gw.init_ok(token, {"messages": messages})
    body = {"model": "mock-fast", "messages": messages, "stream": stream}
    requests_before = gw.stats.requests
    async with scenario.backend_headers_stalled(gw) as faults:
        await scenario.leave(await scenario.ask_until_the_backend_stalls(gw, faults, grant, body))
        record = await gw.wait_usage(token, grant["reservation_id"], within=5)
    assert record["status"] == "cancelled"
    assert record["output_tokens"] == 0
    assert gw.stats.requests == requests_before  # the answer was never asked for
    assert (await gw.credits(token))["held"] == "0.000000"


async def test_a_revocation_ends_a_whole_answer_in_progress(gw: Gateway) -> None:
    """A whole answer (`stream: false`) is read in its request, not served as a
    running stream, so the revocation watcher never saw it: a token, user or company
    revoked (a leaked key, a member let go) still got its answer to the end.
    Measured before the fix: revoked 0.5 s into a 12 s answer, the answer ran its
    12 s, 200 with all 600 tokens, reported and billed `completed`; a streamed one
    ends within a second, `revoked`."""
    token = await gw.new_user()
    grant = await gw.init_ok(token, {"messages": scenario.LONG_ANSWER})
    stats = gw.stats
    cancelled = stats.cancelled
    status, error = await scenario.revoke_a_whole_answer_midway(gw, grant)
    assert (status, error["error"]["code"]) == (401, "revoked")
    await eventually(lambda: stats.cancelled == cancelled + 1, "the backend's answer cancelled")
    record = await gw.wait_usage(token, grant["reservation_id"])
    assert record["status"] == "revoked"
    # Asked of the backend as a stream: what was read of it before the revocation.
    assert 0 < record["output_tokens"] < 600


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole-answer"])
async def test_opening_the_backend_cannot_outlive_the_maximum_stream_life(
    gw: Gateway, stream: bool
) -> None:
    """The stream's slots expire `LLMGW_MAX_STREAM_SECONDS` after its admission and its
    hold's deadline assumes no stream outlives that; the relay and a whole answer's
    read were bounded by what was left of it, but opening the backend was not: a
    backend slow to answer its headers (a vendor's JSON answer comes only once it is
    generated; `LLMGW_UPSTREAM_READ_TIMEOUT` is allowed an hour) held the request past
    its life, its slots expired under it. Measured before the fix, with a life of
    0.5 s: still waiting on the backend's headers at the test's 5 s bound (it waits
    for the read timeout, 120 s); headers released 1 s in, a whole answer was then
    served and billed `completed` at twice its life."""
    app = await gw.add_edge("short-lived")
    state = gw.edge_state("short-lived")
    state.settings = dataclasses.replace(state.settings, max_stream_seconds=0.5)
    token = await gw.new_user()
    messages = [{"role": "user", "content": "slow to answer [[mock tokens=5]]"}]
    grant = await gw.init_ok(token, {"messages": messages})
    body = {"model": "mock-fast", "messages": messages, "stream": stream}
    async with scenario.backend_headers_stalled(gw), asyncio.timeout(5):  # the life is 0.5 s
        status, error = await gw.complete(grant["stream_token"], body, edge="short-lived")
    assert (status, error["error"]["code"]) == (504, "upstream_timeout")
    record = await gw.wait_usage(token, grant["reservation_id"])
    assert (record["status"], record["cost"]) == ("failed", "0.000000")
    assert app.state.edge.reports_owed == 0


async def test_a_report_cut_by_the_servers_cancellation_is_still_stored(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server cancels the requests still running when its graceful time is over
    (uvicorn's `task.cancel()`, which anyio's shields do not stop). One whose usage
    report was on its way to the store lost it: the report is made once (`Reporter`
    marks it made before it is stored), so nothing made it again, nothing spooled it,
    and the edge's shutdown, counting it as no longer owed, did not wait for it.
    Measured before the fix: a whole answer of 40 tokens generated, its report never
    stored (its hold, with no checkpoint, released unbilled at its deadline)."""
    state = gw.edge_state()
    reached, go_on = scenario.slow_report_store(gw, monkeypatch)
    token = await gw.new_user()
    messages = [{"role": "user", "content": "reported [[mock tokens=40]]"}]
    grant = await gw.init_ok(token, {"messages": messages})
    body = {"model": "mock-fast", "messages": messages, "stream": False}
    asking = asyncio.create_task(gw.complete(grant["stream_token"], body))
    await reached.wait()
    await scenario.cancel_as_the_server(gw, asking, go_on)
    monkeypatch.undo()
    record = await gw.wait_usage(token, grant["reservation_id"], within=5)
    assert (record["status"], record["output_tokens"]) == ("completed", 40)
    assert state.reports_owed == 0
