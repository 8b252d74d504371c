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
- at most `max_header_bytes` may be read before the header block ends, in at most
  `MAX_HEADER_FIELDS` fields, and as much again of a chunked body's trailer block
  (its fields counted with the header block's); more gets a 431 and the connection
  is closed (memory grows by at most one read, and no field past the limit is kept);
- the body must arrive within `body_deadline` of the header block's end: the header
  timeout again plus its size at `MIN_BODY_RATE` (the declared size, or the largest
  body an app reads when it is chunked). Otherwise the client gets a 408 (when no
  response has started) and the connection is closed, at the first deadline after
  any response under way has ended: nothing else times a body, and the app would
  wait for it for ever;
- a client must read what it is sent: once its connection's writes are paused (the
  kernel's buffers toward it are full) for `send_timeout` seconds, the connection is
  aborted (nginx's `send_timeout`); nothing else times a response, and a client that
  pipelines requests for a large answer and never reads would hold its connection,
  and the app's task, for ever;
- at most `max_connections` connections are open: a new one beyond that evicts the
  connection that has waited longest with nothing to lose (a half-sent header block,
  a body that has not arrived, an idle keep-alive), so an attacker holding the slots
  cannot lock out real clients; failing that, the one whose client has read nothing
  for longest, past `stall_grace` (a response under way, but to a client that is
  not taking it: at the cap, a client that reads comes first). Any other connection
  whose response is under way (a stream) is never evicted, and when every
  connection has one the new one is closed.

It also lets an app cut its client on purpose (`shared.asgi_abort`: a slow client, a
superseded resume follower stuck in a send) without uvicorn reporting the response it
left unfinished as an ERROR, as it does for an app that returns mid-response by
mistake.

Streams are not affected: the bounds stop once the request has arrived. httptools
comes with uvicorn[standard], a dependency; the services always run this protocol.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import resource
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from shared.asgi_abort import ABORT, abort_extension

log = logging.getLogger("llm_gateway.http_guard")

# Descriptors kept back for everything that is not a client connection (the listening
# socket, Redis and database pools, log files).
FD_RESERVE = 64
MIN_CONNECTIONS = 16

# A body's deadline: the header timeout plus its size at 16 KiB/s (128 kbit/s, a poor
# mobile uplink), counting at most the largest body an app reads (the control plane's
# internal calls, 2 MiB): 2 MiB on such a link fits in 128 s. Generous on purpose: the
# connection cap, not this deadline, is what keeps waiting bodies from locking real
# clients out; the deadline only stops any one of them living for ever.
MIN_BODY_RATE = 16 * 1024
MAX_BODY_BYTES = 2 * 1024 * 1024

# The header fields a request may have (Apache's `LimitRequestFields`; a browser sends
# 20 to 40, as the edge's own client takes from a backend, `http1_connection`).
# uvicorn keeps each field as it arrives, a tuple of two bytes objects: 64 KiB of
# 4-byte fields (`a:`) held 1.9 MiB a connection, 30 times their size, for the header
# timeout, and the byte cap cannot go under the largest stream token.
MAX_HEADER_FIELDS = 100


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    max_header_bytes: int = 64 * 1024
    max_connections: int = 1000
    # Longer than the edge's slow-client cut (10 s by default, see `limits_of`), which
    # ends a stream to a client that stopped reading with its own `slow_client` outcome.
    send_timeout: float = 60.0
    stall_grace: float = 5.0


def connection_cap(wanted: int, fd_soft_limit: int) -> int:
    """`wanted`, lowered so that the process cannot run out of descriptors: each client
    connection may hold a second one (the edge's upstream), plus a reserve. A cap above
    the descriptor limit protects nothing: accept() fails first, /healthz with it."""
    if fd_soft_limit <= 0 or fd_soft_limit == resource.RLIM_INFINITY:
        return wanted
    return min(wanted, max(MIN_CONNECTIONS, (fd_soft_limit - FD_RESERVE) // 2))


def fd_soft_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def body_deadline(header_timeout: float, content_length: bytes | None) -> float:
    """Seconds a body may take after its header block (module docstring). A chunked
    body (no length) or a malformed length counts as the largest one."""
    size = MAX_BODY_BYTES
    if content_length is not None and content_length.isdigit():
        size = min(int(content_length), MAX_BODY_BYTES)
    return header_timeout + size / MIN_BODY_RATE


REFUSED_HEADERS = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 35\r\n"
    b"connection: close\r\n\r\n"
    b"Request header fields are too large"
)

BODY_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 40\r\n"
    b"connection: close\r\n\r\n"
    b"The request body did not arrive in time."
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
        # A field past `MAX_HEADER_FIELDS` came: nothing more of this connection is
        # kept or dispatched, and the read that brought it is answered 431.
        self.too_many_fields = False
        # After a chunk's size line until its first byte: the last chunk's (size 0)
        # trailer block, which comes after the header block and its byte count.
        self.in_trailers = False
        self.trailer_bytes = 0
        self.awaiting_since = self.loop.time()
        self.header_timer: asyncio.TimerHandle | None = None
        # From the end of a header block to the end of its body.
        self.awaiting_body = False
        self.body_timer: asyncio.TimerHandle | None = None
        # Since when the client has not taken what we write (None: it keeps up).
        self.write_paused_since: float | None = None
        self.send_timer: asyncio.TimerHandle | None = None

    # Connection cap -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and not self._evict_one():
            log.debug("connection refused: %d connections, none idle", len(self.connections))
            transport.close()
            return
        self._start_header_timer()

    def _response_under_way(self) -> bool:
        # A pipelined request waits in `pipeline` while the one before it is answered.
        cycle = self.cycle
        started = cycle is not None and cycle.response_started and not cycle.response_complete
        return started or bool(self.pipeline)

    def _evictable(self) -> bool:
        """Nothing would be lost by closing: no response under way, and the request,
        if any, has not all arrived (the app cannot have acted on it yet)."""
        if self._response_under_way():
            return False
        if self.awaiting_body:
            return True
        return self.awaiting_headers and (self.cycle is None or self.cycle.response_complete)

    def _stalled_since(self, now: float) -> float | None:
        """When the client stopped reading, if that was `stall_grace` ago or more."""
        since = self.write_paused_since
        if since is None or now - since < self.limits.stall_grace:
            return None
        return since

    def _evict_one(self) -> bool:
        others = [
            c for c in self.connections if c is not self and isinstance(c, GuardedHttpToolsProtocol)
        ]
        waiting = [c for c in others if c._evictable() and not c.transport.is_closing()]
        if waiting:
            oldest = min(waiting, key=lambda c: c.awaiting_since)
            log.debug("connection cap reached: closing the longest-waiting connection")
            oldest.transport.close()
            return True
        # A closing one counts too: `close` waits for its unread bytes to leave.
        now = self.loop.time()
        stalled = [(since, c) for c in others if (since := c._stalled_since(now)) is not None]
        if not stalled:
            return False
        _, slowest = min(stalled, key=lambda pair: pair[0])
        log.debug("connection cap reached: aborting the connection that reads nothing")
        # Aborted, not closed: a close would keep it open until its client read the rest.
        slowest.transport.abort()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()
        self._cancel_send_timer()
        super().connection_lost(exc)

    # Send time ---------------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        self.write_paused_since = self.loop.time()
        if self.send_timer is None:
            self.send_timer = self.loop.call_later(self.limits.send_timeout, self._send_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        self.write_paused_since = None
        self._cancel_send_timer()

    def _cancel_send_timer(self) -> None:
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None

    def _send_timeout(self) -> None:
        self.send_timer = None
        if self.write_paused_since is not None:
            log.debug("aborting a connection whose client read nothing in time")
            self.transport.abort()

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

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= MAX_HEADER_FIELDS:
            self.too_many_fields = True
        if not self.too_many_fields:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.too_many_fields:
            return  # refused once the read is parsed (`data_received`)
        self.awaiting_headers = False
        self.header_bytes = 0
        self._cancel_header_timer()
        super().on_headers_complete()
        # An upgrade (WebSocket) hands the transport to another protocol.
        if not (self.parser.should_upgrade() and self._should_upgrade()):
            self.awaiting_body = True
            self.awaiting_since = self.loop.time()
            cut = abort_extension(functools.partial(self._abort_cycle, self.cycle))
            self.scope.setdefault("extensions", {})[ABORT] = cut

    # A cut on purpose --------------------------------------------------------------

    def _abort_cycle(self, cycle: RequestResponseCycle) -> None:
        """The app cuts its client (`shared.asgi_abort`): a response it will not finish,
        to a client it will not wait on. Marked gone as a disconnect marks it, so
        uvicorn does not report an unfinished response (an ERROR meant for app bugs);
        aborted, not closed, as a close would wait for the client to read the rest."""
        if cycle.response_complete or cycle.disconnected:
            return  # its response is over: the connection may serve another by now
        cycle.disconnected = True
        cycle.message_event.set()
        log.debug("aborting a connection the app cut on purpose")
        self.transport.abort()

    def on_chunk_header(self) -> None:
        self.in_trailers = True

    def on_chunk_complete(self) -> None:
        self.in_trailers, self.trailer_bytes = False, 0

    def on_body(self, body: bytes) -> None:
        self.in_trailers = False
        if not self.too_many_fields:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.too_many_fields:
            return
        super().on_message_complete()
        self.awaiting_body = False
        self._cancel_body_timer()
        self.awaiting_headers = True
        self.awaiting_since = self.loop.time()

    # Body time ---------------------------------------------------------------------

    def _start_body_timer(self) -> None:
        length = next((v for k, v in self.headers if k == b"content-length"), None)
        self.body_timer = self.loop.call_later(
            body_deadline(self.limits.header_timeout, length), self._body_timeout
        )

    def _cancel_body_timer(self) -> None:
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None

    def _body_timeout(self) -> None:
        self.body_timer = None
        if not self.awaiting_body or self.transport.is_closing():
            return
        if self._response_under_way():
            # Never cut a stream (nor write into it): look again once more time passes.
            self._start_body_timer()
            return
        cycle = self.cycle
        if not cycle.response_started:
            self.transport.write(BODY_TIMED_OUT)
            # The app, still waiting in receive(), now sees a disconnect and any
            # answer it sends is dropped (as uvicorn does when the client leaves).
            cycle.disconnected = True
            cycle.message_event.set()
        log.debug("closing a connection whose body did not arrive in time")
        self.transport.close()

    # Header size -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.awaiting_headers:
            self.header_bytes += len(data)
        trailing = self.in_trailers
        super().data_received(data)
        if trailing and self.in_trailers:  # a read of trailers only
            self.trailer_bytes += len(data)
        # Armed after the parse, not in on_headers_complete: a request whose body came
        # in the same read (most of them) never needs a timer.
        if self.awaiting_body and self.body_timer is None and not self.transport.is_closing():
            self._start_body_timer()
        too_large = (
            self.awaiting_headers and self.header_bytes > self.limits.max_header_bytes
        ) or self.trailer_bytes > self.limits.max_header_bytes
        if (too_large or self.too_many_fields) and not self.transport.is_closing():
            self.transport.write(REFUSED_HEADERS)
            self.transport.close()


def http_protocol(limits: ConnectionLimits) -> Any:
    """uvicorn's `http=` for these limits (a picklable partial: `--workers` sends the
    config to its worker processes)."""
    capped = dataclasses.replace(
        limits, max_connections=connection_cap(limits.max_connections, fd_soft_limit())
    )
    return functools.partial(GuardedHttpToolsProtocol, limits=capped)
