"""A non-streamed answer (`"stream": false`): the backend's whole body, read, parsed
by the backend's adapter and accounted on its meter.

The edge asks every backend for a whole answer as a stream (`StreamJob.whole_answer`)
and joins it here (`StreamAnswer`): a vendor sends a JSON answer's headers only once
it is generated, and a long one took longer than the edge waits for headers
(`LLMGW_UPSTREAM_READ_TIMEOUT`, 120 s), so the edge gave up with nothing read, billed
nothing and moved to the chain's fallback, while the vendor billed the answer it
went on generating. Streamed, the first token comes at once and every token read is
billed; a backend that answers with one JSON document anyway is read as before.

An answer that fails once the backend has generated it (longer than we read, past the
stream's maximum life, malformed, its connection broken) was still generated, and
the vendor bills it: the meter is given what was read (`bill_unread`), so the report
bills the input estimate and the output that could be in it, `failed` and
`estimated`, as a cut stream is billed. Nothing read, nothing billed (DESIGN §9).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

from stream_edge.attempts import Backend
from stream_edge.errors import UpstreamError
from stream_edge.meter import Meter
from stream_edge.relay import PAST_MAX_TOKENS, output_cap
from stream_edge.transport import Response, TransportError, read_at_most
from stream_edge.upstream.base import Completion, Failure, UpstreamEvent, parser_for
from stream_edge.upstream.stream_answer import AnswersAsStream, StreamAnswer

# The most of an answer parsed between two turns of the event loop: some 2,700
# in-house SSE events, a few ms of parsing; small answers never wait for a turn.
PARSE_SLICE = 64 * 1024
# The largest whole answer read; past it the answer is a 502, its connection closed.
# Room for the longest answers: an in-house SSE backend sends `stream: false` answers
# as a whole stream, some 200 bytes a token, so 16k tokens come to about 3 MiB.
MAX_COMPLETION_BYTES = 8 * 1024 * 1024
_DOCUMENT = re.compile(rb"\s*[{\[]")


async def read_completion(
    response: Response, backend: Backend, follow: Callable[[Meter], None] | None = None
) -> Completion:
    """Raise `UpstreamError` when the answer cannot be read or understood; the
    response is closed either way, and what was read of a failed answer is billed.
    `follow`: given the meter that counts what is read as it is read (the stream's
    checkpoints bill it should the edge die meanwhile)."""
    answer = _stream_answer(response, backend)
    adapter = backend.adapter
    assert adapter is not None  # opening refused a provider without one
    tally = _Tally(backend.meter)
    if follow is not None and answer is not None:
        follow(tally.meter)
    parts: list[bytes] = []
    try:
        if answer is None:
            body, longer = await read_at_most(response, MAX_COMPLETION_BYTES, parts)
            if longer:
                raise _too_long()
            completion = adapter.parse_completion(body, backend.credentials)
        else:
            completion = await _read_stream(
                response, answer, tally, parts, output_cap(backend.attempt.max_tokens)
            )
    except BaseException as exc:
        # Also a cancellation: the stream's maximum life (`StreamJob._read_completion`),
        # the client leaving (`StreamJob.whole_answer`).
        raw = b"".join(parts)[:MAX_COMPLETION_BYTES]
        if answer is None or _DOCUMENT.match(raw) is not None:
            bill_unread(backend, raw)
        else:
            # The rest of a read that a cancellation cut between two of its pieces.
            tally.record(answer.feed(raw[answer.fed :]))
            tally.record(answer.end())
            backend.meter = tally.meter
            bill_unread(backend, raw, parse=False)
        if isinstance(exc, TransportError | ValueError):
            raise UpstreamError("the backend's answer was malformed") from exc
        raise
    finally:
        await response.aclose()
    backend.meter.record_text(
        completion.text, completion.usage, completion.finish_reason, completion.tool_calls
    )
    return completion


def _stream_answer(response: Response, backend: Backend) -> StreamAnswer | None:
    """How the answer is read: as a stream (an in-house SSE backend's answer always
    is; a vendor's when it streamed, as the edge asks it to: `StreamJob.whole_answer`),
    else None: one JSON document (a backend that answered `stream: true` with one)."""
    adapter = backend.adapter
    assert adapter is not None  # opening refused a provider without one
    if isinstance(adapter, AnswersAsStream):
        return adapter.stream_answer(backend.credentials)
    if _media_type(response) == "text/event-stream":
        return StreamAnswer(parser_for(adapter, backend.credentials))
    return None


def _media_type(response: Response) -> str:
    for name, value in response.headers.items():
        if name.lower() == "content-type":
            return value.split(";", 1)[0].strip().lower()
    return ""


async def _read_stream(
    response: Response, answer: StreamAnswer, tally: _Tally, parts: list[bytes], most: int
) -> Completion:
    """Read as `read_at_most(response, MAX_COMPLETION_BYTES, parts)` does, each read
    parsed by `answer` and its events put on `tally` as they come, and the event loop
    let go every `PARSE_SLICE` bytes: a read does not always let it go (one already
    buffered returns at once), and one read may be the whole answer. Past `most`
    output events (`relay.output_cap`) the answer fails, as a streamed one is ended."""
    size = unyielded = 0
    meter = tally.meter
    async for chunk in response.aiter_raw():
        parts.append(chunk)
        size += len(chunk)
        within = chunk[: MAX_COMPLETION_BYTES - answer.fed]
        for start in range(0, len(within), PARSE_SLICE):
            piece = within[start : start + PARSE_SLICE]
            tally.record(answer.feed(piece))
            if meter.deltas > most or meter.output_floor > most:
                raise UpstreamError(PAST_MAX_TOKENS)
            unyielded += len(piece)
            if unyielded >= PARSE_SLICE:
                unyielded = 0
                await asyncio.sleep(0)
        if size > MAX_COMPLETION_BYTES:
            raise _too_long()
    tally.record(answer.end())
    return answer.completion()


class _Tally:
    """The bill of a stream answer should it fail, kept as its events are parsed: put
    on the meter once the answer had failed, the 335,000 events of 8 MiB held the
    event loop 0.1 to 0.3 s more (measured). A meter of its own, as `meter` was
    before anything was recorded, since a whole answer that arrives is billed by
    `Meter.record_text` alone."""

    __slots__ = ("meter",)

    def __init__(self, meter: Meter) -> None:
        self.meter = Meter(
            meter.input_estimate, meter.keep_transcript, meter.delta_is_token, meter.started_at
        )

    def record(self, events: list[UpstreamEvent]) -> None:
        for event in events:
            self.meter.record(event)


def _too_long() -> UpstreamError:
    return UpstreamError(f"the backend's answer was longer than {MAX_COMPLETION_BYTES >> 20} MiB")


def bill_unread(backend: Backend, raw: bytes, *, parse: bool = True) -> None:
    """Put on the meter what `raw`, the bytes read of an answer that could not be
    read as one, can hold. An in-house SSE backend's answer is its stream: its events
    up to a failure are counted as the relay counts them (parsed here, or with
    `parse=False` already counted by the reader as it read). Any other answer is one document (JSON)
    whose text cannot be picked out of a part of it: every byte, markup included, is
    counted as text, never past the `max_tokens` the backend was asked for."""
    if not raw.strip():
        return
    assert backend.adapter is not None
    meter = backend.meter
    # A document (JSON: `{` or `[` first) has no `data:` line, so no event is in it:
    # it is not fed to a stream parser, whose pass over 8 MiB of a pretty-printed one
    # held the event loop 0.44 s (measured), for nothing.
    if parse and _DOCUMENT.match(raw) is None:
        events = parser_for(backend.adapter, backend.credentials).feed(raw + b"\n\n")
        for event in events:
            if isinstance(event, Failure):
                break
            meter.record(event)
    if meter.first_token_at is None:
        meter.record_unread(raw, backend.attempt.max_tokens)
