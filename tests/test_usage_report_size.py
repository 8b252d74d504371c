"""A usage report always fits the body the control plane reads (review 6).

The receiver reads at most 1 MiB of a webhook; a longer body is a 413, which the
edge's outbox takes as permanent (a dead letter). An answer's text has no such
bound: 200,000 tokens of newlines and tabs (two bytes each once escaped in JSON)
made a 1.6 MB report. Before the fix the streamed answer was billed only at its
hold's deadline, from its checkpoint; a `stream: false` answer (which writes no
checkpoint) had its hold released: served for free. Now the report's transcript is
cut to fit and the usage settles at once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import orjson
import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from shared.tokens import StreamGrant
from shared.webhooks import MAX_USAGE_BODY_BYTES
from stream_edge.meter import Meter
from stream_edge.upstream.base import ToolCallDelta, Usage
from stream_edge.usage_report import usage_event
from tests.hostile_catalog import hostile_backend_stack, sse_frame
from tests.stack import InProcessStack

PIECE = "\n\t\t\t"  # a token of indentation: eight bytes once escaped in JSON
ANSWER_TOKENS = 200_000


async def _chat(request: Request) -> Response:
    """An OpenAI-compatible backend answering `max_tokens` tokens of indentation."""
    body = await request.json()
    count = int(body["max_tokens"])
    usage = {"prompt_tokens": 10, "completion_tokens": count, "total_tokens": count + 10}
    if not body.get("stream"):
        message = {"role": "assistant", "content": PIECE * count}
        choice = {"index": 0, "message": message, "finish_reason": "length"}
        doc = {"id": "c", "object": "chat.completion", "choices": [choice], "usage": usage}
        return Response(orjson.dumps(doc), media_type="application/json")

    async def frames() -> AsyncIterator[bytes]:
        for start in range(0, count, 1000):
            delta = {"content": PIECE * min(1000, count - start)}
            yield sse_frame({"choices": [{"index": 0, "delta": delta}]})
        yield sse_frame({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        yield sse_frame({"choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessStack]:
    with hostile_backend_stack(
        tmp_path_factory.mktemp("long"),
        "long",
        _chat,
        context_length=400_000,
        max_output_tokens=ANSWER_TOKENS,
    ) as gateway:
        yield gateway


@pytest.mark.parametrize("stream", [False, True])
def test_a_huge_answer_is_charged_at_once_not_dead_lettered(
    stack: InProcessStack, stream: bool
) -> None:
    c = stack.client
    messages = [{"role": "user", "content": "indent"}]
    body = {"model": "long-model", "messages": messages, "max_tokens": ANSWER_TOKENS}
    token, grant, answer = c.member_asks(body, stream)
    assert answer.status_code == 200
    assert len(answer.content) > MAX_USAGE_BODY_BYTES  # the client got all of it
    record = c.wait_usage(token, grant["reservation_id"], timeout=30)
    assert (record["status"], record["output_tokens"]) == ("completed", ANSWER_TOKENS)
    assert record["cost"] == grant["reserved_credits"]  # 10 + 2 x 200,000 micro-credits
    assert c.credits(token)["held"] == "0.000000"


def _grant() -> StreamGrant:
    return StreamGrant(
        jti="j" * 32,
        company_id="c" * 32,
        user_id="u" * 32,
        role="member",
        scopes=("llm:chat:send",),
        session_id="s" * 32,
        model="m",
        max_tokens=10,
        max_input_tokens=10,
        reservation_id="r" * 32,
        request_id="q" * 32,
        issued_at=0,
        expires_at=0,
    )


def test_a_report_keeps_its_tool_calls_and_as_much_text_as_fits() -> None:
    meter = Meter(input_estimate=10, keep_transcript=True)
    meter.record(Usage(10, 5))
    meter.parts.append("\x01" * 400_000)  # six bytes each once escaped
    meter.record(ToolCallDelta(0, "call_0", "save", '{"a": 1}'))
    event = usage_event(_grant(), "p", meter, "completed")
    assert MAX_USAGE_BODY_BYTES - 8192 < len(event.body()) <= MAX_USAGE_BODY_BYTES
    assert event.tool_calls and event.content and set(event.content) == {"\x01"}
    small = Meter(input_estimate=10, keep_transcript=True)
    small.parts.append("hello")
    assert usage_event(_grant(), "p", small, "completed").content == "hello"


def test_tool_calls_past_the_cap_go_and_the_usage_stays() -> None:
    meter = Meter(input_estimate=10, keep_transcript=True)
    meter.record(Usage(10, 5))
    meter.record(ToolCallDelta(0, "call_0", "save", "\x01" * 400_000))
    event = usage_event(_grant(), "p", meter, "completed")
    assert len(event.body()) <= MAX_USAGE_BODY_BYTES
    assert event.tool_calls is None
    assert (event.input_tokens, event.output_tokens) == (10, 5)
