"""A stream's transcript holds what its usage report can carry, not all it relayed.

Attack (measured before the fix): a backend (in-house, or a vendor gone wrong) that
ignores `max_tokens` and streams for the stream's whole life. With transcripts on
(the default) the meter kept every delta's text, and every tool call fragment
whether transcripts were on or not, until the stream's end, then joined them once
more for the report, which cut them to 1 MiB anyway: 48 MB relayed, the traced
peak was 628 MB (35 MB with the fix, the relay's own buffers in flight), growing
with every byte, so one stream running its 15 minutes at network speed, or a few
shorter ones, ran an edge out of memory. Now the meter
keeps at most what a report can carry (`meter.TRANSCRIPT_CHARS`, a piece count
beside it); the stream, its bill and the report's cut are as before."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from shared.webhooks import MAX_USAGE_BODY_BYTES
from stream_edge.meter import TRANSCRIPT_CHARS, TRANSCRIPT_PIECES, Meter
from stream_edge.upstream.base import Delta, ToolCallDelta, Usage
from stream_edge.usage_report import usage_event
from tests.hostile_catalog import bulky_backend, hostile_backend_stack, openai_ending, sse_frame
from tests.stack import Client, InProcessStack
from tests.test_usage_report_size import _grant

BIG_DELTAS = 48
BIG = "x" * 1_000_000  # under the 1 MiB a backend's event may carry
MB = 1_000_000


_chat = bulky_backend(BIG_DELTAS, BIG)  # `BIG_DELTAS` deltas of 1 MB each


@contextlib.contextmanager
def _streamed(c: Client, grant: dict[str, Any], messages: list[Any]) -> Iterator[httpx.Response]:
    """The grant's answer to `messages` streamed from the edge (200), read by the block."""
    with c.http.stream(
        "POST",
        f"{c.edge_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {grant['stream_token']}"},
        json={"messages": messages, "stream": True},
        timeout=60,
    ) as answer:
        assert answer.status_code == 200
        yield answer


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessStack]:
    with hostile_backend_stack(tmp_path_factory.mktemp("endless"), "endless", _chat) as gateway:
        yield gateway


