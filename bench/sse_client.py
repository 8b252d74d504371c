"""A lean HTTP/1.1 load generator for streamed chat completions.

The generator shares the machine with the services it measures, so every
microsecond it spends is one the edge or the mock does not get. It therefore uses
plain asyncio protocols (on uvloop when available) and the C `httptools` parser that
uvicorn already depends on, reuses one keep-alive connection per concurrent client,
and looks at the body only as much as the measurement needs: the first `data:` event
with non-empty `content` (time to first token), the number of events, and the final
`data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import httptools

# A content delta with at least one character; the role delta carries `"content":""`.
_FIRST_CONTENT = re.compile(rb'"content":\s*"[^"]')
_DONE = b"data: [DONE]"


@dataclass(frozen=True, slots=True)
class StreamResult:
    status: int
    ttft: float | None  # seconds from writing the request to the first content event
    duration: float  # seconds from writing the request to the end of the response
    events: int  # SSE events received (role, content, finish, [DONE], …)
    done: bool  # the stream ended with `data: [DONE]`
    error: str | None = None
    body: bytes = b""  # the whole body, only when the request asked to keep it
    sent_at: float = 0.0  # perf_counter when the request was written

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.done and self.ttft is not None


def post_request(
    host: str, port: int, path: str, body: bytes, token: str | None = None, accept: str = "*/*"
) -> bytes:
    """The exact bytes of one JSON `POST` (built before the clock starts)."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Content-Type: application/json\r\n"
        f"Accept: {accept}\r\n"
        f"{auth}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def chat_request(host: str, port: int, body: bytes, token: str | None = None) -> bytes:
    """The exact bytes of one `POST /v1/chat/completions`."""
    return post_request(host, port, "/v1/chat/completions", body, token, "text/event-stream")


def init_request(host: str, port: int, body: bytes, access_token: str) -> bytes:
    """The exact bytes of one `POST /v1/chat/init` (the control plane's answer is kept)."""
    return post_request(host, port, "/v1/chat/init", body, access_token, "application/json")


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one streamed response at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[StreamResult] | None = None
        self.first_content: asyncio.Future[None] | None = None
        self._reset(0.0)

    def _reset(self, started: float) -> None:
        self._started = started
        self._ttft: float | None = None
        self._events = 0
        self._last_byte = b""
        self._scan = bytearray()
        self._tail = b""
        self._body: bytearray | None = None

    # asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(f"bad HTTP response: {exc}")
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._finish("connection closed mid-response")

    # httptools callbacks ---------------------------------------------------------
    def on_body(self, body: bytes) -> None:
        if self._body is not None:
            self._body += body
            return
        # Events end with a blank line; count "\n\n", including one split across reads.
        self._events += body.count(b"\n\n")
        if self._last_byte == b"\n" and body[:1] == b"\n":
            self._events += 1
        self._last_byte = body[-1:]
        self._tail = (self._tail + body)[-32:]
        if self._ttft is None:
            self._scan += body
            if _FIRST_CONTENT.search(self._scan):
                self._ttft = time.perf_counter() - self._started
                self._scan = bytearray()
                if self.first_content is not None and not self.first_content.done():
                    self.first_content.set_result(None)

    def on_message_complete(self) -> None:
        keep_alive = self._parser.should_keep_alive()
        self._finish(None)
        if not keep_alive:
            self.abort()

    # API -------------------------------------------------------------------------
    def send(self, request: bytes, keep_body: bool = False) -> asyncio.Future[StreamResult]:
        """Write `request` and return a future for its whole streamed response
        (`keep_body`: a short JSON answer, kept whole and not scanned for events)."""
        assert self.transport is not None and self._waiter is None
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self.first_content = loop.create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._reset(time.perf_counter())
        if keep_body:
            self._body = bytearray()
        self.transport.write(request)
        return self._waiter

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _finish(self, error: str | None) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        status = 0
        try:
            status = self._parser.get_status_code()
        except httptools.HttpParserError:
            pass
        waiter.set_result(
            StreamResult(
                status=status,
                ttft=self._ttft,
                duration=time.perf_counter() - self._started,
                events=self._events,
                done=_DONE in self._tail,
                error=error,
                body=bytes(self._body) if self._body is not None else b"",
                sent_at=self._started,
            )
        )
        if self.first_content is not None and not self.first_content.done():
            self.first_content.set_exception(ConnectionError(error or f"HTTP {status}"))
            self.first_content.exception()  # mark retrieved: nobody may be waiting on it


