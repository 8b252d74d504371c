"""One HTTP/1.1 connection to a backend: an asyncio Protocol around uvicorn's C parser
(`httptools`), its body buffer with flow control, and its one timer.

The pool and the request/response API around it are in http1.py. Failures are
recorded as `stream_edge.transport` errors on the connection and raised by whoever
awaits it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import cast

import httptools

from stream_edge import transport as t

# Unconsumed body bytes above which the socket stops being read, so a slow consumer
# pushes back on the backend through TCP instead of growing our memory.
HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024
# A response's head (interim 1xx heads included) may not exceed these: httptools joins
# a header value split across reads by concatenation, so a backend streaming an endless
# header would cost quadratic CPU as well as memory. Bytes are counted per read while
# the head is incomplete, so the read that ends it may add up to one read beyond.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEAD_FIELDS = 100

Origin = tuple[str, str, int]
# (origin, company): whose request a busy connection serves, for the company's share.
Holder = tuple[Origin, str]


class Headers(Mapping[str, str]):
    """Response headers: read-only, case-insensitive; repeated fields joined by ", "."""

    __slots__ = ("_fields", "raw")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw
        fields: dict[str, str] = {}
        for name, value in raw:
            key, text = name.decode("latin-1").lower(), value.decode("latin-1")
            fields[key] = f"{fields[key]}, {text}" if key in fields else text
        self._fields = fields

    def __getitem__(self, key: str) -> str:
        return self._fields[key.lower()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


class Connection(asyncio.Protocol):
    """One connection: its parser, the body buffer and the one pending waiter. Callbacks
    record `error` and wake the waiter rather than fail a future, so an error nobody
    awaits is never reported as "never retrieved". `on_gone` is called once, when the
    connection is closed by either side: the pool counts it no longer."""

    transport: asyncio.Transport

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        origin: Origin,
        timeout: float,
        on_gone: Callable[[Connection], None] | None = None,
    ) -> None:
        self.loop, self.origin, self.read_timeout = loop, origin, timeout
        self._on_gone = on_gone
        self.parser = httptools.HttpResponseParser(self)
        self.chunks: deque[bytes] = deque()
        self.parts: list[bytes] = []  # body pieces of the read being parsed
        self.buffered = 0
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.started = self.idle_since = 0.0
        self.busy = self.lost = self.paused = self.write_paused = self.interim = False
        self.holder: Holder | None = None
        self.reset()

    def reset(self) -> None:
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = self.head_fields = 0
        self.status = 0
        self.headers_done = self.complete = self.got_bytes = False
        self.keep = True
        self.error: t.TransportError | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.complete:
            # Bytes nobody asked for (an idle connection talking, or trailing data):
            # the connection can no longer be trusted to frame another response.
            self.close()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if not self.complete:
                # A callback's own refusal (too many header fields) is its cause.
                cause = exc.__context__
                if not isinstance(cause, t.RemoteProtocolError):
                    cause = t.RemoteProtocolError(f"malformed response: {exc}")
                self.error = cause
            self.close()
        if not self.headers_done and not self.lost:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self.error = t.RemoteProtocolError(
                    f"response headers longer than {MAX_HEAD_BYTES} bytes"
                )
                self.close()
        parts = self.parts
        if parts:
            # One item per network read, even when a read held several chunks.
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            parts.clear()
            self.chunks.append(data)
            self.buffered += len(data)
            if self.buffered > HIGH_WATER and not self.paused and not self.lost:
                self.paused = True
                self.transport.pause_reading()
        self.wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost, self.keep = True, False
        if self.busy and not self.complete and self.error is None:
            if self.write_paused:
                self.error = t.WriteError(f"connection lost while sending: {exc!r}")
            elif exc is not None:
                self.error = t.ReadError(f"connection lost: {exc!r}")
            elif self.headers_done and self._until_eof():
                self.complete = True
            elif self.got_bytes:
                self.error = t.RemoteProtocolError("server closed the connection mid-response")
            else:
                self.error = t.RemoteProtocolError("server disconnected without a response")
        self.cancel_timer()
        self.wake()
        self.gone()

    def _until_eof(self) -> bool:
        """A body with neither length nor chunking ends when the server closes."""
        return self.status not in (204, 304) and not any(
            name.lower() in (b"content-length", b"transfer-encoding")
            for name, _ in self.raw_headers
        )

    # The waiter doubles as the drain future (as in asyncio.streams' FlowControlMixin):
    # a request is written whole and its headers awaited next, so one wait covers both.
    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.wake()

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.complete:
            raise RuntimeError("data after the end of the response")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_fields += 1
        if self.head_fields > MAX_HEAD_FIELDS:
            raise t.RemoteProtocolError(f"more than {MAX_HEAD_FIELDS} response header fields")
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:  # an interim answer (103 Early Hints): the final one follows
            self.interim, self.raw_headers = True, []
            return
        self.status, self.headers_done = status, True
        # should_keep_alive() is False for `Connection: close` and EOF-framed bodies.
        self.keep = parser.should_keep_alive() and parser.get_http_version() == "1.1"

    def on_body(self, body: bytes) -> None:
        self.parts.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
        else:
            self.complete = True

    # used by the client and the response
    def wait(self) -> asyncio.Future[None]:
        self.waiter = waiter = self.loop.create_future()
        # Until the head is in, `started` stays when the request was sent (`_exchange`):
        # the head has one read timeout in all, so a byte now and then cannot hold it open.
        if self.headers_done:
            self.started = self.loop.time()
        # One timer re-armed lazily from `started`, rather than one per wait: a stream
        # of many small reads then costs a timer per read_timeout, not per read.
        if self.timer is None:
            self.timer = self.loop.call_at(self.started + self.read_timeout, self._on_timer)
        return waiter

    def _on_timer(self) -> None:
        self.timer = None
        if self.waiter is None or self.waiter.done():
            return
        deadline = self.started + self.read_timeout
        if self.loop.time() < deadline:
            self.timer = self.loop.call_at(deadline, self._on_timer)
            return
        if self.write_paused:  # the server is not even reading the request
            self.error = t.WriteTimeout(f"request not drained in {self.read_timeout} s")
        elif not self.headers_done:
            self.error = t.ReadTimeout(f"no response headers within {self.read_timeout} s")
        else:
            self.error = t.ReadTimeout(f"no data from the server for {self.read_timeout} s")
        self.wake()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        # abort(), not close(): a backend generating tokens for a client that left must
        # see the connection go now, not after a TLS close_notify exchange.
        self.keep, self.lost = False, True
        self.cancel_timer()
        self.transport.abort()
        self.gone()

    def gone(self) -> None:
        on_gone, self._on_gone = self._on_gone, None
        if on_gone is not None:
            on_gone(self)
