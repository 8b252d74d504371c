"""Tool calls through every adapter, pure: parsers, request translation, writers, meter.

Each `*_tools_stream.sse` capture holds two parallel calls whose argument fragments
are split across events; every capture is also fed split at every byte size from 1
to 7 and at each line break. Whatever the vendor's wire format, the edge must yield
the same two calls and `finish_reason: "tool_calls"`.
"""

from __future__ import annotations

from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any

import openai.types.chat as oa
import orjson
import pytest
from google.genai import types as genai_types

from shared.catalog import ModelSpec, Price, Provider, SSEBackendSpec
from shared.tokens import StreamGrant
from stream_edge.errors import BadRequest
from stream_edge.formats import EventSourceWriter, OpenAIChunkWriter, completion_object
from stream_edge.meter import Meter
from stream_edge.requests import parse_chat_request
from stream_edge.upstream import adapter_for
from stream_edge.upstream.base import (
    Adapter,
    Delta,
    Finish,
    ToolCall,
    ToolCallDelta,
    ToolCalls,
    UpstreamCall,
    UpstreamEvent,
)

FIXTURES = Path(__file__).parent / "fixtures"
API_TYPES = ["openai_chat", "anthropic_messages", "gemini", "sse_backend"]
CAPTURES = {
    "openai_chat": "openai_chat_tools_stream.sse",
    "anthropic_messages": "anthropic_messages_tools_stream.sse",
    "gemini": "gemini_tools_stream.sse",
    "sse_backend": "sse_backend_tools_stream.sse",
}
TEXT = {"anthropic_messages": "Let me check both."}
# (name, arguments as JSON) of the two calls in every capture.
CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Asia/Tōkyo"})]


def adapter(api_type: str) -> Adapter:
    sse = SSEBackendSpec() if api_type == "sse_backend" else None
    found = adapter_for(Provider("p", api_type, "http://backend", sse=sse))
    assert found is not None
    return found


def events_of(api_type: str, chunks: list[bytes]) -> list[UpstreamEvent]:
    parser = adapter(api_type).stream_parser()
    out: list[UpstreamEvent] = []
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    assert parser.done
    return out


def splits(data: bytes) -> list[list[bytes]]:
    ways = [[data[i : i + n] for i in range(0, len(data), n)] for n in range(1, 8)]
    cuts = sorted({i for i, b in enumerate(data) if b in b"\r\n"} | {0, len(data)})
    ways.append([data[a:b] for a, b in pairwise(cuts) if b > a])
    return ways


def calls_of(events: list[UpstreamEvent]) -> list[ToolCall]:
    calls = ToolCalls()
    for event in events:
        if isinstance(event, ToolCallDelta):
            calls.add(event)
    return calls.complete()


@pytest.mark.parametrize("api_type", API_TYPES)
def test_every_wire_format_yields_both_parallel_calls(api_type: str) -> None:
    data = (FIXTURES / CAPTURES[api_type]).read_bytes()
    for chunks in splits(data):
        events = events_of(api_type, chunks)
        calls = calls_of(events)
        assert [(c.name, orjson.loads(c.arguments)) for c in calls] == CALLS
        assert all(c.id for c in calls) and len({c.id for c in calls}) == 2
        assert [e.reason for e in events if isinstance(e, Finish)] == ["tool_calls"]
        assert "".join(e.text for e in events if isinstance(e, Delta)) == TEXT.get(api_type, "")


def openai_chunks(frames: bytes) -> list[oa.ChatCompletionChunk]:
    out = []
    for block in frames.decode().split("\n\n"):
        if block.startswith("data: ") and block != "data: [DONE]":
            out.append(oa.ChatCompletionChunk.model_validate_json(block[6:]))
    return out


