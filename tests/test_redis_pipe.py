"""The edge's pipelined Redis connection (shared/redis_pipe.py) and the Redis store's
hot path through it: RESP encoding and parsing as a table, then, on the real Redis,
many coroutines' commands answered each to its own caller, scripts loaded on
demand, MULTI/EXEC kept contiguous, a lost connection failing what was in flight and
the next command reconnecting, and a stream's store calls never touching redis-py's
pool."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from shared.redis_pipe import Incomplete, PipelinedRedis, encode, parse
from shared.store import Admission, SlotRelease
from shared.store_redis import RedisStore
from tests.conftest import REDIS_URL


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b"+OK\r\n", b"OK"),
        (b":42\r\n", 42),
        (b"$-1\r\n", None),
        (b"$0\r\n\r\n", b""),
        (b"$6\r\na\r\nb\0c\r\n", b"a\r\nb\0c"),  # a bulk string holds any bytes
        (b"*-1\r\n", None),
        (b"*3\r\n$2\r\nok\r\n:-1\r\n*1\r\n$-1\r\n", [b"ok", -1, [None]]),
    ],
)
def test_replies_parse_and_split_anywhere(raw: bytes, value: object) -> None:
    assert parse(raw + b":7\r\n", 0) == (value, len(raw))
    for cut in range(len(raw)):  # a reply cut short anywhere waits for more
        with pytest.raises(Incomplete):
            parse(raw[:cut], 0)


def test_error_replies_are_redis_py_exceptions() -> None:
    error, _ = parse(b"-NOSCRIPT No matching script\r\n", 0)
    assert type(error).__name__ == "NoScriptError"
    error, _ = parse(b"-ERR wrong\r\n", 0)
    assert isinstance(error, ResponseError) and str(error) == "ERR wrong"


def test_commands_encode_as_bulk_strings() -> None:
    assert encode(("SET", "k", b"\x00v", 5, 1.5)) == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n\x00v\r\n$1\r\n5\r\n$3\r\n1.5\r\n"
    )


@pytest.fixture
async def pipe() -> PipelinedRedis:
    client = PipelinedRedis.from_url(REDIS_URL)
    assert client is not None
    try:
        await client.execute("PING")
    except RedisConnectionError as exc:
        pytest.skip(f"Redis is not reachable: {exc}")
    return client


async def test_concurrent_commands_each_get_their_own_reply(
    pipe: PipelinedRedis, redis_prefix: str
) -> None:
    keys = [f"{redis_prefix}pipe:{i}" for i in range(200)]
    await asyncio.gather(*(pipe.execute("SET", k, f"v{i}") for i, k in enumerate(keys)))
    got = await asyncio.gather(*(pipe.execute("GET", k) for k in keys))
    assert got == [f"v{i}".encode() for i in range(200)]
    assert await pipe.execute("MGET", keys[0], f"{redis_prefix}absent") == [b"v0", None]
    with pytest.raises(ResponseError):
        await pipe.execute("INCR", keys[0])  # not an integer: an error reply
    assert await pipe.execute("GET", keys[1]) == b"v1"  # and the connection goes on
    await pipe.close()


async def test_a_cancelled_caller_never_shifts_the_others_replies(
    pipe: PipelinedRedis, redis_prefix: str
) -> None:
    keys = [f"{redis_prefix}c:{i}" for i in range(30)]
    await asyncio.gather(*(pipe.execute("SET", k, k) for k in keys))
    tasks = [asyncio.ensure_future(pipe.execute("GET", k)) for k in keys]
    await asyncio.sleep(0)  # all queued on the connection
    for task in tasks[::3]:
        task.cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    for i, (key, result) in enumerate(zip(keys, done, strict=True)):
        if i % 3 == 0:
            assert isinstance(result, asyncio.CancelledError)
        else:
            assert result == key.encode()  # its own reply, not a neighbour's
    assert await pipe.execute("GET", keys[0]) == keys[0].encode()
    await pipe.close()


async def test_scripts_load_on_demand_and_transactions_stay_whole(
    pipe: PipelinedRedis, redis_prefix: str
) -> None:
    source = f"-- {uuid.uuid4().hex}\nreturn {{KEYS[1], ARGV[1]}}"  # unknown to the server
    assert await pipe.script(source, [f"{redis_prefix}k"], [3]) == [
        f"{redis_prefix}k".encode(),
        b"3",
    ]
    assert await pipe.script(source, ["x"], ["y"]) == [b"x", b"y"]  # now by its SHA
    key = f"{redis_prefix}counter"
    replies = await asyncio.gather(
        pipe.batch([("INCR", key), ("INCR", key)], transaction=True),
        pipe.execute("SET", f"{redis_prefix}other", "1"),
    )
    assert replies[0] == [1, 2]
    await pipe.close()


async def test_a_lost_connection_fails_in_flight_commands_then_reconnects(
    pipe: PipelinedRedis, redis_prefix: str
) -> None:
    own_id = await pipe.execute("CLIENT", "ID")
    slow = asyncio.ensure_future(pipe.execute("BLPOP", f"{redis_prefix}never", 5))
    await asyncio.sleep(0)  # queued and written
    admin = aioredis.Redis.from_url(REDIS_URL)
    try:
        deadline = time.monotonic() + 10
        while not slow.done() and time.monotonic() < deadline:
            await admin.execute_command("CLIENT", "KILL", "ID", own_id)
            await asyncio.sleep(0.05)
    finally:
        await admin.aclose()
    with pytest.raises(RedisConnectionError):
        await slow
    assert await pipe.execute("PING") == b"PONG"  # a new connection
    assert await pipe.execute("CLIENT", "ID") != own_id
    await pipe.close()


async def test_a_server_that_stops_answering_fails_the_commands_and_is_left() -> None:
    """A peer that takes commands and never answers (a partition, a failover to an
    address gone silent): after `reply_timeout` without a reply every command waiting
    fails and the connection is dropped, instead of waiting for the kernel's timeout."""
    connections: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await reader.read(1 << 16)  # takes the commands, answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pipe = PipelinedRedis("127.0.0.1", port, reply_timeout=0.2)
    try:
        waiting = [asyncio.ensure_future(pipe.execute("GET", f"k{i}")) for i in range(3)]
        for command in waiting:
            with pytest.raises(RedisConnectionError, match="no reply"):
                await command
        assert len(connections) == 1
        # The next command opens a connection of its own (and, here, fails alike).
        with pytest.raises(RedisConnectionError):
            await pipe.execute("PING")
        assert len(connections) == 2
    finally:
        await pipe.close()
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_command_sent_on_a_connection_just_lost_fails_at_once(pipe: PipelinedRedis) -> None:
    assert await pipe.execute("PING") == b"PONG"
    protocol = pipe._protocol
    assert protocol is not None and protocol.transport is not None
    protocol.transport.abort()
    await asyncio.sleep(0)  # connection_lost has run; a caller past `_ready` sends now
    waiter: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    protocol.send(encode(("PING",)), waiter)
    with pytest.raises(RedisConnectionError):
        await waiter
    assert await pipe.execute("PING") == b"PONG"  # and the next command reconnects
    await pipe.close()


