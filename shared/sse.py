"""Server-Sent Events: a pure encoder and an incremental decoder.

Follows the WHATWG HTML "server-sent events" parsing rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
lines end in CRLF, LF or CR; a blank line dispatches the event; a line starting
with ``:`` is a comment; ``field: value`` strips one leading space from value;
``data`` lines are joined with ``\\n``. No I/O here: the decoder is fed bytes as they
arrive from the network, split at any boundary (including between CR and LF).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

# The longest line (bytes) and the most data an event may carry (characters, each at
# least a byte on the wire) that the decoder holds. The spec sets no limit; a peer that
# never ends a line or an event would otherwise grow our memory without end. Far above
# any LLM event (a few hundred bytes; a tool call's arguments a few KiB): a stream
# beyond them fails with `SSEError`.
MAX_LINE = 1024 * 1024
MAX_EVENT = 1024 * 1024
# A `retry:` delay (milliseconds) longer than this is no delay anyone means, and past
# 4,300 digits `int()` raises (CPython's conversion limit): ignored, as a field that
# is no number is (WHATWG), rather than failing the stream it came in.
MAX_RETRY_DIGITS = 12
# The line ends after a blank line: the rest of its run of blank lines, which do
# nothing more (the first dispatched the event, or forgot a lone `event:`), skipped
# at C speed. A backend sending 256 KiB of them in a read held the event loop 0.7 s
# when each was a round of the line loop.
_BLANK_LINES = re.compile(rb"\n*")


class SSEError(ValueError):
    """The stream broke one of the decoder's limits; the decoder holds nothing more."""


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    data: str = ""
    event: str = "message"
    id: str | None = None
    retry: int | None = None


def encode_event(
    data: str, *, event: str | None = None, id: str | int | None = None, retry: int | None = None
) -> bytes:
    """Encode one event. Multi-line data becomes several ``data:`` lines, per spec."""
    parts: list[str] = []
    if id is not None:
        parts.append(f"id: {id}\n")
    if event is not None:
        parts.append(f"event: {event}\n")
    if retry is not None:
        parts.append(f"retry: {retry}\n")
    # Cut at CR, LF and CRLF only, the lines SSE knows: `str.splitlines` also cuts
    # at U+2028, U+2029, U+0085 and more, which JSON (orjson's) leaves raw inside a
    # string, and the client would join the pieces back with a newline JSON refuses.
    if "\r" in data:
        data = data.replace("\r\n", "\n").replace("\r", "\n")
    for line in data.split("\n"):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode()


def encode_data(payload: bytes) -> bytes:
    """`payload` as one event's data, for a payload that holds no CR (our own JSON,
    or a decoded event's data, whose lines the decoder joined with LF). `orjson.dumps`
    never writes a raw newline, but a backend's event over several `data:` lines is
    one JSON text with newlines in it (JSON whitespace): each line goes out as its own
    `data:` line, or the client would read the first line alone (`{"choices": [`)."""
    if b"\n" in payload:
        payload = payload.replace(b"\n", b"\ndata: ")
    return b"data: " + payload + b"\n\n"


