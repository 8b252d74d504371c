"""One pipelined Redis connection for the few commands every stream sends.

redis-py spends ~100 to 150 µs of CPU per command here: a connection checked out of
the pool and back, the command packed by a general encoder, the reply read line by
line through asyncio streams (docs/edge-profile.md). The edge sends a handful of
commands per stream (admission, checkpoints, the usage report, its acknowledgement),
always the same ones, so they go through this instead: one connection per process,
every command written as it is issued (all those issued in one turn of the event
loop in a single write), replies matched to their callers in order (Redis answers
a connection's commands in the order it got them). Anything else keeps using
redis-py.

RESP2 only (https://redis.io/docs/latest/develop/reference/protocol-spec/); plain
TCP (`redis://`), with the URL's database, user and password. Errors are redis-py's
exceptions, so callers (and `STORE_ERRORS`) handle both clients alike. When the
connection breaks, every command in flight fails with `ConnectionError` (its effect
unknown, as with any client) and the next command reconnects. So does a connection
that stops answering (a partition, a failover to an address that went silent): when
commands have waited `reply_timeout` (20 s, redis-py's `socket_timeout` in
`store_redis`) with no reply, the connection is aborted, which fails them all. One
timer per connection checks it, not one per command.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlparse

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

# As `socket_timeout` of the redis-py pool in store_redis.
REPLY_TIMEOUT = 20.0

Arg = bytes | str | int | float
Reply = Any  # bytes | int | None | list[Reply] | ResponseError (inside arrays)


class Incomplete(Exception):
    """The buffer ends inside a reply: wait for more bytes."""


def encode(args: tuple[Arg, ...]) -> bytes:
    """One command as a RESP array of bulk strings (floats as `repr`, like redis-py)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            raw = arg
        elif isinstance(arg, str):
            raw = arg.encode()
        elif isinstance(arg, float):
            raw = repr(arg).encode()
        else:
            raw = str(arg).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(raw), raw))
    return b"".join(out)


def _error(message: bytes) -> ResponseError:
    text = message.decode(errors="replace")
    if text.startswith("NOSCRIPT"):
        return NoScriptError(text)
    return ResponseError(text)


