"""Http1Client's cap on connections per origin (LLMGW_EDGE_MAX_CONNECTIONS_PER_ORIGIN),
against a real socket: requests beyond the cap wait for a connection to come back, at
most the connect timeout, then fail with a clear `PoolTimeout`. Likewise a company's
requests beyond its share of an origin (LLMGW_EDGE_COMPANY_ORIGIN_SHARE_PERCENT)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from shared.key_pool import BAD, PLATFORM, key_id, state_key
from shared.settings import ConfigError
from shared.sse import SSEDecoder
from shared.store_memory import MemoryStore
from stream_edge import transport
from stream_edge.http1 import Http1Client
from stream_edge.key_pool import KeyPool
from stream_edge.metrics import EdgeMetrics
from stream_edge.origin_share import company_share
from stream_edge.settings import EdgeSettings
from stream_edge.upstream.base import HttpRequest
from stream_edge.upstream_client import RetryPolicy, open_stream
from tests.stack import InProcessStack, base_env
from tests.test_http1 import Server, read_request


async def until(condition: Callable[[], bool], what: str, within: float = 5.0) -> None:
    """Poll `condition()` each loop turn until true; fail after `within` seconds."""
    try:
        async with asyncio.timeout(within):
            while not condition():
                await asyncio.sleep(0)
    except TimeoutError:
        raise AssertionError(f"not within {within} s: {what}") from None


def waiting(client: Http1Client) -> int:
    return sum(len(w) for w in client._waiters.values())


def held_server(release: asyncio.Event) -> Server:
    """Answers each request's headers at once and its body only once `release` is set."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (head := await read_request(reader)) is not None:
            server.requests.append(head)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
            await release.wait()
            writer.write(b"done")

    server = Server(handler)
    return server


async def test_requests_beyond_the_cap_wait_for_a_connection_to_come_back() -> None:
    release = asyncio.Event()
    client = Http1Client(connect_timeout=5.0, read_timeout=5.0, max_per_origin=2)
    try:
        async with held_server(release) as server:
            first = await client.send("GET", server.url, {}, b"")
            second = await client.send("GET", server.url, {}, b"")
            assert client.open_connections(server.url) == 2
            third = asyncio.create_task(client.send("GET", server.url, {}, b""))
            await until(lambda: waiting(client) == 1, "the third request waits")
            assert not third.done() and server.connections == 2
            release.set()
            assert await first.aread() == b"done"
            await first.aclose()  # back in the pool: the waiter takes it
            response = await third
            assert await response.aread() == b"done"
            await response.aclose()
            await second.aread()
            await second.aclose()
            assert server.connections == 2  # the cap held: no third socket
            assert client.open_connections(server.url) == 2
            assert waiting(client) == 0
    finally:
        await client.aclose()


async def test_a_closed_connection_frees_its_place_under_the_cap() -> None:
    release = asyncio.Event()
    client = Http1Client(connect_timeout=5.0, read_timeout=5.0, max_per_origin=1)
    try:
        async with held_server(release) as server:
            first = await client.send("GET", server.url, {}, b"")
            second = asyncio.create_task(client.send("GET", server.url, {}, b""))
            await until(lambda: waiting(client) == 1, "the second request waits")
            await first.aclose()  # body unread: the connection is closed, not pooled
            release.set()
            response = await second
            assert await response.aread() == b"done"
            await response.aclose()
            assert server.connections == 2
            assert client.open_connections(server.url) == 1
    finally:
        await client.aclose()


async def test_waiting_longer_than_the_connect_timeout_is_a_pool_timeout() -> None:
    release = asyncio.Event()
    client = Http1Client(connect_timeout=0.2, read_timeout=5.0, max_per_origin=1)
    try:
        async with held_server(release) as server:
            first = await client.send("GET", server.url, {}, b"")
            with pytest.raises(transport.PoolTimeout, match="1 connections"):
                await client.send("GET", server.url, {}, b"")
            assert isinstance(transport.PoolTimeout("x"), transport.ConnectTimeout)
            assert waiting(client) == 0 and server.connections == 1
            release.set()
            await first.aread()
            await first.aclose()
    finally:
        await client.aclose()