class SSEDecoder:
    """Incremental event-stream decoder: ``feed(bytes)`` yields complete events."""

    __slots__ = (
        "_buffer",
        "_data",
        "_event",
        "_id",
        "_last_id",
        "_pending_cr",
        "_retry",
        "_size",
    )

    def __init__(self) -> None:
        # The unfinished line, grown in place: a line arriving in many reads costs
        # linear time, not a copy of all of it per read.
        self._buffer = bytearray()
        self._pending_cr = False
        self._data: list[str] = []
        self._size = 0  # of `_data`, joined
        self._event = ""
        self._id: str | None = None
        self._last_id: str | None = None
        self._retry: int | None = None

    def _line_ends(self, chunk: bytes) -> bytes:
        """`chunk` with every line end a LF: SSE's CR and CRLF become one, at C speed,
        so the rest of the decoder knows one line end and takes the fast ways below
        for CRLF streams too. A CR that ends a read may be the first half of a CRLF
        whose LF opens the next: that LF is then dropped."""
        if self._pending_cr:
            self._pending_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" not in chunk:
            return chunk
        self._pending_cr = chunk.endswith(b"\r")
        return chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")

    def feed(self, chunk: bytes) -> Iterator[ServerSentEvent]:
        chunk = self._line_ends(chunk)
        idle = not (self._buffer or self._data or self._event)
        if idle and self._retry is None:
            # The common case, one `data:` line per event: split whole events at C
            # speed instead of walking the chunk line by line.
            end = chunk.rfind(b"\n\n")
            if end != -1:
                blocks = chunk[:end].split(b"\n\n")
                if end > MAX_LINE:
                    _check_lines(blocks)
                for block in blocks:
                    if not block:  # blank lines between events: nothing to do
                        continue
                    if block.startswith(b"data: ") and b"\n" not in block:
                        yield ServerSentEvent(
                            data=block[6:].decode("utf-8", errors="replace"),
                            event="message",
                            id=self._last_id,
                            retry=None,
                        )
                    else:
                        yield from self._feed_lines(block + b"\n\n")
                chunk = chunk[end + 2 :]
                if not chunk:
                    return
        yield from self._feed_lines(chunk)

    def feed_data(self, chunk: bytes) -> list[bytes]:
        """`[event.data.encode() for event in self.feed(chunk)]`, for callers that want
        only each event's data, as UTF-8 bytes (what `orjson.loads` takes): in the
        common case no `ServerSentEvent` is built and no payload decoded and encoded
        again. At one event per read (tokens 20 ms apart) this halves the decoder's
        CPU per event (docs/edge-profile.md, "Paced streams")."""
        chunk = self._line_ends(chunk)
        out: list[bytes] = []
        if self._retry is None:
            if self._buffer or self._data or self._event:
                # A read ends anywhere, mostly inside an event: the held event is
                # finished line by line and the rest of the chunk goes the fast way
                # below. Going line by line for all of it made a stream read in
                # 64 KiB pieces 7 times slower to decode than the same bytes whole.
                first = chunk.find(b"\n\n")
                if first == -1:
                    return [e.data.encode() for e in self._feed_lines(chunk)]
                out = [e.data.encode() for e in self._feed_lines(chunk[: first + 2])]
                chunk = chunk[first + 2 :]
        if not (self._buffer or self._data or self._event) and self._retry is None:
            end = chunk.rfind(b"\n\n")
            if end != -1:
                blocks = chunk[:end].split(b"\n\n")
                if end > MAX_LINE:
                    _check_lines(blocks)
                for block in blocks:
                    if not block:  # blank lines between events: nothing to do
                        continue
                    if block.startswith(b"data: ") and b"\n" not in block:
                        data = block[6:]
                        # ASCII is valid UTF-8 as it is; anything else goes through the
                        # decoder's replacement of invalid bytes, as `feed` does.
                        if not data.isascii():
                            data = data.decode("utf-8", errors="replace").encode()
                        out.append(data)
                    else:
                        out.extend(e.data.encode() for e in self._feed_lines(block + b"\n\n"))
                chunk = chunk[end + 2 :]
                if chunk:
                    out.extend(e.data.encode() for e in self._feed_lines(chunk))
                return out
        out.extend(e.data.encode() for e in self._feed_lines(chunk))
        return out

    def _feed_lines(self, chunk: bytes) -> Iterator[ServerSentEvent]:
        """The events `chunk`'s lines finish (LF-ended: `_line_ends`), the held
        unfinished line first."""
        buffer: bytes | bytearray = chunk
        # The held line has no line end: the search resumes where it stopped.
        scan = len(self._buffer)
        if scan:
            buffer = self._buffer
            buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", scan)) != -1:
            if end - start > MAX_LINE:
                self._overflow(f"a line longer than {MAX_LINE} bytes")
            if end == start:
                event = self._dispatch()
                blank = _BLANK_LINES.match(buffer, end + 1)
                assert blank is not None  # `*`: it matches, if only nothing
                start = scan = blank.end()
            else:
                event = self._line(buffer[start:end].decode("utf-8", errors="replace"))
                start = scan = end + 1
            if event is not None:
                yield event
        if buffer is self._buffer:
            del buffer[:start]
        elif start < len(buffer):
            self._buffer += buffer[start:]
        if len(self._buffer) > MAX_LINE:
            self._overflow(f"a line longer than {MAX_LINE} bytes")

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._size += len(value) + 1
            if self._size > MAX_EVENT:
                self._overflow(f"an event with over {MAX_EVENT} characters of data")
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif (
            name == "retry"
            and value.isascii()
            and value.isdigit()
            and len(value) <= MAX_RETRY_DIGITS
        ):
            self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = ServerSentEvent(
            data="\n".join(self._data),
            event=self._event or "message",
            id=self._last_id,
            retry=self._retry,
        )
        self._data = []
        self._size = 0
        self._event = ""
        self._retry = None
        return event

    def _overflow(self, what: str) -> None:
        self._buffer = bytearray()
        self._data = []
        self._size = 0
        raise SSEError(f"the event stream sent {what}")


def _check_lines(blocks: list[bytes]) -> None:
    """The fast paths' check, for a chunk long enough to hold an oversized line: a
    one-line block is one line (blocks of several go through `_feed_lines`, which
    checks each of their lines)."""
    if max(map(len, blocks)) > MAX_LINE and any(
        len(block) > MAX_LINE and b"\n" not in block for block in blocks
    ):
        raise SSEError(f"the event stream sent a line longer than {MAX_LINE} bytes")
