"""An ASGI response for event streams that notices the client leaving.

Starlette's `StreamingResponse` only learns of a disconnect when a write fails, and
uvicorn silently drops writes after a disconnect, so a stream waiting on a slow
backend would never notice. Here a watcher task reads `http.disconnect` and cancels
the producer at once (which closes the upstream request), a pinger writes a `: ping`
comment when the stream has been idle, and `on_finish` runs afterwards, shielded, so
the usage report is written even when the client is gone.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
from starlette.types import Receive, Scope, Send

Emit = Callable[[bytes], Awaitable[None]]

STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
PING = b": ping\n\n"


class EventStreamResponse:
    def __init__(
        self,
        produce: Callable[[Emit], Awaitable[None]],
        on_finish: Callable[[bool], Awaitable[None]],
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        ping_interval: float = 15.0,
        finish_timeout: float = 10.0,
    ) -> None:
        self._produce = produce
        self._on_finish = on_finish
        self._headers = STREAM_HEADERS + (headers or [])
        self._ping_interval = ping_interval
        self._finish_timeout = finish_timeout
        self.client_gone = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        last_write = time.monotonic()

        async def emit(data: bytes) -> None:
            nonlocal last_write
            if data:
                await send({"type": "http.response.body", "body": data, "more_body": True})
                last_write = time.monotonic()

        async def watch_disconnect(scope_: anyio.CancelScope) -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.client_gone = True
                    scope_.cancel()
                    return

        async def ping() -> None:
            while True:
                idle = time.monotonic() - last_write
                if idle >= self._ping_interval:
                    await emit(PING)
                    idle = 0.0
                await anyio.sleep(self._ping_interval - idle)

        try:
            await send({"type": "http.response.start", "status": 200, "headers": self._headers})
            async with anyio.create_task_group() as group:
                group.start_soon(watch_disconnect, group.cancel_scope)
                group.start_soon(ping)
                try:
                    await self._produce(emit)
                finally:
                    group.cancel_scope.cancel()
            if not self.client_gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            self.client_gone = True
        finally:
            with anyio.move_on_after(self._finish_timeout, shield=True):
                await self._on_finish(self.client_gone)
