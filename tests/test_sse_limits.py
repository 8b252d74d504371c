"""The SSE decoder's limits: a line is at most `MAX_LINE` bytes and an event's data at
most `MAX_EVENT` characters, however the stream is cut into reads; past them the
stream fails with `SSEError`, and the relay ends it as an upstream error."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shared.sse import MAX_EVENT, MAX_LINE, SSEDecoder, SSEError
from stream_edge.upstream.base import OVERSIZED_EVENT
from tests.test_edge_job_pieces import HEL, ScriptedResponse, run_relay


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def by_feed(decoder: SSEDecoder, chunk: bytes) -> list[bytes]:
    return [event.data.encode() for event in decoder.feed(chunk)]


def by_feed_data(decoder: SSEDecoder, chunk: bytes) -> list[bytes]:
    return decoder.feed_data(chunk)


Feed = Callable[[SSEDecoder, bytes], list[bytes]]
FEEDS = pytest.mark.parametrize("feed", [by_feed, by_feed_data], ids=["feed", "feed_data"])

LONG = b"x" * MAX_LINE
DATA_LINES = b"data: " + b"y" * 1000 + b"\n"
LINES = MAX_EVENT // 1001  # each line counts 1001 characters: its data and a newline
EVENT_LINES = DATA_LINES * LINES

OVER = [
    # (stream, read size): nothing dispatched, the decoder fails instead
    (b"data: " + LONG, 65536),  # a line that never ends
    (b"data: " + LONG, 1024),
    (b": " + LONG + b"\n\n", len(LONG) + 4),  # a comment line, whole in one read
    (b"data: " + LONG + b"\n\n", len(LONG) + 8),  # the one-read fast path
    (b"data: a\n\ndata: " + LONG + b"\r\n\r\n", 65536),  # CRLF line ends
    (EVENT_LINES + DATA_LINES, 65536),  # short lines, no blank line ending the event
    (EVENT_LINES + DATA_LINES + b"\n", len(EVENT_LINES) + 1002),  # the event in one read
]


@FEEDS
@pytest.mark.parametrize(("stream", "size"), OVER, ids=[f"over-{i}" for i in range(len(OVER))])
def test_a_line_or_an_event_over_its_limit_fails_the_stream(
    feed: Feed, stream: bytes, size: int
) -> None:
    decoder = SSEDecoder()
    with pytest.raises(SSEError, match=r"longer than|over"):
        for piece in pieces(stream, size):
            feed(decoder, piece)
    # It holds nothing more: the rest of a hostile stream is not buffered either.
    assert not decoder._buffer and not decoder._data


LINE = b"data: " + b"x" * (MAX_LINE - 6)  # MAX_LINE bytes
WITHIN = [
    # (stream, read size, the event's data length)
    (LINE + b"\n\n", 65536, MAX_LINE - 6),
    (LINE + b"\n\n", MAX_LINE + 2, MAX_LINE - 6),  # the one-read fast path
    (LINE + b"\r\n\r\n", 65536, MAX_LINE - 6),
    (EVENT_LINES + b"\n", 65536, LINES * 1001 - 1),
]


@FEEDS
@pytest.mark.parametrize(
    ("stream", "size", "length"), WITHIN, ids=[f"within-{i}" for i in range(len(WITHIN))]
)
def test_a_line_and_an_event_at_their_limits_are_decoded(
    feed: Feed, stream: bytes, size: int, length: int
) -> None:
    decoder = SSEDecoder()
    got = [data for piece in pieces(stream, size) for data in feed(decoder, piece)]
    assert [len(data) for data in got] == [length]
    assert feed(decoder, b"data: next\n\n") == [b"next"]


async def test_an_oversized_event_ends_the_relayed_stream_as_an_upstream_error() -> None:
    endless = pieces(b"data: " + LONG, 65536)
    result, calls, _ = await run_relay(ScriptedResponse(HEL, *endless))
    assert (result.status, result.error_code) == ("failed", "upstream_error")
    assert result.error_message == OVERSIZED_EVENT
    assert calls[0] == ("emit", b"delta:Hel;")  # what came before it was sent
