"""What reading and billing a whole answer costs the event loop (no servers needed).

A whole answer that fails after the backend generated it is billed from the bytes
read (tests/test_whole_answer_billing.py drives that through the services). Those
bytes were also fed to a stream parser, for the in-house SSE backend whose answer is
its stream; a JSON document (every other vendor's answer) holds no event, and the
parser's pass over 8 MiB of a pretty-printed one held the event loop 0.44 s
(measured), a stall for every stream on the edge each time such a backend failed.

The in-house SSE backend's whole answer was then parsed in one go once read: 8 MiB,
some 335,000 events, held the loop 1.3 to 1.7 s, success or failure (measured, the
threat model's "whole answer parse" row). It is now parsed as it is read, the loop
let go every `PARSE_SLICE` bytes, and billed exactly as the one-go parse billed it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from shared.text_tokens import text_tokens
from stream_edge.completion import (
    MAX_COMPLETION_BYTES,
    PARSE_SLICE,
    bill_unread,
    read_completion,
)
from stream_edge.errors import UpstreamError
from stream_edge.meter import Meter
from stream_edge.transport import ReadError
from stream_edge.upstream.openai_chat import OpenAIChatAdapter
from stream_edge.upstream.sse_backend import SSEBackendAdapter


class CountedParsers(SSEBackendAdapter):
    """The in-house SSE backend's adapter, counting the stream parsers it makes."""

    made = 0

    def stream_parser(self) -> Any:
        self.made += 1
        return super().stream_parser()


class WholeBody:
    """A backend's whole answer as `read_completion` reads it, in one chunk, or in
    `pieces` of that size, each there at once as a buffered read is; `then`, when
    given, is raised after the last (a connection that broke)."""

    def __init__(
        self, body: bytes, pieces: int | None = None, then: BaseException | None = None
    ) -> None:
        self._body = body
        self._pieces = pieces or len(body) or 1
        self._then = then

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self._body), self._pieces):
            yield self._body[start : start + self._pieces]
        if self._then is not None:
            raise self._then

    async def aclose(self) -> None:
        return None


class DocumentOnly(OpenAIChatAdapter):
    """A JSON vendor whose answers must never go through a stream parser."""

    def stream_parser(self) -> Any:
        raise AssertionError("a JSON document was fed to a stream parser")


def backend(adapter: Any, max_tokens: int) -> Any:
    return SimpleNamespace(
        adapter=adapter,
        meter=Meter(input_estimate=10, keep_transcript=False),
        credentials=(),
        attempt=SimpleNamespace(max_tokens=max_tokens),
    )


# Pretty-printed, cut off: one short line after another, the parser's worst case.
PRETTY = b'{\n  "choices": [\n' + b'    {"content": "1,2,3"},\n' * 20_000


