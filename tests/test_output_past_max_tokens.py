"""A backend that generates past the `max_tokens` the hold covers is stopped.

Attack (measured before the fix): a member asks, with `max_tokens: 16`, a reasoning
model whose OpenAI-compatible vendor streams its chain of thought outside
`max_tokens` (DeepSeek's `deepseek-reasoner` documented `max_tokens` as the answer's
length after a chain of thought of up to 32K tokens; an in-house server that ignores
it does the same). The edge relayed all of it, the member read 3,000 reasoning
deltas, the vendor's usage said 3,005 output tokens (6,010 micro-credits at the
model's price) and the member was charged the hold (input and 16 output tokens, 42
micro-credits): settlement never charges past the hold. Now the edge ends the stream
once the backend's output deltas pass twice `max_tokens` (plus 16): an honest vendor
sends at most a delta per token, so none is cut; the vendor stops generating when
its request is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import orjson
import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from stream_edge.relay import output_cap
from tests.hostile_catalog import hostile_backend_stack, openai_ending, sse_frame
from tests.stack import InProcessStack

REASONING = 3000
ANSWER = 5
MAX_TOKENS = 16
SENT: list[int] = []  # reasoning deltas the backend generated, per request


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessStack]:
    with hostile_backend_stack(tmp_path_factory.mktemp("thinker"), "thinker", _chat) as gateway:
        yield gateway


async def _chat(request: Request) -> Response:
    """A reasoning model whose chain of thought is not bounded by `max_tokens`: its
    `reasoning_content` deltas run `REASONING` long, then its answer within
    `max_tokens`, then its usage, which counts both."""
    body = orjson.loads(await request.body())
    answer = min(ANSWER, body["max_tokens"])
    SENT.append(0)

    async def frames() -> AsyncIterator[bytes]:
        for _ in range(REASONING):
            SENT[-1] += 1
            yield sse_frame({"choices": [{"index": 0, "delta": {"reasoning_content": " hm"}}]})
            await asyncio.sleep(0.001)  # a model generating, not a burst
        for _ in range(answer):
            yield sse_frame({"choices": [{"index": 0, "delta": {"content": " ok"}}]})
        for frame in openai_ending("stop", 10, REASONING + answer):
            yield frame

    return StreamingResponse(frames(), media_type="text/event-stream")


def _ask(stack: InProcessStack, stream: bool) -> tuple[str, dict[str, str], bytes]:
    messages = [{"role": "user", "content": "think it over"}]
    body = {"model": "thinker-model", "messages": messages, "max_tokens": MAX_TOKENS}
    token, grant, answer = stack.client.member_asks(body, stream)
    record = stack.client.wait_usage(token, grant["reservation_id"], timeout=30)
    return grant["reserved_credits"], record, answer.content


def test_a_backend_thinking_past_max_tokens_is_stopped_at_twice_it(
    stack: InProcessStack,
) -> None:
    held, record, body = _ask(stack, stream=True)
    relayed = body.count(b"reasoning_content")
    # Before: all 3,000 relayed and generated, 3,005 output tokens on the vendor's bill.
    assert relayed <= output_cap(MAX_TOKENS), relayed
    assert SENT[-1] < REASONING // 2, SENT
    assert b'"error"' in body and b"[DONE]" not in body
    assert record["status"] == "failed" and record["usage_source"] == "estimated"
    assert record["output_tokens"] == output_cap(MAX_TOKENS) + 1
    assert record["cost"] == held  # as before: never past the hold


def test_a_whole_answer_thinking_past_max_tokens_is_stopped_too(stack: InProcessStack) -> None:
    held, record, body = _ask(stack, stream=False)
    # Before: the answer joined whole, 3,005 output tokens on the vendor's bill.
    assert SENT[-1] < REASONING // 2, SENT
    assert b'"error"' in body
    assert record["status"] == "failed" and record["usage_source"] == "estimated"
    # Checked per read: what one read holds past the cap is billed too.
    assert output_cap(MAX_TOKENS) < record["output_tokens"] < REASONING // 2
    assert record["cost"] == held
