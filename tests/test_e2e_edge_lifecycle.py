"""The edge on real sockets and real services (PostgreSQL + Redis): a client leaving
cancels the backend, limits and resuming hold across two edges sharing Redis, and a
stream nobody reconnects to is cancelled after the grace. The rest of the edge's
lifecycle (backend failures, stalls, pings, retries, the breaker, superseding) runs
in-process in test_edge_lifecycle.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
import redis

from shared.sse import ServerSentEvent, SSEDecoder
from shared.stash import stash_key
from tests.conftest import REDIS_URL
from tests.stack import SplitStack, postgres_env

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
    with postgres_env(pg_server) as env, SplitStack({**env, **FAST}) as stack:
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
    record = c.wait_usage(token, grant["reservation_id"], timeout=15)
    assert record["status"] == "cancelled"
    # The backend went on after the client left (within the 2 s grace, at 20 ms a
    # token): far more was generated, and billed, than the 3 events read. Cut at the
    # disconnect, it would be 3 or 4.
    assert 20 <= record["output_tokens"] < 400
    assert c.mock_stats()["cancelled"] == cancelled_before + 1


def test_a_started_streams_stashed_request_leaves_the_store(split: SplitStack) -> None:
    """The request init stashes (`req:<jti>`, up to `LLMGW_MAX_REQUEST_BYTES`) is read
    only at the token's first use. It stayed for the token's life plus 10 minutes, so
    the pending-init cap bounded only the stashes of streams not yet started: a member
    starting each stream at once kept every request it sent (the init rate times 12
    minutes, some 1,400 of up to 2 MiB at the defaults). Measured: the stash of each
    finished stream, both paths, still there with ~720 s to live."""
    c = split.client
    company_id = c.new_company("5")
    token = c.new_user(company_id)
    store = redis.Redis.from_url(REDIS_URL)
    prefix = split.env["LLMGW_REDIS_PREFIX"]
    try:
        for path in ("stream", "completions"):
            messages = [{"role": "user", "content": f"{path} [[mock tokens=3]]"}]
            grant = c.init_ok(token, {"messages": messages})
            jti = jwt.decode(grant["stream_token"], options={"verify_signature": False})["jti"]
            stashed = prefix + stash_key(company_id, jti)
            assert store.exists(stashed)
            if path == "stream":
                with c.http.stream("GET", grant["stream_url"]) as response:
                    assert events_of(response)[-1].event == "complete"
            else:
                answer = c.http.post(
                    f"{c.edge_url}/v1/chat/completions",
                    headers={"authorization": f"Bearer {grant['stream_token']}"},
                    json={"messages": messages, "stream": False},
                )
                assert answer.status_code == 200, answer.text
            assert not store.exists(stashed), f"{path}: ttl {store.ttl(stashed)} s"
    finally:
        store.close()