@pytest.mark.parametrize("api_type", ["anthropic_messages", "gemini", "sse_backend"])
def test_chunks_are_openais_exact_tool_call_shape(api_type: str) -> None:
    data = (FIXTURES / CAPTURES[api_type]).read_bytes()
    writer = OpenAIChunkWriter("our-model", include_usage=False, passthrough=False)
    frames = b"".join(writer.write(e) for e in events_of(api_type, [data]))
    chunks = openai_chunks(frames)
    tool_deltas = [
        c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls
    ]
    firsts = [d.tool_calls[0] for d in tool_deltas if d.tool_calls and d.tool_calls[0].id]
    # The first fragment of a call names it; later ones carry index and arguments only.
    assert [(t.index, t.type, t.function and t.function.name) for t in firsts] == [
        (0, "function", "get_weather"),
        (1, "function", "get_time"),
    ]
    raw = [orjson.loads(b[6:]) for b in frames.split(b"\n\n") if b.startswith(b"data: {")]
    later = [
        tc
        for doc in raw
        for tc in doc["choices"][0]["delta"].get("tool_calls", [])
        if "id" not in tc
    ]
    assert all(
        set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"} for tc in later
    )
    args: dict[int, str] = {}
    for d in tool_deltas:
        for tc in d.tool_calls or []:
            args[tc.index] = args.get(tc.index, "") + (
                (tc.function and tc.function.arguments) or ""
            )
    assert [orjson.loads(args[i]) for i in (0, 1)] == [a for _, a in CALLS]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[0].choices[0].delta.role == "assistant"


def test_eventsource_sends_one_tool_call_event_per_call_before_complete() -> None:
    data = (FIXTURES / CAPTURES["anthropic_messages"]).read_bytes()
    writer = EventSourceWriter("s1")
    frames = b"".join(writer.write(e) for e in events_of("anthropic_messages", [data]))
    frames += b"".join(writer.tool_call_frames()) + writer.complete("tool_calls", 1, 2)
    blocks = [b for b in frames.decode().split("\n\n") if b]
    kinds = [next(x[7:] for x in b.split("\n") if x.startswith("event: ")) for b in blocks]
    assert kinds == ["chunk", "tool_call", "tool_call", "complete"]
    ids = [int(next(x[4:] for x in b.split("\n") if x.startswith("id: "))) for b in blocks]
    assert ids == [1, 2, 3, 4]
    payloads = [
        orjson.loads(next(x[6:] for x in b.split("\n") if x.startswith("data: "))) for b in blocks
    ]
    assert [
        (p["index"], p["id"], p["name"], orjson.loads(p["arguments"])) for p in payloads[1:3]
    ] == [
        (0, "toolu_01Pa1weather", "get_weather", {"city": "Paris"}),
        (1, "toolu_01To2time", "get_time", {"tz": "Asia/Tōkyo"}),
    ]
    assert all(isinstance(p["arguments"], str) for p in payloads[1:3])
    assert payloads[3]["finish_reason"] == "tool_calls"


def test_tool_call_fragments_count_as_output_when_the_vendor_reports_none() -> None:
    data = (FIXTURES / CAPTURES["anthropic_messages"]).read_bytes()
    events = [e for e in events_of("anthropic_messages", [data]) if isinstance(e, ToolCallDelta)]
    meter = Meter(input_estimate=10, keep_transcript=True, delta_is_token=False)
    for event in events:
        meter.record(event)
    billing = meter.billing()
    assert billing.source == "estimated" and billing.output_tokens >= 10
    assert meter.first_token_at is not None
    assert [c.name for c in meter.tool_calls()] == ["get_weather", "get_time"]


# --- requests: OpenAI shapes in, each vendor's shapes out -------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": "sunny"},
]
PARAMS = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}


def call(stream: bool = True) -> UpstreamCall:
    return UpstreamCall("http://b", "k", "m", HISTORY, 100, stream, PARAMS, "r1")


def body_of(api_type: str) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(adapter(api_type).build_request(call()).body)
    return doc


def test_anthropic_request_uses_tool_use_and_tool_result_blocks() -> None:
    body = body_of("anthropic_messages")
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather in a city",
            "input_schema": TOOLS[0]["function"]["parameters"],
        }
    ]
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert body["system"] == "Be brief."
    assert body["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "call_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "call_2",
                    "name": "get_weather",
                    "input": {"city": "Rome"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": '{"temp": 21}'},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "sunny"},
            ],
        },
    ]