async def test_a_streams_store_calls_go_through_the_one_connection(redis_prefix: str) -> None:
    store = RedisStore.from_url(REDIS_URL, prefix=redis_prefix)
    pool = store._redis.connection_pool
    now = time.time()

    async def stream(i: int) -> None:
        jti = f"jti{i}"
        admitted = await store.admit(
            Admission(
                revocation_keys=[f"rev:user:u{i}"],
                used_key=f"used:{jti}",
                path="completions",
                used_ttl_seconds=60,
                slot_keys=["slots:company:c"],
                limits=[1000],
                member=jti,
                now=now,
                slots_expire_at=now + 60,
            )
        )
        assert admitted.verdict == "ok"
        await store.set(f"checkpoint:{jti}", b"{}", 60)
        await store.outbox_put(f"wh{i}", b"{}", now + 30, SlotRelease(["slots:company:c"], jti))
        await store.outbox_ack([f"wh{i}"])

    try:
        await asyncio.gather(*(stream(i) for i in range(50)))
        # Everything landed (outbox empty, slots all given back, tokens used) ...
        assert await store.outbox_size() == 0
        assert await store.get_many([f"used:jti{i}" for i in (0, 49)]) == [b"completions"] * 2
        assert await store.bounded_members("slots:company:c") == []
        # ... and redis-py's pool opened only the connection those last reads took.
        assert len(pool._available_connections) + len(pool._in_use_connections) <= 1
    finally:
        await store.close()
