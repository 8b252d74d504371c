"""What a backend's lines cost the SSE decoder, on the edge's event loop: a read (up to
256 KiB) of lines that carry nothing, blank lines or lines ended by a lone CR (valid
SSE), must cost work linear in its bytes and no Python step per blank line. Before,
each CR-ended line searched the rest of the read for a LF (a 256 KiB read of them
held the loop 0.85 s), and each blank line was a round of the line loop (0.7 s)."""

from __future__ import annotations

from typing import Any

import pytest

from shared.sse import SSEDecoder
from tests.test_sse_limits import FEEDS, Feed


@pytest.fixture
def walked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every line the decoder walks in Python, blank or not."""
    lines: list[str] = []
    line, dispatch = SSEDecoder._line, SSEDecoder._dispatch

    def counted_line(self: SSEDecoder, text: str) -> Any:
        lines.append(text)
        return line(self, text)

    def counted_dispatch(self: SSEDecoder) -> Any:
        lines.append("")
        return dispatch(self)

    monkeypatch.setattr(SSEDecoder, "_line", counted_line)
    monkeypatch.setattr(SSEDecoder, "_dispatch", counted_dispatch)
    return lines


@FEEDS
@pytest.mark.parametrize("end", [b"\r", b"\r\n"], ids=["cr", "crlf"])
def test_events_ended_by_cr_take_the_way_lf_ones_do(
    feed: Feed, end: bytes, walked: list[str]
) -> None:
    """Before, every CR-ended line was walked in Python and searched the rest of
    the read for a LF: 20,000 such events scanned 3.6 GB."""
    events = 20_000
    decoder = SSEDecoder()
    assert feed(decoder, b"data: a" + end + end) == [b"a"]
    assert feed(decoder, b"data: b" + end * 2 * events) == [b"b"]
    assert feed(decoder, (b"data: c" + end * 2) * events) == [b"c"] * events
    assert len(walked) < 10, f"{len(walked)} lines walked in Python"


@FEEDS
@pytest.mark.parametrize("blank", [b"\n", b"\r", b"\r\n"], ids=["lf", "cr", "crlf"])
def test_a_run_of_blank_lines_is_skipped_not_walked(
    feed: Feed, blank: bytes, walked: list[str]
) -> None:
    end = blank * 2
    decoder = SSEDecoder()
    chunk = b"data: a" + end + blank * 100_000 + b"event: e" + blank + b"data: b" + end
    assert feed(decoder, chunk) == [b"a", b"b"]
    # Held across reads too: a run a read leaves unfinished, then more of it.
    assert feed(decoder, b"data: c" + end + blank * 50_000) == [b"c"]
    assert feed(decoder, blank * 50_000 + b"data: d" + end) == [b"d"]
    assert len(walked) < 40, f"{len(walked)} lines walked in Python"


@FEEDS
def test_blank_lines_keep_their_meaning(feed: Feed) -> None:
    """A blank line still ends the event it follows, and one that follows only an
    `event:` line still forgets that type; a CR then a LF in the next read is one
    line end."""
    decoder = SSEDecoder()
    assert feed(decoder, b"event: x\r\n\r\n\r\ndata: a\r\n\r\n\r") == [b"a"]
    assert feed(decoder, b"\ndata: b\n") == []
    assert feed(decoder, b"\n\n\n") == [b"b"]
    events = list(SSEDecoder().feed(b"event: x\n\n\n\ndata: a\n\nevent: y\ndata: b\r\r\r"))
    assert [(e.event, e.data) for e in events] == [("message", "a"), ("y", "b")]
