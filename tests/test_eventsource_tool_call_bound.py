"""An EventSource stream's tool calls are held whole until `complete`, within a bound.

Attack (measured before the fix): an OpenAI-compatible backend (hostile, or gone
wrong) streams tool-call argument fragments of 1 MB, one after another, to a
`GET /v1/stream` client. `EventSourceWriter` gathers the calls to send each one whole
(DESIGN §11), and kept every fragment until the stream's end, then joined and encoded
them once more: the edge's memory grew by all the backend sent (the resume log's
16 MiB cap bounds only Redis): 32 MB sent, 362 MB traced at the peak (18 MB with the
fix, the stack's and the relay's own buffers). Now the calls are held up to what no legitimate call
reaches (`formats.TOOL_CALL_CHARS`, `formats.TOOL_CALL_PIECES`); past it the stream
ends as one whose backend misbehaves: an `error` event `upstream_error`, the backend
closed, the stream billed for what was relayed."""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from shared.sse import SSEDecoder
from stream_edge.formats import TOOL_CALL_CHARS, TOOL_CALL_PIECES, EventSourceWriter
from stream_edge.upstream.base import OutputLimit, ToolCallDelta
from tests.hostile_catalog import hostile_backend_stack, openai_ending, sse_frame
from tests.stack import InProcessStack

FRAGMENTS = 64
BIG = "x" * 1_000_000  # under the 1 MiB a backend's event may carry
MB = 1_000_000


def _call(fragment: dict[str, Any]) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, **fragment}]}}]}


async def _chat(request: Request) -> Response:
    """One tool call whose arguments come in `FRAGMENTS` fragments of 1 MB each."""

    async def frames() -> AsyncIterator[bytes]:
        yield sse_frame(_call({"id": "call_0", "type": "function", "function": {"name": "save"}}))
        for _ in range(FRAGMENTS):
            yield sse_frame(_call({"function": {"arguments": BIG}}))
        for frame in openai_ending("tool_calls", 10, 500):
            yield frame

    return StreamingResponse(frames(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessStack]:
    with hostile_backend_stack(tmp_path_factory.mktemp("calls"), "calls", _chat) as gateway:
        yield gateway


def test_an_endless_tool_call_ends_an_eventsource_stream_within_a_bound(
    stack: InProcessStack,
) -> None:
    c = stack.client
    token = c.new_user(c.new_company("100"))
    grant = c.init_ok(token, {"model": "calls-model", "query": "save it"})
    decoder = SSEDecoder()
    tracemalloc.start()  # the edge serves in this process: its allocations are traced
    try:
        with httpx.stream("GET", grant["stream_url"], timeout=60) as response:
            assert response.status_code == 200
            events = [e for raw in response.iter_raw() for e in decoder.feed(raw)]
        record = c.wait_usage(token, grant["reservation_id"], timeout=30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Before: every fragment kept, then joined and encoded as one `tool_call` event.
    assert peak < 48 * MB, f"{peak / MB:.0f} MB traced at the peak"
    # No half call is sent (it could not be run): the stream ends with an error.
    assert [e.event for e in events] == ["error"]
    assert orjson.loads(events[0].data)["code"] == "upstream_error"
    # Billed as a stream cut by its backend: what was relayed, estimated.
    assert record["status"] == "failed"
    assert record["output_tokens"] > 0


def test_the_writer_holds_tool_calls_up_to_their_bound_and_refuses_past_it() -> None:
    writer = EventSourceWriter("s")
    writer.write(ToolCallDelta(0, "call_0", "save", "x" * (TOOL_CALL_CHARS - 1)))
    writer.write(ToolCallDelta(1, "call_1", "note", "y"))  # at the bound, over all calls
    with pytest.raises(OutputLimit):
        writer.write(ToolCallDelta(1, None, None, "z"))
    # As many fragments as a legitimate call has, and not one more.
    many = EventSourceWriter("s")
    for _ in range(TOOL_CALL_PIECES):
        many.write(ToolCallDelta(0, None, None, ""))
    with pytest.raises(OutputLimit):
        many.write(ToolCallDelta(0, None, None, ""))
    # Within the bound, each call goes out whole, as before.
    small = EventSourceWriter("s")
    small.write(ToolCallDelta(0, "call_0", "save", '{"a":'))
    small.write(ToolCallDelta(0, None, None, " 1}"))
    [frame] = small.tool_call_frames()
    [event] = SSEDecoder().feed(frame)
    assert orjson.loads(event.data) == {
        "index": 0,
        "id": "call_0",
        "name": "save",
        "arguments": '{"a": 1}',
    }