async def connect(host: str, port: int) -> Connection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(Connection, host, port)
    return protocol


def ramp_delay(slot: int, clients: int, ramp_s: float) -> float:
    """When closed-loop client `slot` of `clients` sends its first request: spread
    evenly over `ramp_s`. Clients that all start at once and get answers of one
    length stay in lockstep, every request of a round arriving in the same
    millisecond (a herd); users do not click together, so the whole-turn phase also
    runs with the starts spread over one answer's length (`TurnPlan.spread`)."""
    return ramp_s * slot / clients if ramp_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class LoadRun:
    results: list[StreamResult]
    wall: float  # seconds from the first request written to the last response ended


class Pool:
    """`size` keep-alive connections to one server, reopened if the server closes one."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host = host
        self.port = port
        self.size = size
        self._conns: list[Connection | None] = [None] * size

    async def open(self) -> None:
        self._conns = list(
            await asyncio.gather(*(connect(self.host, self.port) for _ in range(self.size)))
        )

    async def slot(self, index: int) -> Connection:
        """Connection `index`, reopened if the server closed it."""
        conn = self._conns[index]
        if conn is None or conn.closed:
            conn = self._conns[index] = await connect(self.host, self.port)
        return conn

    async def run(
        self, requests: Sequence[bytes], keep_body: bool = False, ramp_s: float = 0.0
    ) -> LoadRun:
        """Send every request, at most `size` at a time, each on a free connection.
        With `ramp_s`, client k starts k/size of it after the first (see `ramp_delay`)."""
        results: list[StreamResult | None] = [None] * len(requests)
        next_index = 0

        async def client(slot: int) -> None:
            nonlocal next_index
            await asyncio.sleep(ramp_delay(slot, self.size, ramp_s))
            while next_index < len(requests):
                index = next_index
                next_index += 1
                conn = await self.slot(slot)
                results[index] = await conn.send(requests[index], keep_body)

        started = time.perf_counter()
        await asyncio.gather(*(client(slot) for slot in range(min(self.size, len(requests)))))
        wall = time.perf_counter() - started
        return LoadRun([r for r in results if r is not None], wall)

    def close(self) -> None:
        for conn in self._conns:
            if conn is not None:
                conn.abort()


class OpenStreams:
    """Many streams held open at once (the memory test): each on its own connection."""

    def __init__(self) -> None:
        self.connections: list[Connection] = []
        self._streaming: list[Connection] = []  # those whose stream got its first content
        self.opened = 0  # streams that got their first content event
        self.failures: Counter[str] = Counter()  # why the others did not

    async def open(self, host: str, port: int, requests: Sequence[bytes], ramp: int) -> float:
        """Open one stream per request, `ramp` at a time, until each has its first
        content event; returns the seconds it took."""
        gate = asyncio.Semaphore(ramp)

        async def one(request: bytes) -> None:
            async with gate:
                try:
                    conn = await connect(host, port)
                    self.connections.append(conn)
                    conn.send(request)
                    assert conn.first_content is not None
                    await conn.first_content
                    self._streaming.append(conn)
                    self.opened += 1
                except (OSError, ConnectionError) as exc:
                    self.failures[str(exc) or type(exc).__name__] += 1

        started = time.perf_counter()
        await asyncio.gather(*(one(r) for r in requests))
        return time.perf_counter() - started

    @property
    def still_open(self) -> int:
        """Streams that opened and are still open (a refused request's keep-alive
        connection is open too, but holds no stream)."""
        return sum(1 for conn in self._streaming if not conn.closed)

    def close(self) -> None:
        for conn in self.connections:
            conn.abort()
