"""A whole answer that is a stream, joined as its bytes are read: an in-house SSE
backend's answer to `stream: false`, and every vendor's, which the edge asks for as a
stream (`completion.read_completion`: a JSON answer comes only once generated, past
the edge's read timeout for a long one, while the vendor bills it).

Parsed in one go once read, an 8 MiB answer (some 335,000 events) held the edge's
event loop for 1.6 s; fed piece by piece as it arrives, the reader
(`completion.read_completion`) can let every other stream on the edge run between
pieces. Pure: no I/O, no waiting; the reader decides when to yield.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

from stream_edge.upstream.base import (
    Completion,
    CutStream,
    Delta,
    Failure,
    Finish,
    StreamParser,
    ToolCallDelta,
    ToolCalls,
    UpstreamEvent,
    Usage,
)


class StreamAnswer:
    """`feed` the answer's bytes in order, any split; `completion()` once all are in.

    `feed` and `end` return the events just parsed, up to the first failure (the last
    of them), for the reader to bill should the answer fail (`completion._Tally`);
    after a failure nothing more is parsed, as nothing after it is billed or
    answered. Nothing else is kept of them. `fed` counts the bytes given."""

    __slots__ = (
        "_calls",
        "_ended",
        "_failure",
        "_parser",
        "_reason",
        "_text",
        "_usage",
        "fed",
    )

    def __init__(self, parser: StreamParser) -> None:
        self._parser = parser
        self._text: list[str] = []
        self._calls = ToolCalls()
        self._reason: str | None = None
        self._usage: Usage | None = None
        self._failure: str | None = None
        self._ended = False
        self.fed = 0

    def feed(self, data: bytes) -> list[UpstreamEvent]:
        self.fed += len(data)
        return self._parse(data)

    def _parse(self, data: bytes) -> list[UpstreamEvent]:
        if self._failure is not None:
            return []
        events = self._parser.feed(data)
        for index, event in enumerate(events):
            if isinstance(event, Failure):
                self._failure = event.message
                events = events[: index + 1]
                break
            if isinstance(event, Delta):
                self._text.append(event.text)
            elif isinstance(event, ToolCallDelta):
                self._calls.add(event)
            elif isinstance(event, Finish):
                self._reason = event.reason
            elif isinstance(event, Usage):
                # Every count kept (a vendor's cache reads are billed at their own
                # rate), not the raw frame.
                self._usage = dataclasses.replace(event, raw=b"")
        return events

    def end(self) -> list[UpstreamEvent]:
        """The answer's bytes are all in (or no more will be read): an event its last
        bytes left open is complete, and returned."""
        if self._ended:
            return []
        self._ended = True
        return self._parse(b"\n\n")

    def completion(self) -> Completion:
        """The answer; `CutStream` when it failed or ended before its end. Call `end`
        first to have the events its last bytes hold."""
        self.end()
        if self._failure is not None:
            raise CutStream(self._failure)
        if not self._parser.done and self._reason is None:
            raise CutStream("the backend's stream ended early")
        text = "".join(self._text)
        return Completion(text, self._reason or "stop", self._usage, tuple(self._calls.complete()))


@runtime_checkable
class AnswersAsStream(Protocol):
    """An adapter whose whole answer is its stream, read with a `StreamAnswer`."""

    def stream_answer(self, withheld: tuple[str, ...] = ()) -> StreamAnswer: ...
