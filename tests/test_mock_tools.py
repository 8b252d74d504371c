"""The mock's tool calls (`[[mock tool_calls=N]]`) in all four wire formats, in process.

The official `openai` and `anthropic` clients must read them (streamed and whole) as
they read the real vendors; Gemini's and the in-house format are read with the
edge's own adapters. A conversation whose last turn is a tool result gets text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import orjson
import pytest

from mock_llm.app import create_app
from shared.catalog import Provider, SSEBackendSpec
from stream_edge.upstream import adapter_for
from stream_edge.upstream.anthropic_messages import AnthropicMessagesAdapter
from stream_edge.upstream.base import Delta, Finish, ToolCallDelta, ToolCalls, UpstreamCall

KEY = "mock-key-tools"
ASK = "What is the weather in two cities? [[mock tool_calls=2]]"
WEATHER = {
    "name": "get_weather",
    "description": "Weather now",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}
OPENAI_TOOLS: list[Any] = [{"type": "function", "function": WEATHER}]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(api_key=KEY))
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
        yield client


def check_args(arguments: str) -> None:
    args = orjson.loads(arguments)
    assert isinstance(args["city"], str) and args["city"]
    assert isinstance(args["days"], int)


async def test_openai_client_reads_tool_calls_streamed_and_whole(http: httpx.AsyncClient) -> None:
    client = openai.AsyncOpenAI(base_url="http://mock/v1", api_key=KEY, http_client=http)
    messages: list[Any] = [{"role": "user", "content": ASK}]
    whole = await client.chat.completions.create(
        model="mock-fast", messages=messages, tools=OPENAI_TOOLS
    )
    calls = whole.choices[0].message.tool_calls or []
    assert whole.choices[0].finish_reason == "tool_calls" and len(calls) == 2
    assert whole.choices[0].message.content is None
    for call in calls:
        assert call.type == "function" and call.function.name == "get_weather"
        check_args(call.function.arguments)
    async with client.chat.completions.stream(
        model="mock-fast", messages=messages, tools=OPENAI_TOOLS
    ) as stream:
        final = await stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls or []
    assert final.choices[0].finish_reason == "tool_calls"
    assert [(c.id, c.function.arguments) for c in streamed] == [
        (c.id, c.function.arguments) for c in calls
    ]
    # The result goes back; the answer is text.
    messages.append(whole.choices[0].message.model_dump(exclude_none=True))
    messages += [{"role": "tool", "tool_call_id": c.id, "content": "sunny"} for c in calls]
    answer = await client.chat.completions.create(
        model="mock-fast", messages=messages, tools=OPENAI_TOOLS
    )
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.content


async def test_anthropic_client_reads_tool_use_streamed_and_whole() -> None:
    # This `anthropic` release brings its own fork of httpx (`httpx2`).
    transport = httpx2.ASGITransport(app=create_app(api_key=KEY))
    http = httpx2.AsyncClient(transport=transport, base_url="http://mock")
    client = anthropic.AsyncAnthropic(base_url="http://mock", api_key=KEY, http_client=http)
    tools: list[Any] = [
        {"name": "get_weather", "description": "now", "input_schema": WEATHER["parameters"]}
    ]
    messages: list[Any] = [{"role": "user", "content": ASK}]
    whole = await client.messages.create(
        model="mock-fast", max_tokens=200, messages=messages, tools=tools
    )
    uses = [b for b in whole.content if b.type == "tool_use"]
    assert whole.stop_reason == "tool_use" and len(uses) == 2
    for block in uses:
        assert block.name == "get_weather"
        check_args(orjson.dumps(block.input).decode())
    async with client.messages.stream(
        model="mock-fast", max_tokens=200, messages=messages, tools=tools
    ) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.input for b in final.content if b.type == "tool_use"] == [b.input for b in uses]
    messages.append({"role": "assistant", "content": [b.model_dump() for b in uses]})
    results = [{"type": "tool_result", "tool_use_id": b.id, "content": "sunny"} for b in uses]
    messages.append({"role": "user", "content": results})
    answer = await client.messages.create(
        model="mock-fast", max_tokens=200, messages=messages, tools=tools
    )
    assert answer.stop_reason == "end_turn" and answer.content[0].type == "text"
    await http.aclose()


def parsed(api_type: str, body: bytes) -> tuple[list[Any], list[str]]:
    sse = SSEBackendSpec() if api_type == "sse_backend" else None
    adapter = adapter_for(Provider("p", api_type, "http://mock", sse=sse))
    assert adapter is not None
    parser, calls, finishes = adapter.stream_parser(), ToolCalls(), []
    for event in parser.feed(body):
        if isinstance(event, ToolCallDelta):
            calls.add(event)
        elif isinstance(event, Finish):
            finishes.append(event.reason)
        assert not isinstance(event, Delta)
    assert parser.done
    return calls.complete(), finishes


async def test_gemini_function_calls_streamed_and_whole(http: httpx.AsyncClient) -> None:
    body = {
        "contents": [{"role": "user", "parts": [{"text": ASK}]}],
        "tools": [{"functionDeclarations": [WEATHER]}],
    }
    headers = {"x-goog-api-key": KEY}
    url = "/v1beta/models/mock-fast:streamGenerateContent?alt=sse"
    stream = await http.post(url, json=body, headers=headers)
    calls, finishes = parsed("gemini", stream.content)
    assert finishes == ["tool_calls"] and [c.name for c in calls] == ["get_weather"] * 2
    for call in calls:
        check_args(call.arguments)
    whole = await http.post("/v1beta/models/mock-fast:generateContent", json=body, headers=headers)
    parts = whole.json()["candidates"][0]["content"]["parts"]
    assert [p["functionCall"]["name"] for p in parts] == ["get_weather"] * 2
    body["contents"] += [
        {"role": "model", "parts": parts},
        {
            "role": "user",
            "parts": [{"functionResponse": {"name": "get_weather", "response": {"sky": "blue"}}}]
            * 2,
        },
    ]
    answer = await http.post("/v1beta/models/mock-fast:generateContent", json=body, headers=headers)
    assert answer.json()["candidates"][0]["content"]["parts"][0]["text"]


async def test_inhouse_tool_calls(http: httpx.AsyncClient) -> None:
    messages = [{"role": "user", "content": ASK}]
    stream = await http.post("/sse/chat", json={"messages": messages, "tools": OPENAI_TOOLS})
    calls, finishes = parsed("sse_backend", stream.content)
    assert finishes == ["tool_calls"] and len(calls) == 2
    for call in calls:
        check_args(call.arguments)


async def test_tool_calls_directive_without_tools_is_refused(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/chat/completions",
        json={"model": "mock-fast", "messages": [{"role": "user", "content": ASK}]},
        headers={"authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_mock_directive"


async def test_anthropic_history_with_tool_blocks_needs_tools_and_the_adapter_declares_them() -> (
    None
):
    """Anthropic refuses tool blocks in a request that defines no tools (its 400,
    anthropic-sdk-python#494), and so does the mock now. Our adapter's request for
    such a history, with no tools offered, goes through the official client."""
    transport = httpx2.ASGITransport(app=create_app(api_key=KEY))
    http = httpx2.AsyncClient(transport=transport, base_url="http://mock")
    client = anthropic.AsyncAnthropic(base_url="http://mock", api_key=KEY, http_client=http)
    use = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Rome"}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}
    history: list[Any] = [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": [use]},
        {"role": "user", "content": [result]},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "Thanks"},
    ]
    with pytest.raises(anthropic.BadRequestError, match="must define tools"):
        await client.messages.create(model="mock-fast", max_tokens=50, messages=history)
    openai_history = [
        {"role": "user", "content": "Weather in Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "Thanks"},
    ]
    call = UpstreamCall("http://mock", KEY, "mock-fast", openai_history, 500, False, {}, "r1")
    body = orjson.loads(AnthropicMessagesAdapter().build_request(call).body)
    assert body["messages"] == history
    answer = await client.messages.create(**body)  # before: BadRequestError, no tools
    assert answer.stop_reason == "end_turn" and answer.content[0].type == "text"
    await http.aclose()
