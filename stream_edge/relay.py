"""The hot path: read the backend's stream and write each event to the client.

Each chunk from the socket is parsed, accounted, encoded and written before the
next one is read — nothing is buffered beyond one network read, so the client sees
a token as soon as the edge does. Backpressure is the transport's: when the client
reads slowly, `emit` waits, we stop reading, and TCP slows the backend.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from stream_edge.meter import Meter
from stream_edge.metrics import EdgeMetrics
from stream_edge.upstream.base import Delta, Failure, StreamParser, UpstreamEvent


@dataclass(frozen=True, slots=True)
class RelayResult:
    status: str  # completed | failed
    error_code: str | None = None
    error_message: str | None = None


async def relay(
    response: httpx.Response,
    parser: StreamParser,
    meter: Meter,
    write: Callable[[UpstreamEvent], bytes],
    emit: Callable[[bytes], Awaitable[None]],
    metrics: EdgeMetrics,
    on_first_token: Callable[[], None],
    after_chunk: Callable[[], None],
) -> RelayResult:
    observe_delay = metrics.relay_delay.observe
    try:
        async for chunk in response.aiter_raw():
            received = time.perf_counter()
            out: list[bytes] = []
            for event in parser.feed(chunk):
                if isinstance(event, Failure):
                    if out:
                        await emit(b"".join(out))
                    return RelayResult("failed", "upstream_error", event.message)
                if isinstance(event, Delta) and meter.first_token_at is None:
                    on_first_token()
                meter.record(event)
                frame = write(event)
                if frame:
                    out.append(frame)
            if out:
                await emit(out[0] if len(out) == 1 else b"".join(out))
                observe_delay(time.perf_counter() - received)
                after_chunk()
    except httpx.TimeoutException:
        return RelayResult("failed", "upstream_timeout", "the backend stopped sending")
    except httpx.HTTPError:
        return RelayResult("failed", "upstream_error", "the backend's stream broke off")
    if not parser.done and meter.finish_reason is None:
        return RelayResult("failed", "upstream_error", "the backend's stream ended early")
    return RelayResult("completed")