def test_a_backend_streaming_past_any_report_holds_no_more_than_a_report(
    stack: InProcessStack,
) -> None:
    c = stack.client
    token = c.new_user(c.new_company("100"))
    messages = [{"role": "user", "content": "go on"}]
    grant = c.init_ok(token, {"model": "endless-model", "messages": messages})
    relayed = 0
    tracemalloc.start()  # the edge serves in this process: its allocations are traced
    try:
        with _streamed(c, grant, messages) as answer:
            for raw in answer.iter_raw():
                relayed += len(raw)
        record = c.wait_usage(token, grant["reservation_id"], timeout=30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert relayed > BIG_DELTAS * MB  # the client got all of it
    assert (record["status"], record["output_tokens"]) == ("completed", 500)
    # Before: every delta kept, then joined and encoded for the report (628 MB).
    assert peak < 128 * MB, f"{peak / MB:.0f} MB traced at the peak"


def _kept(meter: Meter) -> int:
    calls = meter.tool_calls()
    return len(meter.parts) + sum(len(c.arguments) for c in calls)


def test_the_transcript_keeps_what_a_report_can_carry_and_reports_as_before() -> None:
    meter = Meter(input_estimate=10, keep_transcript=True, delta_is_token=False)
    for _ in range(8):
        meter.record(Delta(BIG))
    meter.record(Usage(10, 5))
    assert len(meter.parts) == TRANSCRIPT_CHARS
    event = usage_event(_grant(), "p", meter, "completed")
    assert len(event.body()) <= MAX_USAGE_BODY_BYTES
    assert event.content and set(event.content) == {"x"}
    assert (event.input_tokens, event.output_tokens) == (10, 5)


def test_tool_calls_past_a_report_are_not_kept_and_none_without_transcripts() -> None:
    without = Meter(input_estimate=10, keep_transcript=False)
    kept = Meter(input_estimate=10, keep_transcript=True)
    for meter in (without, kept):
        meter.record(ToolCallDelta(0, "call_0", "save", ""))
        for _ in range(8):
            meter.record(ToolCallDelta(0, None, None, BIG))
        meter.record(Delta("done"))
    assert not without.calls and _kept(without) == 0
    # Past what a report carries: no call kept, as the report would have none.
    assert not kept.calls and kept.parts.text() == "done"
    assert usage_event(_grant(), "p", kept, "completed").tool_calls is None
    # Within it, calls and text are kept whole.
    small = Meter(input_estimate=10, keep_transcript=True)
    small.record(ToolCallDelta(0, "call_0", "save", '{"a": 1}'))
    small.record(Delta("hi"))
    assert [c.arguments for c in small.tool_calls()] == ['{"a": 1}']
    assert small.content == "hi"


def test_a_million_tiny_deltas_keep_a_bounded_count_of_pieces() -> None:
    meter = Meter(input_estimate=10, keep_transcript=True)
    for _ in range(TRANSCRIPT_PIECES + 1000):
        meter.record(Delta("a"))
    assert len(meter.parts) == TRANSCRIPT_PIECES
    assert meter.relayed_tokens == TRANSCRIPT_PIECES + 1000  # every delta still billed


# A long answer at a vendor streaming a token a delta (OpenAI's way), sent in two
# halves: each delta parsed is a string of its own, ~60 bytes for a 4-character token.
HALF = 40_000
GO_ON = [threading.Event(), threading.Event()]  # the test's go after each half


async def _long_chat(request: Request) -> Response:
    """`HALF` one-token deltas, a pause until the test says go on, twice; then the end."""
    frame = sse_frame({"choices": [{"index": 0, "delta": {"content": " tok"}}]})

    async def frames() -> AsyncIterator[bytes]:
        for go_on in GO_ON:
            for _ in range(HALF // 500):
                yield frame * 500
            while not go_on.is_set():  # the stream stays open while the test measures
                await asyncio.sleep(0.01)
        for ending in openai_ending("stop", 10, 2 * HALF):
            yield ending

    return StreamingResponse(frames(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def long_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessStack]:
    # A context with room for the whole answer: init's `max_tokens` is all of it (the
    # edge ends a backend's stream that goes far past what it was asked for).
    with hostile_backend_stack(
        tmp_path_factory.mktemp("long"),
        "long",
        _long_chat,
        context_length=2 * HALF + 1024,
        max_output_tokens=2 * HALF,
    ) as gateway:
        yield gateway


def test_a_long_answer_holds_a_few_bytes_a_token_for_its_transcript(
    long_stack: InProcessStack,
) -> None:
    """A stream holds its transcript for its whole life, and one company may run 200
    at once on the edge every company streams through. Kept a string per delta, it
    held ~65 bytes a token: a 128k-token answer ~8 MB, 200 of them ~1.6 GB of an edge
    sized at 1 GiB (deploy/k8s), whose every stream goes with the process. Joined as
    it goes, a few bytes a token (the characters and ~1 byte)."""
    c = long_stack.client
    token = c.new_user(c.new_company("100"))
    messages = [{"role": "user", "content": "count"}]
    grant = c.init_ok(token, {"model": "long-model", "messages": messages})
    for go_on in GO_ON:
        go_on.clear()
    held: list[int] = []
    tracemalloc.start()  # the edge serves in this process: its allocations are traced
    try:
        with _streamed(c, grant, messages) as answer:
            lines = answer.iter_lines()
            tokens = 0
            for half, go_on in enumerate(GO_ON, start=1):
                for line in lines:
                    tokens += line.startswith("data: {") and '" tok"' in line
                    if tokens == half * HALF:
                        break
                # The half relayed, the backend paused, the stream open. Counted in
                # blocks, not bytes: what is in flight (frames on their way, read
                # buffers) is a few thousand blocks but up to a MB, either way.
                held.append(len(tracemalloc.take_snapshot().traces))
                go_on.set()
            for _ in lines:
                pass
        record = c.wait_usage(token, grant["reservation_id"], timeout=30)
    finally:
        for go_on in GO_ON:
            go_on.set()
        tracemalloc.stop()
    assert (record["status"], record["output_tokens"]) == ("completed", 2 * HALF)
    per_token = (held[1] - held[0]) / HALF
    # Before: a block a token (the delta's str object, ~65 bytes with its list slot);
    # now one per `JOIN_EVERY` tokens.
    assert per_token < 0.25, f"{per_token:.2f} blocks held a token"
