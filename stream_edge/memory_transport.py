"""An in-memory `Transport`: each origin is an ASGI app called in-process, so the
edge's backend requests, usage webhooks and control-plane calls never open a socket.

For tests (and benchmarks that want the edge alone). Unlike `httpx.ASGITransport`,
which runs the app to its end before answering, the response streams: headers come
back as soon as the app starts its answer and each body message is a chunk, so a
relay sees tokens one by one, and `aclose()` before the end tells the app its client
disconnected (`http.disconnect`), as a dropped connection would.

Failures are scripted per origin (`Faults`), driven by events rather than sleeps:
refuse the connect, stall before the answer or after N body chunks until an event
is set (forever if never), reset the connection after N chunks. An app that raises
before answering is a connection closed without a response; one that raises
mid-body is a reset (`ReadError`), as uvicorn would show them. There is no flow
control: what the app sends waits in memory until read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Scope

from stream_edge import transport as t
from stream_edge.http1_connection import Headers
from stream_edge.transport import RequestHeaders

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass
class Faults:
    """What goes wrong with one origin's next requests. Counters count down per
    request; `release` ends a stall (a stall nobody releases lasts until the caller
    gives up, e.g. the edge's first-token or idle deadline)."""

    refuse: int = 0  # connects refused (ConnectError)
    stall_headers: int = 0  # requests whose answer never starts until `release`
    stall_after: int | None = None  # chunks passed before the body stalls until `release`
    reset_after: int | None = None  # chunks passed before the connection is reset
    release: asyncio.Event = field(default_factory=asyncio.Event)
    stalled: asyncio.Event = field(default_factory=asyncio.Event)  # set when a stall begins


def origin_of(url: str) -> str:
    """`scheme://host:port`, the key `InMemoryTransport` routes by."""
    parts = urlsplit(url)
    default = _DEFAULT_PORTS.get(parts.scheme)
    if default is None:
        raise t.UnsupportedProtocol(f"unsupported URL scheme in {url!r}")
    if not parts.hostname:
        raise t.InvalidURL(f"no host in {url!r}")
    return f"{parts.scheme}://{parts.hostname}:{parts.port or default}"


class InMemoryResponse:
    """The app's answer as it comes: body messages are chunks, in order."""

    def __init__(
        self,
        status: int,
        headers: Mapping[str, str],
        exchange: _Exchange,
    ) -> None:
        self.status_code = status
        self.headers = headers
        self._exchange = exchange

    def aiter_raw(self) -> AsyncIterator[bytes]:
        return self

    def __aiter__(self) -> InMemoryResponse:
        return self

    async def __anext__(self) -> bytes:
        return await self._exchange.next_chunk()

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        await self._exchange.close()


class _Exchange:
    """One request running in its own task; its messages wake whoever reads."""

    def __init__(
        self, app: ASGIApp, scope: Scope, body: bytes, faults: Faults, read_timeout: float | None
    ) -> None:
        self._read_timeout = read_timeout
        self._body: bytes | None = body
        self._faults = faults
        self._disconnected = asyncio.Event()
        self._changed = asyncio.Event()
        self._chunks: deque[bytes] = deque()
        self.start: Message | None = None
        self._ended = False  # the app sent its last body message
        self._error: BaseException | None = None
        self._passed = 0
        self.task = asyncio.create_task(self._run(app, scope))

    async def _receive(self) -> Message:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self._disconnected.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: Message) -> None:
        if self._disconnected.is_set():
            raise OSError("the client disconnected")  # what a server's send would do
        if message["type"] == "http.response.start":
            self.start = message
        elif message["type"] == "http.response.body":
            chunk = bytes(message.get("body", b""))
            if chunk:
                self._chunks.append(chunk)
            if not message.get("more_body", False):
                self._ended = True
        self._changed.set()

    async def _run(self, app: ASGIApp, scope: Scope) -> None:
        try:
            await app(scope, self._receive, self._send)
        except Exception as exc:
            # Failing after its whole answer is only logged by a server (Starlette's
            # 500 is sent, then re-raised); before that the connection drops.
            if not self._ended:
                self._error = exc
        finally:
            self._ended = True
            self._changed.set()

    async def _wait(self) -> None:
        self._changed.clear()
        await self._bounded(self._changed.wait())

    async def _bounded(self, waiting: Awaitable[object]) -> None:
        try:
            async with asyncio.timeout(self._read_timeout):
                await waiting
        except TimeoutError:
            raise t.ReadTimeout(f"no data for {self._read_timeout} s") from None

    async def headers(self) -> Message:
        while self.start is None:
            if self.task.done():
                raise t.RemoteProtocolError("server disconnected without a response")
            await self._wait()
        return self.start

    async def next_chunk(self) -> bytes:
        faults = self._faults
        if faults.reset_after is not None and self._passed >= faults.reset_after:
            await self.close()
            raise t.ReadError("connection reset by the fault script")
        if faults.stall_after is not None and self._passed >= faults.stall_after:
            faults.stalled.set()
            await self._bounded(faults.release.wait())
        while not self._chunks:
            if self._ended:
                if self._error is not None:
                    raise t.ReadError(f"connection lost: {self._error!r}")
                raise StopAsyncIteration
            await self._wait()
        self._passed += 1
        return self._chunks.popleft()

    async def close(self) -> None:
        """The client is gone: the app hears `http.disconnect` and its sends fail, as
        with uvicorn, which never cancels an app for it (a detached producer goes on)."""
        self._disconnected.set()

    async def cancel(self) -> None:
        """The server shuts down: whatever still runs is cancelled."""
        self._disconnected.set()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class InMemoryTransport:
    """Routes each request by origin (`http://host:port`) to an ASGI app."""

    def __init__(self, routes: Mapping[str, ASGIApp], read_timeout: float | None = None) -> None:
        """`read_timeout`: as Http1Client's, the longest wait for the answer's headers or
        for the next chunk (a stall), then `ReadTimeout`; None: no limit."""
        self._read_timeout = read_timeout
        self._routes = {origin_of(url): app for url, app in routes.items()}
        self.faults: dict[str, Faults] = {}
        self.sent: list[tuple[str, str]] = []  # (method, url) of each request
        self._open: set[_Exchange] = set()

    def route(self, url: str, app: ASGIApp) -> None:
        self._routes[origin_of(url)] = app

    def faults_for(self, url: str) -> Faults:
        """The origin's fault script, created empty on first use."""
        return self.faults.setdefault(origin_of(url), Faults())

    async def send(
        self,
        method: str,
        url: str,
        headers: RequestHeaders,
        body: bytes,
        *,
        company: str | None = None,  # no connections here, so no share to keep
    ) -> InMemoryResponse:
        origin = origin_of(url)
        self.sent.append((method, url))
        app = self._routes.get(origin)
        faults = self.faults.get(origin) or Faults()
        if app is None:
            raise t.ConnectError(f"cannot connect to {origin}: nothing listens there")
        if faults.refuse > 0:
            faults.refuse -= 1
            raise t.ConnectError(f"cannot connect to {origin}: refused by the fault script")
        if faults.stall_headers > 0:
            faults.stall_headers -= 1
            faults.stalled.set()
            try:
                async with asyncio.timeout(self._read_timeout):
                    await faults.release.wait()
            except TimeoutError:
                raise t.ReadTimeout(f"no answer for {self._read_timeout} s") from None
        exchange = _Exchange(
            app, _scope(method, url, headers, body), body, faults, self._read_timeout
        )
        self._open.add(exchange)
        exchange.task.add_done_callback(lambda _: self._open.discard(exchange))
        try:
            start = await exchange.headers()
        except BaseException:
            await exchange.close()
            raise
        return InMemoryResponse(
            int(start["status"]), Headers(list(start.get("headers", []))), exchange
        )

    async def aclose(self) -> None:
        for exchange in list(self._open):
            await exchange.cancel()
        self._open.clear()


def _scope(method: str, url: str, headers: RequestHeaders, body: bytes) -> Scope:
    parts = urlsplit(url)
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    raw = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in pairs]
    names = {name for name, _ in raw}
    if b"host" not in names:
        raw.append((b"host", parts.netloc.encode("latin-1")))
    raw.append((b"content-length", str(len(body)).encode()))
    port = parts.port or _DEFAULT_PORTS[parts.scheme]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": parts.scheme,
        "path": parts.path or "/",
        "raw_path": (parts.path or "/").encode(),
        "query_string": parts.query.encode(),
        "root_path": "",
        "headers": raw,
        "client": ("127.0.0.1", 50000),
        "server": (parts.hostname or "", port),
        "state": {},
    }
