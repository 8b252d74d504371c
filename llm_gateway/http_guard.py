"""What a client may hold before its request starts: header time, header size, and
connections (issue 12.2).

uvicorn's httptools protocol has no header timeout and no header-size cap: a client
that sends one header byte every few seconds (slowloris) keeps its connection, and
descriptor, for as long as it likes, and a client that never ends its header block
grows the process without bound. `GuardedHttpToolsProtocol` adds the three bounds
that nginx has (`client_header_timeout`, `large_client_header_buffers`,
`worker_connections`), so the services are safe to publish without a proxy:

- the request line and headers must arrive within `header_timeout` seconds of the
  connection opening (or of the next request's first byte on a kept-alive
  connection); otherwise the connection is closed;
- at most `max_header_bytes` may be read before the header block ends; more gets a
  431 and the connection is closed (memory grows by at most one read);
- at most `max_connections` connections are open: a new one beyond that evicts the
  oldest connection that has no request in progress (a half-sent header block or an
  idle keep-alive), so an attacker holding the slots cannot lock out real clients;
  when every connection is serving a request, the new one is closed.

Streams are not affected: the bounds stop at the end of the header block. httptools
comes with uvicorn[standard], a dependency; the services always run this protocol.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("llm_gateway.http_guard")

# Descriptors kept back for everything that is not a client connection (the listening
# socket, Redis and database pools, log files).
FD_RESERVE = 64
MIN_CONNECTIONS = 16


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    max_header_bytes: int = 64 * 1024
    max_connections: int = 1000


def connection_cap(wanted: int, fd_soft_limit: int) -> int:
    """`wanted`, lowered so that the process cannot run out of descriptors: each client
    connection may hold a second one (the edge's upstream), plus a reserve. A cap above
    the descriptor limit protects nothing: accept() fails first, /healthz with it."""
    if fd_soft_limit <= 0 or fd_soft_limit == resource.RLIM_INFINITY:
        return wanted
    return min(wanted, max(MIN_CONNECTIONS, (fd_soft_limit - FD_RESERVE) // 2))


def fd_soft_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


REFUSED_HEADERS = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 35\r\n"
    b"connection: close\r\n\r\n"
    b"Request header fields are too large"
)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header timeout, a header-size cap and a
    connection cap (module docstring)."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        # uvicorn builds the access line's arguments (client address, quoted path) on
        # every response whenever the logger has a handler, before `info` drops the
        # record below INFO (LLMGW_LOG_LEVEL=WARNING); decided here, per connection, so
        # a level set later still applies to the next connections.
        if self.access_log and not self.access_logger.isEnabledFor(logging.INFO):
            self.access_log = False
        # Between requests (and before the first): the next header block may come.
        self.awaiting_headers = True
        self.header_bytes = 0
        self.awaiting_since = self.loop.time()
        self.header_timer: asyncio.TimerHandle | None = None

    # Connection cap -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and not self._evict_one():
            log.debug("connection refused: %d connections, none idle", len(self.connections))
            transport.close()
            return
        self._start_header_timer()

    def _idle(self) -> bool:
        """No request in progress: nothing would be lost by closing."""
        return self.awaiting_headers and (self.cycle is None or self.cycle.response_complete)

    def _evict_one(self) -> bool:
        idle = [
            c
            for c in self.connections
            if c is not self
            and isinstance(c, GuardedHttpToolsProtocol)
            and c._idle()
            and not c.transport.is_closing()
        ]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.awaiting_since)
        log.debug("connection cap reached: closing the longest-idle connection")
        oldest.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    # Header time -------------------------------------------------------------------

    def _start_header_timer(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(
                self.limits.header_timeout, self._header_timeout
            )

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timeout(self) -> None:
        self.header_timer = None
        if self.awaiting_headers and not self.transport.is_closing():
            log.debug("closing a connection whose headers did not arrive in time")
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_header_timer()  # a kept-alive connection's next request

    def on_headers_complete(self) -> None:
        self.awaiting_headers = False
        self.header_bytes = 0
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.awaiting_headers = True
        self.awaiting_since = self.loop.time()

    # Header size -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.awaiting_headers:
            self.header_bytes += len(data)
        super().data_received(data)
        if (
            self.awaiting_headers
            and self.header_bytes > self.limits.max_header_bytes
            and not self.transport.is_closing()
        ):
            self.transport.write(REFUSED_HEADERS)
            self.transport.close()


def http_protocol(limits: ConnectionLimits) -> Any:
    """uvicorn's `http=` for these limits (a picklable partial: `--workers` sends the
    config to its worker processes)."""
    capped = ConnectionLimits(
        header_timeout=limits.header_timeout,
        max_header_bytes=limits.max_header_bytes,
        max_connections=connection_cap(limits.max_connections, fd_soft_limit()),
    )
    return functools.partial(GuardedHttpToolsProtocol, limits=capped)
