"""An ASGI response for event streams that notices the client leaving.

Starlette's `StreamingResponse` only learns of a disconnect when a write fails, and
uvicorn silently drops writes after a disconnect, so a stream waiting on a slow
backend would never notice. Here a watcher task reads `http.disconnect` and cancels
the producer at once (which closes the upstream request) — or, for resumable
streams, first waits for a reconnect (`linger`). A watchdog writes a `: ping`
comment when the stream has been idle and cuts off a client that has not read for
`slow_client_timeout` (the transport's bounded buffer is full and `send` is stuck).
`on_finish(outcome)` runs afterwards, shielded, so the usage report is written even
when the client is gone.

Outcomes: `finished` (the producer returned), `client_gone`, `slow_client`,
`aborted` (the edge is shutting down) and `revoked` (see `abort`). `detach` ends the
client's response as if the client had left: a stream that lingers for a reconnect
(the producer of a resumable stream) goes on; any other (a resume follower) stops at
once. `Streamed` serves one as a Starlette response that shutdown, revocation and a
superseding reconnect can reach.

What one response holds is bounded in bytes: a body goes to the server in slices of
`SEND_SLICE`, because uvicorn puts each `send` into the connection's buffer whole and
only waits for the client before the next one. A 16 MiB catch-up handed over in one
piece sat in memory until the client read it, or the connection was dropped a minute
later; in slices, a client that reads nothing holds the transport's high-water mark
(64 KiB) plus one slice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from shared.asgi_abort import abort_connection
from shared.tokens import StreamGrant
from stream_edge.live_connections import LiveConnections
from stream_edge.state import RunningStream

Emit = Callable[[bytes], Awaitable[None]]

STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
PING = b": ping\n\n"
SEND_SLICE = 64 * 1024


class EventStreamResponse:
    def __init__(
        self,
        produce: Callable[[Emit], Awaitable[None]],
        on_finish: Callable[[str], Awaitable[None]],
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        ping_interval: float = 15.0,
        slow_client_timeout: float = 10.0,
        linger: Callable[[], Awaitable[None]] | None = None,
        finish_timeout: float = 10.0,
        detachable: bool = False,
    ) -> None:
        self._produce = produce
        self._on_finish = on_finish
        self._headers = STREAM_HEADERS + (headers or [])
        self._ping_interval = ping_interval
        self._slow_client_timeout = slow_client_timeout
        self._linger = linger
        self._finish_timeout = finish_timeout
        self._scope: anyio.CancelScope | None = None
        self._abort_frame = b""
        self.outcome = "finished"
        self.connected = True
        self._detachable = detachable
        self._detached = asyncio.Event()
        # Detached with nothing to carry on for: nothing more is written.
        self._stopped = False
        # A body is half sent (its slices cut off): an event written now would be
        # glued to half of another.
        self._torn = False

    def abort(self, final_frame: Callable[[], bytes | None], outcome: str = "aborted") -> None:
        """End the stream now with the frame `final_frame()` makes (e.g. an `error`
        event), made only when this ends the stream. A revocation ends it even after
        its client left: a resumable stream runs on for a reconnect (`linger`), and a
        revoked one must not, for a follower or for nobody.

        Too late once the stream has ended by itself: after the producer returned, or
        when `final_frame()` says None (its last event is written, and only its
        delivery or clean-up is left). The outcome stays what it was, and no `error`
        follows the `complete` a client or a resume log already has."""
        if self._scope is None:
            return
        lingering = self._linger is not None and self.outcome == "client_gone"
        if self.outcome == "finished" or (outcome == "revoked" and lingering):
            frame = final_frame()
            if frame is None:
                return
            self.outcome = outcome
            self._abort_frame = frame
            self._scope.cancel()

    def detach(self) -> None:
        """End the client's response now and carry on as if it had left (only for a
        response made `detachable`): cleanly, unless a send to the client is stuck
        (then the connection is cut: that client is not reading what it has)."""
        self._detached.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        last_write = time.monotonic()
        # One body send at a time, a sliced body's slices together: a ping, the
        # producer's frames and `watch_detach`'s clean end each wait for the send
        # before them, so nothing lands between two slices of a frame or after the
        # response's end. (A ping stuck on a stalled client once finished mid-frame and
        # cleared the one "send in progress" mark, and a reconnect then ended the
        # response between two slices.)
        sending = asyncio.Lock()
        # When the send in progress began (None: none is). Only `sending`'s holder sets
        # and clears it, so it always times that one send.
        send_started: float | None = None
        # Emits waiting for `sending` or holding it: the watchdog pings only when none
        # is, so a ping never waits behind (and is never timed with) a producer's send.
        in_flight = 0

        def cut() -> None:
            # A client we will not wait on (stuck in a send): nothing more is written
            # to it, and the server aborts its connection now, as for a client that
            # left (`shared.asgi_abort`), rather than report an unfinished response.
            self.connected = False
            abort_connection(scope)

        def gone() -> None:
            # A write found the client gone before `watch_disconnect` heard it leave.
            # A resumable stream goes on for a reconnect (`watch_disconnect` lingers,
            # then cancels); any other stream stops now.
            self.connected = False
            if self.outcome == "finished":
                self.outcome = "client_gone"
            if self._linger is None and self._scope is not None:
                self._scope.cancel()

        async def emit_sliced(data: bytes) -> None:
            nonlocal send_started
            self._torn = True
            for start in range(0, len(data), SEND_SLICE):
                # Set before each slice, never cleared in between: `watch_detach`
                # must not end the response between two halves of a frame.
                send_started = time.monotonic()
                piece = data[start : start + SEND_SLICE]
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            self._torn = False

        def may_write() -> bool:
            # Once aborted, nothing but the abort's own frame goes out: a producer may
            # write on until the cancellation reaches it, and its frames would follow
            # the final `error` event (a follower's numbered before them).
            return self.connected and not self._abort_frame and not self._stopped

        async def emit(data: bytes) -> None:
            nonlocal last_write, send_started, in_flight
            if not data or not may_write():
                return
            in_flight += 1
            try:
                async with sending:
                    if not may_write():  # the send waited on ended the response
                        return
                    try:
                        if len(data) <= SEND_SLICE:
                            send_started = time.monotonic()
                            await send(
                                {"type": "http.response.body", "body": data, "more_body": True}
                            )
                        else:
                            await emit_sliced(data)
                    except OSError:
                        gone()
                        return
                    finally:
                        send_started = None
                    last_write = time.monotonic()
            finally:
                in_flight -= 1

        async def watch_disconnect(producer: anyio.CancelScope) -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
            self.connected = False
            if self.outcome == "finished":
                self.outcome = "client_gone"
            try:
                if self._linger is not None:
                    await self._linger()
            finally:
                # Whatever ended the wait (a failure included): nobody is reading.
                producer.cancel()

        async def watch_detach(producer: anyio.CancelScope) -> None:
            await self._detached.wait()
            if self._linger is None:
                # Nothing goes on without this client (a resume follower superseded by
                # a reconnect): stop now, before it reads or writes another frame. The
                # response then ends cleanly (`__call__`), unless a send is stuck: that
                # client is behind on what it has, so it is cut, never waited on.
                self._stopped = True
                if send_started is not None:
                    cut()
                producer.cancel()
                return
            async with sending:  # after the send in progress: never two at once
                if not self.connected:
                    return
                self.connected = False  # from here on `emit` writes nothing
                with anyio.move_on_after(self._slow_client_timeout, shield=True) as ending:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            if ending.cancelled_caught:
                cut()

        def too_slow(producer: anyio.CancelScope) -> None:
            cut()
            self.outcome = "slow_client"
            producer.cancel()

        async def watchdog(producer: anyio.CancelScope) -> None:
            tick = min(self._ping_interval, self._slow_client_timeout) / 4
            while True:
                await asyncio.sleep(tick)
                now = time.monotonic()
                if send_started is not None and now - send_started > self._slow_client_timeout:
                    too_slow(producer)
                    return
                if self.connected and in_flight == 0 and now - last_write >= self._ping_interval:
                    # Bounded like any other send: while its own ping is stuck the
                    # watchdog does not tick, and nothing else would notice a client
                    # that reads nothing (nor let a reconnect's clean end through).
                    with anyio.move_on_after(self._slow_client_timeout) as pinging:
                        await emit(PING)
                    if pinging.cancelled_caught:
                        too_slow(producer)
                        return
                    if not self.connected:  # the client is gone (`gone`)
                        return

        # The watchers are plain asyncio tasks around one cancel scope for the
        # producer, not an anyio task group: a task group costs a stream ~70 µs of
        # CPU (its tasks, its scope, cancellation delivered over several loop
        # iterations) where these cost two `create_task` and two `cancel`. The scope
        # stays anyio's so the producer's shielded clean-up (closing the backend
        # request, the last checkpoint) still runs to the end when it is cancelled.
        watchers: list[asyncio.Task[None]] = []
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self._headers})
            with anyio.CancelScope() as producer:
                self._scope = producer
                watchers.append(asyncio.create_task(watch_disconnect(producer)))
                watchers.append(asyncio.create_task(watchdog(producer)))
                if self._detachable:  # resumable streams only: one task fewer otherwise
                    watchers.append(asyncio.create_task(watch_detach(producer)))
                await self._produce(emit)
            self._scope = None  # the producer is over: an abort now changes nothing
            for task in watchers:
                task.cancel()
            if self.connected:
                # Bounded: a client that reads nothing does not keep this response
                # open (it is cut, with at most a slice past the high-water mark
                # still in its buffer).
                with anyio.move_on_after(self._slow_client_timeout) as ending:
                    if self._abort_frame:
                        frame, self._abort_frame = self._abort_frame, b""
                        # After half a frame the client sees the stream end mid-event,
                        # which EventSource drops (WHATWG SSE), and reconnects.
                        if not self._torn:
                            await emit(frame)
                    async with sending:  # after a cancelled watcher's send unwinds
                        if self.connected:
                            await send(
                                {"type": "http.response.body", "body": b"", "more_body": False}
                            )
                if ending.cancelled_caught:
                    cut()
        except OSError:
            self.connected = False
            if self.outcome == "finished":
                self.outcome = "client_gone"
        finally:
            self._scope = None
            for task in watchers:
                task.cancel()
            with anyio.move_on_after(self._finish_timeout, shield=True):
                await self._on_finish(self.outcome)


class Streamed(Response):
    """Serves an `EventStreamResponse` as a Starlette response. While it runs it is in
    the app's `active` set, so a shutdown can end it (`shut_down`) and the process's
    revocation watcher can (`revoke`, `supersede`: see revocation_watch.py).
    `final_frame(code, message)` makes the closing error frame only when needed (an
    EventSource frame takes the next event id), or says None when the stream has
    already written its last event (`EventStreamResponse.abort`). `live`: the store
    key naming the stream's one live connection and this connection's id in it (None:
    the first connection, which has none), for resumable streams, registered in
    `connections` while it runs so that a reconnect on this edge supersedes it at
    once."""

    def __init__(
        self,
        active: set[RunningStream],
        inner: EventStreamResponse,
        grant: StreamGrant | None,
        final_frame: Callable[[str, str], bytes | None],
        live: tuple[str, bytes | None] | None = None,
        connections: LiveConnections | None = None,
    ) -> None:
        self._active = active
        self._inner = inner
        self.grant = grant
        self._final_frame = final_frame
        self.live = live
        self._connections = connections

    def shut_down(self) -> None:
        self._inner.abort(
            lambda: self._final_frame("shutting_down", "the edge is restarting; reconnect or retry")
        )

    def revoke(self) -> None:
        self._inner.abort(
            lambda: self._final_frame("revoked", "access to this stream was revoked"),
            outcome="revoked",
        )

    def supersede(self) -> None:
        """A reconnect took over: end this client's response (the stream itself goes
        on for the new connection)."""
        self._inner.detach()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._active.add(self)
        registry, live = self._connections, self.live
        if registry is not None and live is not None and not registry.attach(*live, self):
            self.supersede()  # a later reconnect took the stream before this one started
        try:
            await self._inner(scope, receive, send)
        finally:
            self._active.discard(self)
            if registry is not None and live is not None:
                registry.release(live[0], self)
