"""The edge under what networks and backends do: clients leaving, backends dropping,
stalling and failing, idle pings, shared limits and resuming across two edge
processes (PostgreSQL + Redis, real sockets)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from shared.sse import ServerSentEvent, SSEDecoder
from tests.conftest import REDIS_URL
from tests.stack import SplitStack, base_env

FAST = {
    "LLMGW_WEBHOOK_RETRY_BASE_SECONDS": "0.05",
    "LLMGW_WEBHOOK_RETRY_CAP_SECONDS": "0.5",
    "LLMGW_PING_INTERVAL_SECONDS": "0.2",
    "LLMGW_FIRST_TOKEN_TIMEOUT_SECONDS": "1",
    "LLMGW_IDLE_TIMEOUT_SECONDS": "1",
    "LLMGW_RESUME_GRACE_SECONDS": "2",
    "LLMGW_BREAKER_FAILURES": "3",
    "LLMGW_BREAKER_RESET_SECONDS": "60",
    "LLMGW_UPSTREAM_RETRIES": "0",
}


@pytest.fixture(scope="module")
def split(pg_server: str) -> Iterator[SplitStack]:
    from tests.conftest import fresh_pg_database, fresh_redis_prefix

    with fresh_pg_database(pg_server) as url, fresh_redis_prefix() as prefix:
        with SplitStack({**base_env(url, REDIS_URL, prefix), **FAST}) as stack:
            yield stack


def events_of(response: httpx.Response, stop_after: int | None = None) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for raw in response.iter_raw():
        events.extend(decoder.feed(raw))
        if stop_after is not None and len(events) >= stop_after:
            break
    return events


def data(event: ServerSentEvent) -> Any:
    return json.loads(event.data)


def user(split: SplitStack, credits: str = "5") -> str:
    return split.client.new_user(split.client.new_company(credits))


def test_client_disconnect_cancels_the_backend_within_a_second(split: SplitStack) -> None:
    c = split.client
    token = user(split)
    messages = [{"role": "user", "content": "long one [[mock tokens=300 delay_ms=20]]"}]
    grant = c.init_ok(token, {"messages": messages})
    cancelled_before = c.mock_stats()["cancelled"]
    body = {"model": "mock-fast", "messages": messages, "stream": True}
    headers = {"Authorization": f"Bearer {grant['stream_token']}"}
    with httpx.stream("POST", f"{c.edge_url}/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200
        got = [e for e in events_of(r, stop_after=10) if e.data != "[DONE]"]
    left_at = time.monotonic()
    while c.mock_stats()["cancelled"] == cancelled_before:
        assert time.monotonic() - left_at < 1.0, "the backend still streams after 1 s"
        time.sleep(0.02)
    record = c.wait_usage(token, grant["reservation_id"])
    assert record["status"] == "cancelled"
    assert record["usage_source"] == "estimated"
    assert len(got) - 1 <= record["output_tokens"] < 300  # the role chunk carries no token


def test_idle_streams_get_ping_comments(split: SplitStack) -> None:
    c = split.client
    token = user(split)
    grant = c.init_ok(token, {"query": "slow start [[mock tokens=2 first_ms=700]]"})
    with httpx.stream("GET", grant["stream_url"]) as r:
        raw = r.read()
    assert raw.startswith(b"retry: 1000\n\n: ping\n\n")
    assert b"event: complete" in raw


@pytest.mark.parametrize(
    ("directive", "code", "billed_output"),
    [
        ("[[mock tokens=20 drop_after=5]]", "upstream_error", 5),  # connection dropped
        ("[[mock tokens=3 first_ms=3000]]", "upstream_timeout", 0),  # no first token
        ("[[mock tokens=3 delay_ms=2500]]", "upstream_timeout", 1),  # stalls after one
    ],
    ids=["drop", "first-token-stall", "idle-stall"],
)
def test_backend_failures_end_with_an_error_event_and_a_failed_report(
    split: SplitStack, directive: str, code: str, billed_output: int
) -> None:
    c = split.client
    token = user(split)
    grant = c.init_ok(token, {"query": f"trouble {directive}"})
    with httpx.stream("GET", grant["stream_url"], timeout=10) as r:
        events = events_of(r)
    assert events[-1].event == "error"
    assert data(events[-1])["code"] == code
    assert len([e for e in events if e.event == "chunk"]) == billed_output
    record = c.wait_usage(token, grant["reservation_id"])
    assert (record["status"], record["output_tokens"]) == ("failed", billed_output)
    if billed_output == 0:
        assert record["cost"] == "0.000000"  # nothing generated, nothing billed


def test_backend_errors_before_streaming_are_openai_shaped_and_release_the_hold(
    split: SplitStack,
) -> None:
    c = split.client
    token = user(split)
    for directive, status, code in (
        ("[[mock fail=500]]", 502, "upstream_error"),
        ("[[mock fail=401]]", 502, "upstream_auth"),
    ):
        grant = c.init_ok(token, {"query": f"x {directive}"})
        response = c.http.get(grant["stream_url"])
        assert response.status_code == status
        assert response.json()["error"]["code"] == code
        assert "mock" not in response.text.lower()  # no vendor body leaks
        record = c.wait_usage(token, grant["reservation_id"])
        assert record["status"] == "failed" and record["cost"] == "0.000000"
    assert c.credits(token)["held"] == "0.000000"


def test_circuit_breaker_fails_fast_after_repeated_backend_failures(split: SplitStack) -> None:
    c = split.client
    token = user(split)
    split.stop("edge")
    split.start("edge")  # a fresh breaker
    try:
        for _ in range(3):
            grant = c.init_ok(token, {"query": "down [[mock fail=503]]"})
            assert c.http.get(grant["stream_url"]).status_code == 502
        before = c.mock_stats()["requests"]
        grant = c.init_ok(token, {"query": "healthy again [[mock tokens=2]]"})
        response = c.http.get(grant["stream_url"])
        assert response.status_code == 502  # failed fast: the circuit is open
        assert c.mock_stats()["requests"] == before
    finally:
        split.stop("edge")
        split.start("edge")


def test_stream_limits_hold_across_two_edges(split: SplitStack) -> None:
    c = split.client
    token = user(split)
    split.stop("edge")
    split.start("edge", LLMGW_MAX_STREAMS_PER_USER="2")
    split.start("edge2", LLMGW_MAX_STREAMS_PER_USER="2")
    try:
        slow = [
            c.init_ok(token, {"query": f"s{i} [[mock tokens=10 delay_ms=100]]"}) for i in range(2)
        ]
        extra = c.init_ok(token, {"query": "third [[mock tokens=2]]"})
        with (
            httpx.stream("GET", slow[0]["stream_url"]) as a,
            httpx.stream("GET", slow[1]["stream_url"].replace(c.edge_url, split.url("edge2"))) as b,
        ):
            assert a.status_code == b.status_code == 200
            third = c.http.get(extra["stream_url"].replace(c.edge_url, split.url("edge2")))
            assert third.status_code == 429
            assert third.headers["retry-after"] == "1"
            assert third.json()["error"]["code"] == "too_many_streams"
            events_of(a), events_of(b)
        # Slots are released when streams end; the same (unburned) token now works.
        again = c.http.get(extra["stream_url"])
        assert again.status_code == 200 and b"event: complete" in again.content
    finally:
        split.stop("edge2")
        split.stop("edge")
        split.start("edge")


def test_a_dropped_eventsource_resumes_on_the_other_edge_without_losing_tokens(
    split: SplitStack,
) -> None:
    c = split.client
    token = user(split)
    split.start("edge2")
    try:
        grant = c.init_ok(token, {"query": "resume me [[mock tokens=40 delay_ms=15]]"})
        with httpx.stream("GET", grant["stream_url"]) as first:
            head = events_of(first, stop_after=8)
        last_id = head[-1].id
        assert last_id == "8"
        other = grant["stream_url"].replace(c.edge_url, split.url("edge2"))
        with httpx.stream("GET", other, headers={"Last-Event-ID": last_id}) as second:
            assert second.status_code == 200
            tail = events_of(second)
        ids = [int(e.id or 0) for e in head + tail]
        assert ids == list(range(1, 42))  # 40 chunks + complete, none lost or repeated
        assert tail[-1].event == "complete"
        text = "".join(data(e)["content"] for e in head + tail if e.event == "chunk")
        assert len(text.split()) == 40
        # The stream ended: a further reconnect gets 204 and EventSource stops.
        done = c.http.get(other, headers={"Last-Event-ID": "41"})
        assert done.status_code == 204
        record = c.wait_usage(token, grant["reservation_id"])
        assert (record["status"], record["output_tokens"]) == ("completed", 40)
    finally:
        split.stop("edge2")


def test_no_reconnect_within_the_grace_cancels_and_bills_what_was_generated(
    split: SplitStack,
) -> None:
    c = split.client
    token = user(split)
    cancelled_before = c.mock_stats()["cancelled"]
    grant = c.init_ok(token, {"query": "abandon [[mock tokens=400 delay_ms=20]]"})
    with httpx.stream("GET", grant["stream_url"]) as r:
        events_of(r, stop_after=3)
    time.sleep(1.0)
    assert c.mock_stats()["cancelled"] == cancelled_before  # still going: within grace
    record = c.wait_usage(token, grant["reservation_id"], timeout=15)
    assert record["status"] == "cancelled"
    assert 3 <= record["output_tokens"] < 400
    assert c.mock_stats()["cancelled"] == cancelled_before + 1


def test_a_backend_answering_429_then_succeeding_is_retried_invisibly(
    split: SplitStack,
) -> None:
    c = split.client
    token = user(split)
    split.stop("edge")
    split.start("edge", LLMGW_UPSTREAM_RETRIES="2")
    try:
        before = c.mock_stats()["requests"]
        grant = c.init_ok(
            token, {"query": "busy [[mock tokens=4 fail=429 retry_after=1 fail_times=1]]"}
        )
        started = time.monotonic()
        with httpx.stream("GET", grant["stream_url"]) as r:
            assert r.status_code == 200
            events = events_of(r)
        assert events[-1].event == "complete"
        assert time.monotonic() - started >= 1.0  # the backend's Retry-After was honoured
        assert c.mock_stats()["requests"] == before + 2
        # A backend that keeps refusing: its 429 and Retry-After reach the client.
        grant = c.init_ok(token, {"query": "always busy [[mock fail=429 retry_after=30]]"})
        refused = c.http.get(grant["stream_url"])
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "30"
    finally:
        split.stop("edge")
        split.start("edge")


def test_a_reconnect_on_another_edge_supersedes_the_live_connection(split: SplitStack) -> None:
    c = split.client
    token = user(split)
    split.start("edge2")
    try:
        grant = c.init_ok(token, {"query": "shared url [[mock tokens=300 delay_ms=20]]"})
        started, ended = threading.Event(), threading.Event()
        first_events: list[ServerSentEvent] = []

        def read_first() -> None:
            decoder = SSEDecoder()
            with httpx.stream("GET", grant["stream_url"], timeout=30) as first:
                for raw in first.iter_raw():  # until an edge ends it
                    first_events.extend(decoder.feed(raw))
                    if any(e.event == "chunk" for e in first_events):
                        started.set()
            ended.set()

        reader = threading.Thread(target=read_first)
        reader.start()
        try:
            assert started.wait(10)
            other = grant["stream_url"].replace(c.edge_url, split.url("edge2"))
            with httpx.stream("GET", other, headers={"Last-Event-ID": "1"}, timeout=30) as second:
                assert second.status_code == 200
                for _ in second.iter_raw():
                    if ended.is_set():
                        break  # the first connection, on the other edge, was ended
            assert ended.is_set(), "two live connections to one stream"
        finally:
            reader.join(timeout=30)
        assert not any(e.event == "complete" for e in first_events)  # cut off, not finished
    finally:
        split.stop("edge2")
