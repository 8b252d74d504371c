"""A hostile (or merely verbose) backend dribbles a tool call's arguments in tiny
fragments: gathering them costs time in proportion to their length, not its square.

Before the fix each fragment was appended to a growing string, copied whole every
time: 200,000 fragments of 10 bytes held the edge's event loop (every stream on it)
for over a minute. Counted, not timed; and fed through the objects the relay uses on
every stream (the vendor's parser, the meter, the EventSource writer)."""

from __future__ import annotations

import orjson

from stream_edge.formats import EventSourceWriter
from stream_edge.meter import Meter
from stream_edge.upstream.base import ToolCallDelta, ToolCalls
from stream_edge.upstream.openai_chat import OpenAIStreamParser

FRAGMENT = "x" * 100


def fragment_event(index: int, first: bool) -> bytes:
    call: dict[str, object] = {"index": index, "function": {"arguments": FRAGMENT}}
    if first:
        call |= {"id": f"call_{index}", "function": {"name": "save", "arguments": FRAGMENT}}
    chunk = {"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def backend_stream(fragments: int) -> list[bytes]:
    """The backend's reads: 500 events each, then the finish and the end marker."""
    events = [fragment_event(0, first=i == 0) for i in range(fragments)]
    reads = [b"".join(events[i : i + 500]) for i in range(0, len(events), 500)]
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
    return [*reads, b"data: " + orjson.dumps(finish) + b"\n\ndata: [DONE]\n\n"]


def relayed(reads: list[bytes]) -> tuple[Meter, EventSourceWriter]:
    parser, meter = OpenAIStreamParser(), Meter(10, keep_transcript=True)
    writer = EventSourceWriter("session")
    for read in reads:
        for event in parser.feed(read):
            meter.record(event)
            writer.write(event)
    return meter, writer


class Fragment(str):
    """A fragment that counts how often it is appended to a string with `+`: each
    such append copies the whole string gathered so far."""

    appended = 0

    def __radd__(self, other: str) -> str:
        Fragment.appended += 1
        return str.__add__(other, self)


def test_a_backend_dribbling_tool_call_arguments_costs_linear_time() -> None:
    """Each fragment is kept as it came and the call joined once: appending them one
    by one to a growing string (20,000 fragments of 100 bytes: 20 GB copied) held
    the event loop for over a minute."""
    calls, Fragment.appended = ToolCalls(), 0
    for i in range(20_000):
        calls.add(ToolCallDelta(0, "call_0" if i == 0 else "", "save", Fragment(FRAGMENT)))
    (call,) = calls.complete()
    assert call.arguments == FRAGMENT * 20_000
    assert Fragment.appended == 0


def test_dribbled_arguments_arrive_whole() -> None:
    meter, writer = relayed(backend_stream(2_000))
    (call,) = meter.tool_calls()
    assert (call.id, call.name, call.arguments) == ("call_0", "save", FRAGMENT * 2_000)
    (frame,) = writer.tool_call_frames()
    data = orjson.loads(frame.split(b"data: ", 1)[1].split(b"\n", 1)[0])
    assert data == {"index": 0, "id": "call_0", "name": "save", "arguments": FRAGMENT * 2_000}
    assert meter.finish_reason == "tool_calls"
