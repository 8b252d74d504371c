"""Http1Client's cap on connections per origin (LLMGW_EDGE_MAX_CONNECTIONS_PER_ORIGIN),
against a real socket: requests beyond the cap wait for a connection to come back, at
most the connect timeout, then fail with a clear `PoolTimeout`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from shared.key_pool import BAD, PLATFORM, key_id, state_key
from shared.settings import ConfigError
from shared.store_memory import MemoryStore
from stream_edge import transport
from stream_edge.http1 import Http1Client
from stream_edge.key_pool import KeyPool
from stream_edge.metrics import EdgeMetrics
from stream_edge.settings import EdgeSettings
from stream_edge.upstream.base import HttpRequest
from stream_edge.upstream_client import RetryPolicy, open_stream
from tests.stack import base_env
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