def parse(buf: bytes | bytearray, pos: int) -> tuple[Reply, int]:
    """The reply starting at `pos` and where the next one starts; `Incomplete` when
    the buffer ends first. An error reply is returned as a `ResponseError` value."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise Incomplete
    kind, line = buf[pos : pos + 1], bytes(buf[pos + 1 : end])
    pos = end + 2
    if kind == b"+":
        return line, pos
    if kind == b":":
        return int(line), pos
    if kind == b"-":
        return _error(line), pos
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            raise Incomplete
        return bytes(buf[pos : pos + size]), pos + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item, pos = parse(buf, pos)
            items.append(item)
        return items, pos
    raise RedisConnectionError(f"unexpected RESP type {kind!r}")


class _Protocol(asyncio.Protocol):
    def __init__(self, reply_timeout: float = REPLY_TIMEOUT) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiters: deque[asyncio.Future[Reply]] = deque()
        self.closed = False
        self._buf = bytearray()
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._reply_timeout = reply_timeout
        # The loop's time of the last reply, or of the first command sent since the
        # connection was last idle: what the watch measures silence from.
        self._heard = 0.0
        self._watch: asyncio.TimerHandle | None = None

    def send(self, command: bytes, waiter: asyncio.Future[Reply]) -> None:
        """Queue `command`; every command queued in this turn of the loop leaves in
        one write, and each waiter gets its reply in order."""
        if self.closed:  # lost while its caller was on its way here: no reply will come
            waiter.set_exception(RedisConnectionError("the Redis connection was lost"))
            return
        if not self.waiters:
            self._heard = self._loop.time()
        self.waiters.append(waiter)
        self._pending.append(command)
        if len(self._pending) == 1:
            self._loop.call_soon(self._flush)
        if self._watch is None:
            self._watch = self._loop.call_later(self._reply_timeout / 4, self._check)

    def _check(self) -> None:
        self._watch = None
        if self.closed or not self.waiters:
            return
        if self._loop.time() - self._heard < self._reply_timeout:
            self._watch = self._loop.call_later(self._reply_timeout / 4, self._check)
            return
        self.closed = True
        self._fail(RedisConnectionError(f"no reply from Redis in {self._reply_timeout:g} s"))
        if self.transport is not None:
            self.transport.abort()

    def _flush(self) -> None:
        data = b"".join(self._pending)
        self._pending.clear()
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._heard = self._loop.time()
        pos = 0
        try:
            while pos < len(self._buf) and self.waiters:
                reply, pos = parse(self._buf, pos)
                waiter = self.waiters.popleft()
                if waiter.done():  # its caller was cancelled: the reply is dropped
                    continue
                if isinstance(reply, ResponseError):
                    waiter.set_exception(reply)
                else:
                    waiter.set_result(reply)
        except Incomplete:
            pass
        except RedisConnectionError as exc:
            self._fail(exc)
            if self.transport is not None:
                self.transport.abort()
        del self._buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._fail(RedisConnectionError("the Redis connection was lost"))

    def _fail(self, exc: Exception) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)


class PipelinedRedis:
    """See the module docstring. Create it anywhere; it connects on first use, in
    the running loop."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        connect_timeout: float = 2.0,
        reply_timeout: float = REPLY_TIMEOUT,
    ) -> None:
        self._host, self._port, self._db = host, port, db
        self._username, self._password = username, password
        self._connect_timeout = connect_timeout
        self._reply_timeout = reply_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._shas: dict[str, str] = {}

    @classmethod
    def from_url(cls, url: str) -> PipelinedRedis | None:
        """A client for a `redis://host:port/db` URL; None for anything else (TLS,
        Unix sockets), which stays with redis-py."""
        parsed = urlparse(url)
        if parsed.scheme != "redis" or not parsed.hostname:
            return None
        path = parsed.path.strip("/")
        return cls(
            parsed.hostname,
            parsed.port or 6379,
            db=int(path) if path.isdigit() else 0,
            username=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
        )

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Protocol(self._reply_timeout), self._host, self._port
                )
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc}") from None
        hello: list[tuple[Arg, ...]] = []
        if self._password is not None:
            auth: tuple[Arg, ...] = ("AUTH", self._password)
            hello.append(("AUTH", self._username, self._password) if self._username else auth)
        if self._db:
            hello.append(("SELECT", self._db))
        for command in hello:
            waiter: asyncio.Future[Reply] = loop.create_future()
            protocol.send(encode(command), waiter)
            await waiter
        return protocol

    async def _ready(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol
        if self._connecting is None:
            # One connection attempt at a time; everyone waiting shares its outcome.
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            protocol = await asyncio.shield(connecting)
        finally:
            if connecting.done():
                self._connecting = None
        self._protocol = protocol
        return protocol

    async def execute(self, *args: Arg) -> Reply:
        """Send one command; its reply (error replies raise redis-py's exceptions)."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._ready()
        waiter: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        protocol.send(encode(args), waiter)
        return await waiter

    async def batch(
        self, commands: Sequence[tuple[Arg, ...]], *, transaction: bool = False
    ) -> list[Reply]:
        """Several commands queued together (contiguous on the connection); with
        `transaction`, wrapped in MULTI/EXEC and EXEC's replies returned."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._ready()
        loop = asyncio.get_running_loop()
        if transaction:
            commands = [("MULTI",), *commands, ("EXEC",)]
        waiters: list[asyncio.Future[Reply]] = []
        for command in commands:
            waiter: asyncio.Future[Reply] = loop.create_future()
            protocol.send(encode(command), waiter)
            waiters.append(waiter)
        replies = []
        failure: BaseException | None = None
        for waiter in waiters:  # every reply is awaited, so none is left unretrieved
            try:
                replies.append(await waiter)
            except ResponseError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        if transaction:
            result: list[Reply] = replies[-1]
            return result
        return replies

    async def script(self, source: str, keys: Sequence[str], args: Sequence[Arg]) -> Reply:
        """EVALSHA, falling back to EVAL (which caches the script) the first time the
        server does not know it (a fresh or flushed Redis)."""
        sha = self._shas.get(source)
        if sha is None:
            sha = self._shas[source] = hashlib.sha1(source.encode()).hexdigest()
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.execute("EVAL", source, len(keys), *keys, *args)

    async def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()


class PipeLender:
    """Up to `size` connections, each lent to one caller at a time: for commands
    that hold their connection (WAIT) or must share one with the caller's own
    earlier command, which the shared `PipelinedRedis` cannot give. A caller past
    the `size`th waits for one to come back."""

    def __init__(self, make: Callable[[], PipelinedRedis], size: int) -> None:
        self._make = make
        self._idle: list[PipelinedRedis] = []
        self._made: list[PipelinedRedis] = []
        self._slots = asyncio.Semaphore(size)

    async def batch(self, commands: Sequence[tuple[Arg, ...]]) -> list[Reply]:
        """`PipelinedRedis.batch` on a connection no one else uses meanwhile."""
        async with self._slots:
            if self._idle:
                pipe = self._idle.pop()
            else:
                pipe = self._make()
                self._made.append(pipe)
            try:
                return await pipe.batch(commands)
            finally:
                # Even after a cancellation: a reply still due is matched and dropped
                # before the next caller's, whose own commands go after it.
                self._idle.append(pipe)

    async def close(self) -> None:
        made, self._made, self._idle = self._made, [], []
        for pipe in made:
            await pipe.close()
