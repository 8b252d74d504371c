"""The hot path: read the backend's stream and write each event to the client.

Each chunk from the socket is parsed, accounted, encoded and written before the
next one is read — nothing is buffered beyond one network read, so the client sees
a token as soon as the edge does. Backpressure is the transport's: when the client
reads slowly, `emit` waits, we stop reading, and TCP slows the backend (see
`streaming.py` for when a slow client is cut off). Where the events go is one small
interface, `RelaySink`: the job's pump in service (`pump.py`), a recording one in tests.

Three clocks bound a stream: the first token must come within `first_token`, then
no gap between chunks may exceed `idle`, and no stream outlives `max_life`. A token
here is output the vendor bills: text, a tool call, streamed reasoning, or a running
count of hidden thinking (Gemini's `OutputSoFar`); a model that thinks longer than
`first_token` is answering, not stalled. One
`asyncio.timeout` is re-armed as chunks arrive rather than a timer per read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

from shared.webhooks import MAX_TOKENS_REPORTED
from stream_edge.meter import Meter
from stream_edge.metrics import EdgeMetrics
from stream_edge.transport import Response, Timeout, TransportError
from stream_edge.upstream.base import (
    Delta,
    Failure,
    OutputLimit,
    OutputSoFar,
    ReasoningDelta,
    StreamParser,
    ToolCallDelta,
    UpstreamEvent,
)

# Why a stream whose backend generated past what was asked of it ends (`output_cap`).
PAST_MAX_TOKENS = "the backend generated more than the request's max_tokens"


def output_cap(max_tokens: int) -> int:
    """The most output events (deltas of text, reasoning or a tool call) and the
    highest running count of its output a backend asked for `max_tokens` may send
    before its stream is ended (and its request closed, which stops the vendor).
    Settlement never charges past the hold, which covers `max_tokens` output: a
    vendor generating past it (a chain of thought outside `max_tokens`, as
    DeepSeek's `deepseek-reasoner` documented, or a server ignoring it) was paid for
    all of it, the member charged the hold. An honest vendor sends at most an event
    per token it generates (a delta holds one token or more; parsers drop empty
    ones), so twice `max_tokens` plus 16, room for a vendor splitting a token we
    cannot see, is never reached by one."""
    return 2 * max_tokens + 16


@dataclass(frozen=True, slots=True)
class RelayResult:
    status: str  # completed | failed
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True, slots=True)
class Deadlines:
    first_token: float
    idle: float
    max_life: float


class RelaySink(Protocol):
    """Where the relayed stream goes. `write` and `emit` run for every event and chunk:
    an implementation may make them the writer's and the response's own callables
    (attributes, not wrapping methods), so the hot path calls nothing extra."""

    def write(self, event: UpstreamEvent) -> bytes:
        """The client's frame for `event` (empty: nothing to send for it)."""
        ...

    def emit(self, data: bytes) -> Awaitable[None]:
        """Send frames to the client; waits while the client reads slowly."""
        ...

    def first_token(self) -> None:
        """Once, after the chunk holding the stream's first token was sent."""
        ...

    def chunk_sent(self) -> None:
        """After each chunk that sent the client something."""
        ...


async def relay(
    response: Response,
    parser: StreamParser,
    meter: Meter,
    sink: RelaySink,
    metrics: EdgeMetrics,
    deadlines: Deadlines,
    max_tokens: int | None = None,
) -> RelayResult:
    """`max_tokens`: what the backend was asked for; past its `output_cap` the
    stream ends as on the backend's failure (None: no cap, for tests of the clocks)."""
    # Bound once: per chunk, a local call as cheap as the callbacks these replaced.
    write, emit, chunk_sent = sink.write, sink.emit, sink.chunk_sent
    most = output_cap(max_tokens) if max_tokens is not None else MAX_TOKENS_REPORTED
    loop = asyncio.get_running_loop()
    started = loop.time()
    hard_stop = started + deadlines.max_life
    observe_delay = metrics.relay_delay.observe
    waiting_for = "first token"
    # Whether the backend has started its output (`answering` below): the idle clock.
    answering = False
    slack = min(1.0, deadlines.idle / 10)
    armed_at = started - slack
    try:
        async with asyncio.timeout_at(min(started + deadlines.first_token, hard_stop)) as clock:
            async for chunk in response.aiter_raw():
                received = time.perf_counter()
                out: list[bytes] = []
                first_token = False
                for event in parser.feed(chunk):
                    if not isinstance(event, Failure):
                        # Streamed reasoning is output the client reads: a token for
                        # the first-token clock, or a model thinking longer than it
                        # fails.
                        if meter.first_token_at is None and isinstance(
                            event, Delta | ToolCallDelta | ReasoningDelta
                        ):
                            first_token = answering = True
                            waiting_for = "next token"
                        elif not answering and isinstance(event, OutputSoFar):
                            # Hidden thinking, counted as it grows: the client reads
                            # nothing yet (no first token for its metric), but the
                            # backend is answering, and cutting it now would leave
                            # the thinking paid to the vendor and the member served
                            # an error.
                            answering = True
                            waiting_for = "next token"
                        meter.record(event)
                        try:
                            if meter.deltas > most or meter.output_floor > most:
                                raise OutputLimit(PAST_MAX_TOKENS)
                            frame = write(event)
                        except OutputLimit as exc:
                            # More than the client's writer may hold, or than the
                            # backend was asked for (billed above): the stream ends
                            # as on the backend's own failure.
                            event = Failure(exc.message)
                        else:
                            if frame:
                                out.append(frame)
                            continue
                    # The backend failed, or sent more than its client's writer holds.
                    if out:
                        await emit(b"".join(out))
                        observe_delay(time.perf_counter() - received)
                    if first_token:  # the tokens before the failure had a first one
                        sink.first_token()
                    return RelayResult("failed", "upstream_error", event.message)
                if out:
                    await emit(out[0] if len(out) == 1 else b"".join(out))
                    observe_delay(time.perf_counter() - received)
                    chunk_sent()
                if first_token:
                    # Bookkeeping after the client has the token, not before it.
                    sink.first_token()
                if answering:
                    now = loop.time()
                    # Re-arming the timer costs a heap operation; doing it at most
                    # once per `slack` keeps the idle limit within 10% of its setting.
                    if now - armed_at >= slack:
                        armed_at = now
                        clock.reschedule(min(now + deadlines.idle, hard_stop))
    except TimeoutError:
        if loop.time() >= hard_stop:
            return RelayResult(
                "failed", "upstream_timeout", "the stream reached its maximum length"
            )
        return RelayResult(
            "failed", "upstream_timeout", f"the backend sent no {waiting_for} in time"
        )
    except Timeout:
        return RelayResult("failed", "upstream_timeout", "the backend stopped sending")
    except TransportError:
        return RelayResult("failed", "upstream_error", "the backend's stream broke off")
    if not parser.done and meter.finish_reason is None:
        return RelayResult("failed", "upstream_error", "the backend's stream ended early")
    return RelayResult("completed")