async def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    release = asyncio.Event()
    client = Http1Client(connect_timeout=5.0, read_timeout=5.0, max_per_origin=1)
    try:
        async with held_server(release) as server:
            first = await client.send("GET", server.url, {}, b"")
            leaving = asyncio.create_task(client.send("GET", server.url, {}, b""))
            await until(lambda: waiting(client) == 1, "one waiter")
            staying = asyncio.create_task(client.send("GET", server.url, {}, b""))
            await until(lambda: waiting(client) == 2, "two waiters")
            release.set()
            assert await first.aread() == b"done"
            await first.aclose()  # wakes `leaving`, which is cancelled before it runs
            leaving.cancel()
            response = await staying
            assert await response.aread() == b"done"
            await response.aclose()
            assert leaving.cancelled()
    finally:
        await client.aclose()


async def test_refused_connects_give_their_place_back() -> None:
    client = Http1Client(connect_timeout=1.0, read_timeout=1.0, max_per_origin=1)
    try:
        for _ in range(3):  # each would wait for the previous one's place if it leaked
            with pytest.raises(transport.ConnectError):
                await client.send("GET", "http://127.0.0.1:1/", {}, b"")
        assert client.open_connections("http://127.0.0.1:1/") == 0
    finally:
        await client.aclose()


async def test_a_company_at_its_share_waits_while_another_company_connects() -> None:
    release = asyncio.Event()
    client = Http1Client(connect_timeout=5.0, read_timeout=5.0, max_per_origin=4, company_share=3)
    try:
        async with held_server(release) as server:
            url = server.url
            held = [await client.send("GET", url, {}, b"", company="a") for _ in range(3)]
            assert client.held_connections(url, "a") == 3
            fourth = asyncio.create_task(client.send("GET", url, {}, b"", company="a"))
            await until(lambda: waiting(client) == 1, "the company's fourth request waits")
            other = await client.send("GET", url, {}, b"", company="b")  # at once
            assert client.held_connections(url, "b") == 1 and not fourth.done()
            release.set()
            assert await held[0].aread() == b"done"
            await held[0].aclose()  # back in the pool: the company's waiter takes it
            response = await fourth
            assert client.held_connections(url, "a") == 3
            for done in [*held[1:], response, other]:
                await done.aread()
                await done.aclose()
            assert client.held_connections(url, "a") == client.held_connections(url, "b") == 0
            assert server.connections == 4
    finally:
        await client.aclose()


async def test_a_waiter_at_its_share_keeps_its_place_and_the_next_is_served() -> None:
    """Cap 2, share 1: a's second request waits for a's own connection, c's for any.
    b's connection coming back goes to c, who came later; a's turn comes with a's own."""
    release = asyncio.Event()
    client = Http1Client(connect_timeout=5.0, read_timeout=5.0, max_per_origin=2, company_share=1)
    try:
        async with held_server(release) as server:
            url = server.url
            a = await client.send("GET", url, {}, b"", company="a")
            b = await client.send("GET", url, {}, b"", company="b")
            a2 = asyncio.create_task(client.send("GET", url, {}, b"", company="a"))
            await until(lambda: waiting(client) == 1, "a's second request waits")
            c = asyncio.create_task(client.send("GET", url, {}, b"", company="c"))
            await until(lambda: waiting(client) == 2, "c's request waits")
            release.set()
            await b.aread()
            await b.aclose()
            served_c = await c
            assert not a2.done() and waiting(client) == 1
            await a.aread()
            await a.aclose()
            served_a = await a2
            for response in (served_c, served_a):
                await response.aread()
                await response.aclose()
            assert server.connections == 2 and waiting(client) == 0
    finally:
        await client.aclose()