@pytest.mark.parametrize("lead", [b"", b"\n  \r\n"])
def test_a_cut_json_document_is_billed_by_its_bytes_without_a_stream_parse(lead: bytes) -> None:
    raw = lead + PRETTY
    cut = backend(DocumentOnly(), max_tokens=10**9)
    bill_unread(cut, raw)
    assert cut.meter.relayed_tokens == text_tokens((raw,))
    # Past `max_tokens` by its bytes alone: that cap, however large the body.
    huge = (b"[" + b'  "x",\n' * (MAX_COMPLETION_BYTES // 7))[:MAX_COMPLETION_BYTES]
    capped = backend(DocumentOnly(), max_tokens=4096)
    bill_unread(capped, huge)
    assert capped.meter.relayed_tokens == 4096


def test_an_sse_backends_answer_is_still_counted_event_by_event() -> None:
    events = b"".join(b"data: " + orjson.dumps({"delta": "word "}) + b"\n\n" for _ in range(50))
    cut = backend(SSEBackendAdapter(), max_tokens=10**9)
    bill_unread(cut, events + b"data: {broken")
    assert cut.meter.deltas == 50


@pytest.mark.parametrize("end", [b"data: {broken", b""], ids=["malformed", "ended_early"])
async def test_a_failed_sse_answer_is_parsed_once_for_its_error_and_its_bill(end: bytes) -> None:
    # Parsed again to bill it, an 8 MiB answer held the event loop twice as long.
    events = b"".join(b"data: " + orjson.dumps({"delta": "word "}) + b"\n\n" for _ in range(50))
    adapter = CountedParsers()
    cut = backend(adapter, max_tokens=10**9)
    with pytest.raises(UpstreamError, match="malformed"):
        await read_completion(WholeBody(events + end), cut)
    assert adapter.made == 1
    assert cut.meter.deltas == 50


EVENT = b"data: " + orjson.dumps({"delta": "word "}) + b"\n\n"
ENDED = b'data: {"usage":{"input":10,"output":1},"finish":"stop"}\n\ndata: [DONE]\n\n'


def sse_answer(size: int, end: bytes) -> bytes:
    return EVENT * ((size - len(end)) // len(EVENT)) + end


def bill(meter: Meter) -> tuple[Any, ...]:
    return meter.billing(), meter.relayed_tokens, meter.deltas, meter.first_token_at is None


async def loop_turns_during(work: Callable[[], Any]) -> int:
    """How many times another task ran while `work()` was awaited: every other
    stream on the edge waits for the loop just as this one does."""
    turns = 0
    running = True

    async def other_stream() -> None:
        nonlocal turns
        while running:
            await asyncio.sleep(0)
            turns += 1

    other = asyncio.create_task(other_stream())
    await asyncio.sleep(0)
    turns = 0
    try:
        await work()
        counted = turns
    finally:
        running = False
        await other
    return counted


@pytest.mark.parametrize("end", [ENDED, b"data: {broken"], ids=["completed", "malformed"])
async def test_other_streams_run_while_a_large_sse_answer_is_parsed(end: bytes) -> None:
    # Before: one turn at most, whatever the size (1.6 s of loop at 8 MiB).
    body = sse_answer(1 << 20, end)
    cut = backend(SSEBackendAdapter(), max_tokens=10**9)

    async def read() -> None:
        try:
            await read_completion(WholeBody(body), cut)
        except UpstreamError:
            assert end != ENDED

    assert await loop_turns_during(read) >= len(body) // PARSE_SLICE - 1


async def test_a_failed_sse_answers_bill_is_counted_a_piece_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Counted only once the answer had failed, its events (all 335,000 at 8 MiB) held
    # the loop in one go after the parse: at most a piece's worth now between turns.
    recorded = 0
    record = Meter.record

    def counted(meter: Meter, event: Any) -> None:
        nonlocal recorded
        recorded += 1
        record(meter, event)

    monkeypatch.setattr(Meter, "record", counted)
    body = sse_answer(1 << 20, b"data: {broken")
    cut = backend(SSEBackendAdapter(), max_tokens=10**9)
    at_turns: list[int] = []  # events recorded by each turn of another task
    done = False

    async def other_stream() -> None:
        while not done:
            at_turns.append(recorded)
            await asyncio.sleep(0)

    other = asyncio.create_task(other_stream())
    with pytest.raises(UpstreamError, match="malformed"):
        await read_completion(WholeBody(body), cut)
    at_turns.append(recorded)
    done = True
    await other
    assert cut.meter.deltas == len(body) // len(EVENT)
    assert max(b - a for a, b in itertools.pairwise(at_turns)) <= PARSE_SLICE // len(EVENT) + 1


async def test_a_small_sse_answer_is_parsed_without_waiting_for_a_turn() -> None:
    done = backend(SSEBackendAdapter(), max_tokens=10**9)
    body = sse_answer(PARSE_SLICE // 2, ENDED)
    assert await loop_turns_during(lambda: read_completion(WholeBody(body), done)) == 0
    assert done.meter.usage is not None


def one_go(body: bytes, cap: int = MAX_COMPLETION_BYTES) -> tuple[Any, ...]:
    """The bill of `body` parsed in one go once read, as the edge did before."""
    ref = backend(SSEBackendAdapter(), max_tokens=10**9)
    try:
        completion = SSEBackendAdapter().parse_completion(body[:cap])
    except ValueError:
        bill_unread(ref, body[:cap])
    else:
        assert len(body) <= cap
        ref.meter.record_text(
            completion.text, completion.usage, completion.finish_reason, completion.tool_calls
        )
    return bill(ref.meter)


ANSWERS = {
    "completed": sse_answer(300_000, ENDED),
    "malformed": sse_answer(300_000, b"data: {broken"),
    "ended_early": sse_answer(300_000, b""),
    "cut_mid_event": sse_answer(300_000, b"") + b'data: {"delta": "wo',
    "failed_midway": sse_answer(150_000, b'data: {"error": "x"}\n\n') + sse_answer(150_000, b""),
    "tool_calls": sse_answer(
        100_000,
        b'data: {"tool_calls":[{"index":0,"id":"c","function":{"name":"f","arguments":"{}"}}]}'
        b"\n\ndata: [DONE]\n\n",
    ),
}


@pytest.mark.parametrize("pieces", [None, 1001, PARSE_SLICE + 3], ids=["whole", "small", "large"])
@pytest.mark.parametrize("answer", ANSWERS)
async def test_an_sse_answer_parsed_as_read_is_billed_as_parsed_in_one_go(
    answer: str, pieces: int | None
) -> None:
    body = ANSWERS[answer]
    cut = backend(SSEBackendAdapter(), max_tokens=10**9)
    try:
        await read_completion(WholeBody(body, pieces), cut)
    except UpstreamError:
        assert answer != "completed" and answer != "tool_calls"
    assert bill(cut.meter) == one_go(body)


async def test_an_sse_answer_over_the_cap_is_billed_as_its_first_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("stream_edge.completion.MAX_COMPLETION_BYTES", 200_003)
    body = ANSWERS["completed"]
    cut = backend(SSEBackendAdapter(), max_tokens=10**9)
    with pytest.raises(UpstreamError, match="longer than"):
        await read_completion(WholeBody(body, 70_001), cut)
    assert bill(cut.meter) == one_go(body, cap=200_003)


async def test_an_sse_answer_whose_connection_broke_is_billed_as_what_was_read() -> None:
    body = ANSWERS["cut_mid_event"]
    cut = backend(SSEBackendAdapter(), max_tokens=10**9)
    with pytest.raises(UpstreamError, match="malformed"):
        await read_completion(WholeBody(body, 70_001, then=ReadError("reset")), cut)
    assert bill(cut.meter) == one_go(body)


async def test_an_sse_answer_cancelled_between_pieces_of_a_read_bills_the_whole_read() -> None:
    # The stream's maximum life may end while one read is half parsed: its other
    # half was read too, and billed as before.
    body = ANSWERS["completed"]
    cut = backend(SSEBackendAdapter(), max_tokens=10**9)
    reading = asyncio.create_task(read_completion(WholeBody(body), cut))
    await asyncio.sleep(0)  # the read's first piece is parsed, then it lets go
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    # Its usage event, at the end of the read, past the first piece, is billed.
    ref = backend(SSEBackendAdapter(), max_tokens=10**9)
    bill_unread(ref, body)
    assert bill(cut.meter) == bill(ref.meter)
    assert cut.meter.usage is not None
