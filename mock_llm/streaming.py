"""Pacing and bookkeeping shared by every wire format the mock speaks.

A format only says how its frames look (`Frames`); `paced` plays a planned answer
through it token by token, honouring the directives (`first_ms`, `delay_ms`,
`drop_after`, `error_after`, `usage`), and `TrackedStream` settles the counters
however the response ends, client disconnect included.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, fields
from typing import Protocol

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from mock_llm.script import Completion, MockBehaviour

# What the vendors send on streams; X-Accel-Buffering stops nginx-style proxies buffering.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class MockStats:
    """Answer counters, read by gateway tests through ``GET /_mock/stats``.

    ``active`` is a gauge of responses in progress; the others only grow until reset.
    An accepted request ends as exactly one of completed, cancelled (client left) or
    failed (``fail``, ``drop_after`` or ``error_after``); one rejected as invalid
    counts in ``requests`` only.
    """

    requests: int = 0
    active: int = 0
    cancelled: int = 0
    completed: int = 0
    failed: int = 0

    def reset(self) -> None:
        # ``active`` is live state, not history: zeroing it would go negative as
        # in-flight streams finish.
        self.requests = self.cancelled = self.completed = self.failed = 0

    def record(self, outcome: str) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)

    def snapshot(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Frames(Protocol):
    """One stream's encoded frames in a vendor's format."""

    def head(self) -> bytes:
        """Sent before the first token (may be empty)."""
        ...

    def token(self, index: int, text: str) -> bytes: ...

    def tail(self) -> bytes:
        """Finish reason, usage (when the behaviour reports it) and end marker."""
        ...

    def error(self) -> bytes:
        """The vendor's own mid-stream error event."""
        ...


class StreamDropped(RuntimeError):
    """Raised mid-stream on purpose (``drop_after``) so the server cuts the connection."""


@dataclass
class Run:
    outcome: str = "cancelled"  # stays so unless the generator reaches its end or fails


async def pause(seconds: float) -> None:
    if seconds > 0:  # a zero sleep would still yield to the loop once per token
        await asyncio.sleep(seconds)


async def paced(
    frames: Frames, completion: Completion, behaviour: MockBehaviour, run: Run
) -> AsyncGenerator[bytes, None]:
    head = frames.head()
    if head:
        yield head
    for index, token in enumerate(completion.tokens):
        if behaviour.drop_after is not None and index >= behaviour.drop_after:
            run.outcome = "failed"
            raise StreamDropped(f"mock: dropping the stream after {index} tokens (drop_after)")
        if behaviour.error_after is not None and index >= behaviour.error_after:
            run.outcome = "failed"
            yield frames.error()
            return
        await pause(behaviour.first_token_delay_s if index == 0 else behaviour.token_delay_s)
        frame = frames.token(index, token)
        if frame:  # a format that sends whole tool calls skips the later fragments
            yield frame
    if behaviour.error_after is not None and behaviour.error_after <= len(completion.tokens):
        run.outcome = "failed"
        yield frames.error()
        return
    yield frames.tail()
    run.outcome = "completed"


class TrackedStream(StreamingResponse):
    """A stream that settles the counters however it ends, client disconnect included.

    Starlette cancels the sending task when the client disconnects; the generator may
    then be parked at a ``yield`` and would only be finalised by the garbage collector,
    so it is closed here explicitly and the outcome recorded at once.
    """

    def __init__(
        self,
        frames: Frames,
        completion: Completion,
        behaviour: MockBehaviour,
        stats: MockStats,
    ) -> None:
        self._run = Run()
        self._frames = paced(frames, completion, behaviour, self._run)
        super().__init__(self._frames, media_type="text/event-stream", headers=STREAM_HEADERS)
        self._stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._stats.active += 1
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._frames.aclose()
            self._stats.active -= 1
            self._stats.record(self._run.outcome)


async def take_as_long_as_a_stream(
    stats: MockStats, completion: Completion, behaviour: MockBehaviour, receive: Receive
) -> None:
    """A non-streaming answer takes as long as the stream would: timeouts stay honest.
    A client that leaves first (`receive` says `http.disconnect`; the body has been
    read) stops it, `cancelled`, as it stops a stream: the answer it is then sent is
    dropped by the server."""
    stats.active += 1
    outcome = "cancelled"
    try:
        steps = len(completion.tokens)
        duration = behaviour.first_token_delay_s + (steps - 1) * behaviour.token_delay_s
        if steps and duration > 0:
            with anyio.move_on_after(duration):
                while (await receive())["type"] != "http.disconnect":
                    pass
                return  # the client left before the answer was ready
        outcome = "completed"
    finally:
        stats.active -= 1
        stats.record(outcome)