async def test_a_company_waiting_past_the_connect_timeout_for_its_share_is_a_pool_timeout() -> None:
    release = asyncio.Event()
    client = Http1Client(connect_timeout=0.2, read_timeout=5.0, max_per_origin=2, company_share=1)
    try:
        async with held_server(release) as server:
            first = await client.send("GET", server.url, {}, b"", company="a")
            with pytest.raises(transport.PoolTimeout, match="this company's share"):
                await client.send("GET", server.url, {}, b"", company="a")
            assert waiting(client) == 0 and server.connections == 1
            release.set()
            await first.aread()
            await first.aclose()
            assert client.held_connections(server.url, "a") == 0
    finally:
        await client.aclose()


async def test_a_waiter_woken_past_its_share_passes_the_turn_on() -> None:
    """Cap 3, share 2; a holds 1, b 1, c 1 (full). Waiting: a, a, then b. b's and c's
    connections come back in one turn: each wakes the first waiter under its share,
    a and a (a holds 1 as they are woken). The first a takes one connection and a is
    at its share; the second, woken for the other, can no longer hold and waited again
    without passing its turn on: b, under its share, was never woken, and the
    connection sat idle until b's wait ran out (PoolTimeout)."""
    release = asyncio.Event()
    client = Http1Client(connect_timeout=1.0, read_timeout=5.0, max_per_origin=3, company_share=2)
    try:
        async with held_server(release) as server:
            url = server.url
            a1, b1, c1 = [await client.send("GET", url, {}, b"", company=c) for c in "abc"]
            a2 = asyncio.create_task(client.send("GET", url, {}, b"", company="a"))
            await until(lambda: waiting(client) == 1, "a's second request waits")
            a3 = asyncio.create_task(client.send("GET", url, {}, b"", company="a"))
            await until(lambda: waiting(client) == 2, "a's third request waits")
            b2 = asyncio.create_task(client.send("GET", url, {}, b"", company="b"))
            await until(lambda: waiting(client) == 3, "b's second request waits")
            release.set()
            assert await b1.aread() == await c1.aread() == b"done"
            await b1.aclose()  # both back in one turn of the loop
            await c1.aclose()
            served_b = await b2  # before: PoolTimeout, a connection idle all along
            assert client.held_connections(url, "a") == 2 and not a3.done()
            await a1.aread()
            await a1.aclose()  # a under its share again: its last waiter's turn
            served_a3 = await a3
            for response in (await a2, served_a3, served_b):
                await response.aread()
                await response.aclose()
            assert waiting(client) == 0 and server.connections == 3
    finally:
        await client.aclose()


def test_a_companys_share_of_an_origin() -> None:
    assert [company_share(cap) for cap in (1, 2, 3, 4, 8, 64, 1000)] == [
        1, 1, 2, 3, 6, 48, 750
    ]  # fmt: skip
    assert company_share(64, 100) == 64 and company_share(4, 1) == 1
    with pytest.raises(ValueError):
        company_share(4, 0)


def test_the_cap_is_a_setting() -> None:
    env = base_env("sqlite:///unused.db")
    assert EdgeSettings.from_env(env).max_connections_per_origin == 1000
    # Unset, it follows the streams the edge takes: never a hidden, lower stream limit.
    wide = {**env, "LLMGW_MAX_CONNECTIONS": "5000"}
    assert EdgeSettings.from_env(wide).max_connections_per_origin == 5000
    tuned = {**env, "LLMGW_EDGE_MAX_CONNECTIONS_PER_ORIGIN": "64"}
    assert EdgeSettings.from_env(tuned).max_connections_per_origin == 64
    with pytest.raises(ConfigError, match="LLMGW_EDGE_MAX_CONNECTIONS_PER_ORIGIN"):
        EdgeSettings.from_env({**env, "LLMGW_EDGE_MAX_CONNECTIONS_PER_ORIGIN": "0"})
    assert EdgeSettings.from_env(env).company_origin_share_percent == 75
    whole = {**env, "LLMGW_EDGE_COMPANY_ORIGIN_SHARE_PERCENT": "100"}
    assert EdgeSettings.from_env(whole).company_origin_share_percent == 100
    with pytest.raises(ConfigError, match="LLMGW_EDGE_COMPANY_ORIGIN_SHARE_PERCENT"):
        EdgeSettings.from_env({**env, "LLMGW_EDGE_COMPANY_ORIGIN_SHARE_PERCENT": "0"})


