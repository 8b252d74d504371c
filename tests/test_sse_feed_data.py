"""`SSEDecoder.feed_data` answers exactly what `feed` does, as bytes, for any stream
split at any point (the edge's parsers read only the data, through `feed_data`)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.sse import ServerSentEvent, SSEDecoder

# Pieces that make up real and hostile event streams: whole JSON events, the end
# marker, comments, other fields, every line ending, blank lines, non-ASCII and
# invalid UTF-8 bytes.
PIECES = st.sampled_from(
    [
        b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n',
        b"data: [DONE]\n\n",
        b'data: {"t":"\xc3\xa9t\xc3\xa9"}\n\n',
        b'data: {"t":"\xff\xfe"}\n\n',
        b"data:no-space\n\n",
        b"data: a\ndata: b\n\n",
        b": ping\n\n",
        b"event: add\nid: 7\ndata: 1\n\n",
        b"retry: 10\n\n",
        b"id: 3\n",
        b"data: x\r\n\r\n",
        b"data: y\r\r",
        b"\n",
        b"\n\n",
        b"data: ",
        b"partial",
    ]
)


def _split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    edges = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges)]


@given(st.lists(PIECES, max_size=12), st.lists(st.integers(min_value=0), max_size=6))
def test_feed_data_is_feed_as_bytes(pieces: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(pieces)
    events, data = SSEDecoder(), SSEDecoder()
    for chunk in _split(stream, cuts):
        expected = [event.data.encode() for event in events.feed(chunk)]
        assert data.feed_data(chunk) == expected


def test_feed_data_keeps_the_common_payload_as_is() -> None:
    payload = b'{"choices":[{"delta":{"content":"hi"}}]}'
    assert SSEDecoder().feed_data(b"data: " + payload + b"\n\ndata: [DONE]\n\n") == [
        payload,
        b"[DONE]",
    ]


def test_a_stream_read_in_pieces_cut_inside_events_is_not_walked_line_by_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A read ends anywhere, mostly inside an event. Only the event held across the
    # cut goes line by line; the whole events after it are split at C speed. Before,
    # every piece after the first went line by line: 8 MiB of events read in 64 KiB
    # pieces took 7 times as long to decode as the same bytes in one piece.
    walked: list[str] = []
    line = SSEDecoder._line

    def counted(self: SSEDecoder, text: str) -> ServerSentEvent | None:
        walked.append(text)
        return line(self, text)

    monkeypatch.setattr(SSEDecoder, "_line", counted)
    stream = b'data: {"delta":"word "}\n\n' * 1000
    decoder, got = SSEDecoder(), []
    for start in range(0, len(stream), 1001):  # never on an event's boundary
        got.extend(decoder.feed_data(stream[start : start + 1001]))
    assert got == [b'{"delta":"word "}'] * 1000
    pieces = -(-len(stream) // 1001)
    assert len(walked) <= 2 * pieces  # the held event's line and its blank line
