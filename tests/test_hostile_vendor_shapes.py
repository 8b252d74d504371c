"""Anthropic- and Gemini-shaped backends that send valid JSON the edge cannot use.

Attack (measured before the fix): an Anthropic backend (hostile, or gone wrong) sends
a `content_block_start` or `content_block_delta` whose `index` is not an integer
(`[]`, `{}`: unhashable). The parser looked the index up in a dict and raised
TypeError; the pump's catch-all ended the stream as "the stream broke off" and logged
"unexpected TypeError while relaying", an edge bug for what is bad input. Now such an
event is malformed and skipped, as OpenAI's tool-call entry without an integer
`index` is (`base.openai_tool_deltas`): the rest of the answer goes on. Gemini's
events carry no index; its parser has no lookup of that kind.

Attack (measured before the fix): an Anthropic or Gemini whole answer (`stream:
false`) whose tool call's input is nested 300 levels deep, valid JSON that orjson
reads (to 1024 levels) but will not write (255): re-encoding the arguments raised
TypeError, answered 502 "the edge could not open the backend stream" with "unexpected
TypeError while reading the backend's answer" logged; Gemini's stream parser raised
it too ("the stream broke off"). The bill was right already (`bill_unread` runs
before the error goes up). Now such an answer is a malformed one, 502 `upstream_error`
"the backend's answer was malformed", billed as before, and such a Gemini event a
malformed event (`base.json_text`).

Driven through the control plane and the edge against an in-memory backend
(`tests/inproc.py`), the way the whole-answer billing tests are."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from shared.text_tokens import text_tokens
from stream_edge.upstream.anthropic_messages import AnthropicStreamParser
from stream_edge.upstream.base import (
    MALFORMED_EVENT,
    Delta,
    Failure,
    Finish,
    ToolCallDelta,
    json_text,
    openai_tool_calls,
)
from stream_edge.upstream.gemini import GeminiStreamParser
from stream_edge.upstream.openai_chat import OpenAIStreamParser
from tests.inproc import MOCK, Gateway, events, gateway_env, opened

on_loop = pytest.mark.asyncio(loop_scope="module")

ANTHROPIC, GEMINI = "http://anthropic-shaped.test", "http://gemini-shaped.test"
OPENAI = "http://openai-shaped.test"
PRICE = {"input_per_mtok": "1.0", "output_per_mtok": "2.0"}
MAX_OUT = 4096
CATALOG = {
    "default_model": "mock-fast",
    "providers": {
        "mock": {"api_type": "openai_chat", "base_url": f"{MOCK}/v1"},
        "claude": {"api_type": "anthropic_messages", "base_url": ANTHROPIC},
        "gemini": {"api_type": "gemini", "base_url": GEMINI},
        "openai-shaped": {"api_type": "openai_chat", "base_url": OPENAI},
    },
    "models": {
        name: {
            "provider": provider,
            "upstream_model": name,
            "context_length": 131_072,
            "max_output_tokens": MAX_OUT,
            "features": ["streaming"],
            "price": PRICE,
        }
        for name, provider in (
            ("mock-fast", "mock"),
            ("claude", "claude"),
            ("gemini", "gemini"),
            ("gpt-shaped", "openai-shaped"),
        )
    },
}


def sse(kind: str, doc: dict[str, Any]) -> bytes:
    return f"event: {kind}\n".encode() + b"data: " + orjson.dumps({"type": kind, **doc}) + b"\n\n"


def anthropic_stream(index: Any) -> list[bytes]:
    """A tool block numbered `index`, then a text block, then the end."""
    usage = {"input_tokens": 12, "output_tokens": 1}
    tool = {"type": "tool_use", "id": "toolu_1", "name": "save"}
    arguments = {"type": "input_json_delta", "partial_json": '{"a": 1}'}
    return [
        sse("message_start", {"message": {"usage": usage}}),
        sse("content_block_start", {"index": index, "content_block": tool}),
        sse("content_block_delta", {"index": index, "delta": arguments}),
        sse("content_block_stop", {"index": index}),
        sse("content_block_start", {"index": 1, "content_block": {"type": "text", "text": ""}}),
        sse("content_block_delta", {"index": 1, "delta": {"type": "text_delta", "text": "saved"}}),
        sse("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 7}}),
        sse("message_stop", {}),
    ]


# A tool call's input nested 300 levels deep: JSON that orjson reads (up to 1024
# levels) but does not write (255 at most).
NESTED = b'{"a":' * 300 + b"1" + b"}" * 300
ANTHROPIC_WHOLE = (
    b'{"type":"message","role":"assistant","stop_reason":"tool_use","content":['
    b'{"type":"tool_use","id":"toolu_1","name":"save","input":' + NESTED + b"}],"
    b'"usage":{"input_tokens":12,"output_tokens":900}}'
)
GEMINI_CALL = b'{"candidates":[{"content":{"parts":[{"functionCall":{"name":"save","args":'
GEMINI_WHOLE = (
    GEMINI_CALL + NESTED + b'}}]},"finishReason":"STOP"}],'
    b'"usageMetadata":{"promptTokenCount":12,"candidatesTokenCount":900}}'
)
GEMINI_FRAME = b"data: " + GEMINI_CALL + NESTED + b"}}]}}]}\r\n\r\n"


# What an OpenAI-compatible backend sends as an event's `choices` instead of a list;
# the prompt picks one.
ODD_CHOICES: dict[str, Any] = {"int": 5, "object": {"a": 1}, "true": True, "float": 1.5}


def openai_stream(choices: Any) -> list[bytes]:
    """A text delta, an event whose `choices` is `choices`, more text, the end."""

    def frame(doc: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    def text(word: str) -> bytes:
        return frame({"choices": [{"index": 0, "delta": {"content": word}}]})

    usage = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}
    return [
        text("Hello"),
        frame({"choices": choices}),
        text(" there"),
        frame({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        frame({"choices": [], "usage": usage}),
        b"data: [DONE]\n\n",
    ]


def vendor_backend() -> Starlette:
    """Anthropic's, Gemini's and an OpenAI-compatible endpoint, answering as the
    prompt asks."""

    async def messages(request: Request) -> Response:
        body = orjson.loads(await request.body())
        prompt = body["messages"][-1]["content"]
        if prompt == "whole":  # one JSON document, though asked for a stream
            return Response(ANTHROPIC_WHOLE, media_type="application/json")
        index: Any = {"list": [], "object": {}, "text": "0"}[prompt]

        async def frames() -> AsyncIterator[bytes]:
            for frame in anthropic_stream(index):
                yield frame

        return StreamingResponse(frames(), media_type="text/event-stream")

    async def gemini(request: Request) -> Response:
        body = orjson.loads(await request.body())
        if body["contents"][-1]["parts"][0].get("text") == "whole":
            return Response(GEMINI_WHOLE, media_type="application/json")

        async def frames() -> AsyncIterator[bytes]:
            yield GEMINI_FRAME

        return StreamingResponse(frames(), media_type="text/event-stream")

    async def chat(request: Request) -> Response:
        prompt = orjson.loads(await request.body())["messages"][-1]["content"]

        async def frames() -> AsyncIterator[bytes]:
            for frame in openai_stream(ODD_CHOICES[prompt]):
                yield frame

        return StreamingResponse(frames(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/chat/completions", chat, methods=["POST"]),
            Route("/v1/messages", messages, methods=["POST"]),
            Route("/v1beta/models/{call}", gemini, methods=["POST"]),
        ]
    )


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    tmp = tmp_path_factory.mktemp("vendor-shapes")
    models = Path(tmp) / "models.yaml"
    models.write_text(yaml.safe_dump(CATALOG))
    async with Gateway(gateway_env(str(tmp), LLMGW_MODELS_FILE=str(models))) as gateway:
        backend = vendor_backend()
        gateway.backends.route(ANTHROPIC, backend)
        gateway.backends.route(GEMINI, backend)
        gateway.backends.route(OPENAI, backend)
        yield gateway


async def stream(gw: Gateway, model: str, prompt: str) -> tuple[list[Any], dict[str, Any]]:
    """The streamed answer's `data` documents, and the stream's usage record."""
    access = await gw.new_user()
    grant = await gw.init_ok(access, {"query": prompt, "model": model})
    body = {"stream": True, "messages": [{"role": "user", "content": prompt}]}
    headers = {"Authorization": f"Bearer {grant['stream_token']}"}
    async with opened(await gw.post("/v1/chat/completions", orjson.dumps(body), headers)) as r:
        assert r.status_code == 200
        got = [e.data for e in await events(r)]
    record = await gw.wait_usage(access, grant["reservation_id"])
    return [orjson.loads(d) for d in got if d != "[DONE]"], record


def unexpected(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "unexpected" in r.getMessage()]


@on_loop
@pytest.mark.parametrize("prompt", ["list", "object"])
async def test_an_anthropic_block_with_an_unusable_index_is_skipped_as_malformed(
    gw: Gateway, caplog: pytest.LogCaptureFixture, prompt: str
) -> None:
    caplog.set_level(logging.ERROR)
    chunks, record = await stream(gw, "claude", prompt)
    # Before: "the stream broke off" after nothing, and "unexpected TypeError" logged.
    assert not [c for c in chunks if "error" in c]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "saved"
    assert not any(c["choices"][0]["delta"].get("tool_calls") for c in chunks if c["choices"])
    assert (record["status"], record["output_tokens"]) == ("completed", 7)
    assert unexpected(caplog) == []


def test_the_anthropic_parser_skips_blocks_whose_index_is_no_integer() -> None:
    for index in ([], {}, "0", 1.5, True, None):
        parser = AnthropicStreamParser()
        events = parser.feed(b"".join(anthropic_stream(index)))
        assert not [e for e in events if isinstance(e, ToolCallDelta)], index
        assert [e.text for e in events if isinstance(e, Delta)] == ["saved"]
        assert [e.reason for e in events if isinstance(e, Finish)] == ["stop"]
    # An integer index, whatever its number, still makes call 0.
    events = AnthropicStreamParser().feed(b"".join(anthropic_stream(5)))
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert [(c.index, c.id, c.name, c.arguments) for c in calls] == [
        (0, "toolu_1", "save", ""),
        (0, None, None, '{"a": 1}'),
    ]


@on_loop
@pytest.mark.parametrize(("model", "body"), [("claude", ANTHROPIC_WHOLE), ("gemini", GEMINI_WHOLE)])
async def test_a_whole_answer_with_a_tool_call_nested_too_deep_is_an_upstream_error_billed(
    gw: Gateway, caplog: pytest.LogCaptureFixture, model: str, body: bytes
) -> None:
    caplog.set_level(logging.ERROR)
    access = await gw.new_user()
    grant = await gw.init_ok(access, {"query": "whole", "model": model})
    request = {"stream": False, "messages": [{"role": "user", "content": "whole"}]}
    answered, answer = await gw.complete(grant["stream_token"], request)
    # Before: 502 "the edge could not open the backend stream", an unexpected TypeError.
    assert answered == 502
    assert answer["error"]["code"] == "upstream_error"
    assert answer["error"]["message"] == "the backend's answer was malformed"
    assert unexpected(caplog) == []
    # Billed as any whole answer that failed once generated (`completion.bill_unread`).
    record = await gw.wait_usage(access, grant["reservation_id"])
    assert (record["status"], record["usage_source"]) == ("failed", "estimated")
    assert record["output_tokens"] == min(text_tokens((body,)), MAX_OUT)


@on_loop
async def test_a_gemini_stream_with_a_tool_call_nested_too_deep_ends_as_malformed(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    chunks, record = await stream(gw, "gemini", "deep")
    # Before: "the stream broke off", an unexpected TypeError logged.
    assert chunks[-1]["error"]["message"] == MALFORMED_EVENT
    assert record["status"] == "failed"
    assert unexpected(caplog) == []


def test_arguments_nested_too_deep_are_malformed_for_every_vendor_shape() -> None:
    deep = orjson.loads(NESTED)
    with pytest.raises(ValueError, match="nested too deep"):
        json_text(deep)
    with pytest.raises(ValueError, match="nested too deep"):  # OpenAI, non-string arguments
        openai_tool_calls([{"id": "c", "function": {"name": "save", "arguments": deep}}])
    assert GeminiStreamParser().feed(GEMINI_FRAME) == [Failure(MALFORMED_EVENT)]
    assert json_text({"a": [1, "b"]}) == '{"a":[1,"b"]}'


@on_loop
@pytest.mark.parametrize("prompt", sorted(ODD_CHOICES))
async def test_an_openai_event_whose_choices_is_no_list_is_skipped(
    gw: Gateway, caplog: pytest.LogCaptureFixture, prompt: str
) -> None:
    """Attack (measured before the fix): an OpenAI-compatible backend sends one event
    whose `choices` is a number, an object or `true` instead of a list. The parser
    indexed it (`choices[0]`) and raised TypeError or KeyError; the pump's catch-all
    ended the stream after "Hello" with "the stream broke off", reported it `failed`,
    and logged "unexpected TypeError while relaying". Now an event with no list of
    choices carries no choice, as one whose first choice is no object already did."""
    caplog.set_level(logging.ERROR)
    chunks, record = await stream(gw, "gpt-shaped", prompt)
    assert not [c for c in chunks if "error" in c]
    text = "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in chunks
        if isinstance(c.get("choices"), list) and c["choices"]
    )
    assert text == "Hello there"
    assert (record["status"], record["output_tokens"]) == ("completed", 7)
    assert unexpected(caplog) == []


def test_the_openai_parser_takes_an_event_whose_choices_is_no_list_as_no_choice() -> None:
    for choices in [*ODD_CHOICES.values(), "text", None, []]:
        events = OpenAIStreamParser().feed(b"".join(openai_stream(choices)))
        assert [e.text for e in events if isinstance(e, Delta)] == ["Hello", " there"], choices
        assert [e.reason for e in events if isinstance(e, Finish)] == ["stop"]