async def test_an_open_cancelled_while_its_key_pool_records_closes_the_connection() -> None:
    """A whole answer's client leaves (or the shutdown cuts it off) just as its backend
    answered, while the key pool records what it learned (a key found working again):
    the response was dropped unclosed, its connection counted against the origin's
    cap, busy, for as long as the backend kept it open, the backend generating for
    nobody. Every such leak is a place fewer for every company's streams."""
    release = asyncio.Event()
    server = held_server(release)
    store = MemoryStore()
    recording = asyncio.Event()

    async def silent_delete(key: str) -> None:  # the store does not answer, for now
        recording.set()
        await asyncio.Event().wait()

    client = Http1Client(connect_timeout=5.0, read_timeout=5.0, max_per_origin=2)
    try:
        async with server:
            await store.set(state_key(PLATFORM, "openai", key_id("k1")), BAD, 60)
            store.delete = silent_delete  # type: ignore[method-assign]
            keys = KeyPool(store, PLATFORM, "openai", ("k1",), EdgeMetrics(), "openai", "c")

            async def open_with(key: str | None, retry_rate_limited: bool) -> transport.Response:
                request = HttpRequest(server.url, {"authorization": f"Bearer {key}"}, b"")
                return await open_stream(client, request, policy=RetryPolicy(retries=0))

            opening = asyncio.create_task(keys.open(open_with))
            await until(recording.is_set, "the pool records that k1 works again")
            assert client.open_connections(server.url) == 1
            opening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await opening
            # Before: still 1, until the backend closed it.
            assert client.open_connections(server.url) == 0
            release.set()
    finally:
        await client.aclose()


def first_chunk(response: httpx.Response) -> str:
    """The name of the stream's first event ("ended": it had none)."""
    decoder = SSEDecoder()
    for raw in response.iter_raw():
        for event in decoder.feed(raw):
            return event.event
    return "ended"


def test_one_company_cannot_take_every_connection_to_a_shared_origin(tmp_path: Path) -> None:
    """Attack: on an edge whose cap per origin (4) is below a company's stream cap, one
    company opens slow streams to the platform's backend, every one within its own
    limits. Before: its 4 streams held all 4 connections to the origin, and another
    company's stream waited the whole connect timeout for one, then 504
    `upstream_timeout`. Now a company holds at most its share of an origin's
    connections (`origin_share.company_share`: 3 of 4), and the other company's
    stream starts at once."""
    env = {
        **base_env(f"sqlite:///{tmp_path / 'gateway.db'}"),
        "LLMGW_EDGE_MAX_CONNECTIONS_PER_ORIGIN": "4",
        "LLMGW_UPSTREAM_CONNECT_TIMEOUT": "1",
    }
    with InProcessStack(env) as stack, contextlib.ExitStack() as streams:
        c = stack.client
        hog = c.new_user(c.new_company("50"))
        other = c.new_user(c.new_company("50"))
        slow = {"query": "hold on [[mock tokens=150 delay_ms=50]]"}
        started = []
        for _ in range(4):
            grant = c.init_ok(hog, slow)
            response = streams.enter_context(c.http.stream("GET", grant["stream_url"]))
            started.append(response.status_code == 200 and first_chunk(response) == "chunk")
        # Served up to its share (3 of 4); its 4th waits for one of its own: 504.
        assert started == [True, True, True, False]

        grant = c.init_ok(other, {"query": "me too [[mock tokens=5]]"})
        with c.http.stream("GET", grant["stream_url"]) as response:
            # Before: 504 upstream_timeout after the 1 s connect timeout.
            assert response.status_code == 200, response.read()
            assert first_chunk(response) == "chunk"