def test_gemini_request_uses_function_declarations_calls_and_responses() -> None:
    body = body_of("gemini")
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Weather in a city",
                    "parametersJsonSchema": TOOLS[0]["function"]["parameters"],
                }
            ]
        }
    ]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    assert body["contents"][1:] == [
        {
            "role": "model",
            "parts": [
                {
                    "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                    "thoughtSignature": "skip_thought_signature_validator",
                },
                {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}},
                {"functionResponse": {"name": "get_weather", "response": {"content": "sunny"}}},
            ],
        },
    ]


# What OpenAI clients send as `parameters`: full JSON Schema, with keywords Gemini's
# `parameters` (an OpenAPI subset Schema) refuses.
JSON_SCHEMA_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "book",
        "parameters": {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {
                "kind": {"const": "room"},
                "when": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
                "nights": {"type": "integer", "default": 1, "examples": [2]},
                "guest": {"$ref": "#/$defs/guest"},
            },
            "$defs": {"guest": {"type": "object", "patternProperties": {"^x-": {}}}},
            "required": ["kind"],
            "additionalProperties": False,
        },
    },
}


def test_gemini_declarations_carry_openais_json_schema_as_parameters_json_schema() -> None:
    """Gemini's `parameters` is an OpenAPI subset: google-genai's `Schema` forbids
    `$schema`, `oneOf`, `const`, `examples`, `patternProperties` (and the SDK refuses
    `additionalProperties` for the Gemini API), and Gemini answers 400 to the whole
    turn. Before: the schema went as `parameters`, which the SDK's own type refuses.
    Now it goes as `parametersJsonSchema` (JSON Schema, kept as the member wrote it)."""
    params = {"tools": [JSON_SCHEMA_TOOL]}
    upstream = UpstreamCall("http://b", "k", "m", HISTORY[:2], 100, True, params, "r1")
    body = orjson.loads(adapter("gemini").build_request(upstream).body)
    [tool] = body["tools"]
    parsed = genai_types.Tool.model_validate_json(orjson.dumps(tool))  # the SDK's own type
    [declaration] = parsed.function_declarations or []
    assert declaration.parameters is None
    assert declaration.parameters_json_schema == JSON_SCHEMA_TOOL["function"]["parameters"]


def test_gemini_history_calls_carry_a_thought_signature_gemini_3_accepts() -> None:
    """Gemini 3 refuses a history whose first function call of a step has no
    `thoughtSignature` ("Function call is missing a thought_signature"). We hold no
    signature for a call (OpenAI's shape has none; the call may be another vendor's),
    so it carries Google's documented stand-in; the other parallel calls carry none,
    as Gemini sends them. Before: no signature, a 400 on every turn after a call."""
    body = body_of("gemini")
    model_turn = genai_types.Content.model_validate_json(orjson.dumps(body["contents"][1]))
    parts = model_turn.parts or []
    assert [p.function_call.name for p in parts if p.function_call] == ["get_weather"] * 2
    assert parts[0].thought_signature is not None
    assert parts[1].thought_signature is None
    assert body["contents"][1]["parts"][0]["thoughtSignature"] == (
        "skip_thought_signature_validator"
    )


@pytest.mark.parametrize("api_type", ["openai_chat", "sse_backend"])
def test_openai_shaped_backends_get_the_tools_and_messages_as_sent(api_type: str) -> None:
    body = body_of(api_type)
    assert body["messages"] == HISTORY
    assert {k: body[k] for k in PARAMS} == PARAMS


@pytest.mark.parametrize(
    ("api_type", "body"),
    [
        (
            "openai_chat",
            {
                "choices": [
                    {
                        "message": {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [
                                {
                                    "id": "call_1",
                                    "type": "function",
                                    "function": {
                                        "name": "get_weather",
                                        "arguments": '{"city":"Paris"}',
                                    },
                                }
                            ],
                        },
                        "finish_reason": "tool_calls",
                    }
                ]
            },
        ),
        (
            "anthropic_messages",
            {
                "type": "message",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "call_1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    }
                ],
                "stop_reason": "tool_use",
                "usage": {"input_tokens": 5, "output_tokens": 7},
            },
        ),
        (
            "gemini",
            {
                "candidates": [
                    {
                        "content": {
                            "role": "model",
                            "parts": [
                                {
                                    "functionCall": {
                                        "id": "call_1",
                                        "name": "get_weather",
                                        "args": {"city": "Paris"},
                                    }
                                }
                            ],
                        },
                        "finishReason": "STOP",
                    }
                ]
            },
        ),
    ],
)
def test_whole_answers_carry_message_tool_calls(api_type: str, body: dict[str, Any]) -> None:
    completion = adapter(api_type).parse_completion(orjson.dumps(body))
    assert completion.finish_reason == "tool_calls"
    assert [(c.id, c.name, orjson.loads(c.arguments)) for c in completion.tool_calls] == [
        ("call_1", "get_weather", {"city": "Paris"})
    ]
    doc = completion_object(
        "m", completion.text, completion.finish_reason, None, completion.tool_calls
    )
    parsed = oa.ChatCompletion.model_validate(doc)
    message = parsed.choices[0].message
    assert message.content is None and message.tool_calls is not None
    assert message.tool_calls[0].function.name == "get_weather"


# --- the edge's /v1/chat/completions body ----------------------------------------

GRANT = StreamGrant(
    jti="j", user_id="u", company_id="c", role="member", scopes=("llm:chat:send",),
    session_id="s", model="m", max_tokens=100, max_input_tokens=10_000,
    reservation_id="r", request_id="q", issued_at=0, expires_at=0,
)  # fmt: skip
PRICE = Price(Decimal(1), Decimal(2))
MODEL = ModelSpec("m", "p", "m", 8192, 1024, PRICE, ("streaming", "tools"))


def test_edge_accepts_the_tool_loop_body_and_counts_every_part() -> None:
    chat = parse_chat_request({"messages": HISTORY, **PARAMS}, GRANT, MODEL)
    assert chat.messages == HISTORY
    assert chat.params == PARAMS
    bare = parse_chat_request({"messages": HISTORY[:2]}, GRANT, MODEL)
    # The tool calls, results and schemas all go upstream, so all count.
    assert chat.input_estimate > bare.input_estimate + len(orjson.dumps(HISTORY[2:])) // 3


def _tool_msg(**extra: Any) -> list[dict[str, Any]]:
    return [*HISTORY[:3], {"role": "tool", "tool_call_id": "call_1", "content": "x", **extra}]


@pytest.mark.parametrize(
    "body",
    [
        {"messages": HISTORY, "tools": "nope"},
        {"messages": HISTORY, "tools": [{"type": "function"}]},
        {"messages": HISTORY, "tools": [{"type": "function", "function": {"name": "bad name!"}}]},
        {"messages": HISTORY, "tools": TOOLS, "tool_choice": "sometimes"},
        {
            "messages": HISTORY,
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
        },
        {"messages": HISTORY, "tools": TOOLS, "parallel_tool_calls": "yes"},
        {"messages": [*HISTORY[:2], {"role": "tool", "content": "x"}], "tools": TOOLS},
        {"messages": _tool_msg(tool_call_id=5), "tools": TOOLS},
        {"messages": [*HISTORY[:2], {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
        {
            "messages": [
                *HISTORY[:2],
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}
                    ],
                },
            ]
        },
        {"messages": [*HISTORY[:2], {"role": "assistant", "tool_calls": []}]},
        {
            "messages": [
                *HISTORY[:2],
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c", "type": "web", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
            ]
        },
    ],
)
def test_edge_refuses_malformed_tool_shapes_with_a_400(body: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        parse_chat_request(body, GRANT, MODEL)


def test_edge_refuses_tools_for_a_model_without_the_feature() -> None:
    plain = ModelSpec("m", "p", "m", 8192, 1024, PRICE)
    with pytest.raises(BadRequest) as caught:
        parse_chat_request({"messages": HISTORY[:2], "tools": TOOLS}, GRANT, plain)
    assert caught.value.code == "unsupported_feature"
