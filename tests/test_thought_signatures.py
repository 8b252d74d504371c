"""Gemini's thought signatures kept server-side and sent back (docs/tool-calls.md).

Gemini 3 signs the first function call of each step and wants the signature back on
that call when the conversation continues. The client's tool call (OpenAI's shape)
cannot carry it, so the edge keeps it in the store under the company and the call id
it minted, and puts it back when a later request to Gemini holds that call. The mock's
Gemini signs its calls (`mock_llm.tools.mock_signature`) and with
`[[mock signatures=1]]` refuses, as Gemini 3 does, a history call without its own
signature (Google's stand-in not accepted), so the round trip shows end to end.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest

from mock_llm.tools import mock_signature
from shared.store_memory import MemoryStore
from stream_edge import thought_signatures as ts
from stream_edge.formats import OpenAIChunkWriter
from stream_edge.meter import Meter
from stream_edge.thought_signatures import SignedCall
from stream_edge.upstream.base import ToolCall, ToolCallDelta, UpstreamCall
from stream_edge.upstream.gemini import SKIP_SIGNATURE, GeminiAdapter, GeminiStreamParser
from tests.adapter_stack import AdapterStack
from tests.stack import base_env

MODEL = "gemini-test"
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    }
]
SIGNATURE = base64.b64encode(b"reasoning" * 40).decode()


def call_history(call_id: str, arguments: str = '{"city":"Paris"}') -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "sunny"},
    ]


def gemini_body(messages: list[dict[str, Any]], signatures: dict[str, str]) -> dict[str, Any]:
    call = UpstreamCall(
        "http://g", "k", "m", messages, 100, True, {}, "r1", thought_signatures=signatures
    )
    body: dict[str, Any] = orjson.loads(GeminiAdapter().build_request(call).body)
    return body


def first_call_part(body: dict[str, Any]) -> dict[str, Any]:
    for content in body["contents"]:
        for part in content["parts"]:
            if "functionCall" in part:
                found: dict[str, Any] = part
                return found
    raise AssertionError("no functionCall part")


# --- pure: parser, meter, request building -------------------------------------------


def test_the_parser_reads_a_calls_signature_and_the_client_never_sees_it() -> None:
    frame = {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [
                        {
                            "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                            "thoughtSignature": SIGNATURE,
                        },
                        {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
                    ],
                },
                "finishReason": "STOP",
            }
        ]
    }
    events = GeminiStreamParser().feed(b"data: " + orjson.dumps(frame) + b"\r\n\r\n")
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    assert [d.signature for d in deltas] == [SIGNATURE, ""]
    meter = Meter(10, keep_transcript=False)
    writer = OpenAIChunkWriter("gemini-test", include_usage=False, passthrough=False)
    frames = b""
    for event in events:
        meter.record(event)
        frames += writer.write(event)
    assert SIGNATURE.encode() not in frames  # the public chunks are OpenAI's shape
    assert [(s.id, s.name, s.signature) for s in meter.signatures] == [
        (deltas[0].id, "get_weather", SIGNATURE)
    ]
    # A whole answer's calls too.
    meter = Meter(10, keep_transcript=False)
    meter.record_text("", None, "tool_calls", (ToolCall("c1", "f", "{}", SIGNATURE),))
    assert [s.signature for s in meter.signatures] == [SIGNATURE]


def test_an_oversized_or_non_ascii_signature_is_not_kept() -> None:
    """A backend's signature past 64 KiB (or not base64-like) is not written to the
    store: the store is bounded per call, not a blob store for a backend to fill."""
    meter = Meter(10, keep_transcript=False)
    big = "A" * (ts.MAX_SIGNATURE_CHARS + 1)
    meter.record(ToolCallDelta(0, "c1", "f", "{}", b"", big))
    meter.record(ToolCallDelta(1, "c2", "f", "{}", b"", "sig\nnature"))
    assert meter.signatures == []
    meter.record(ToolCallDelta(2, "c3", "f", "{}", b"", "A" * ts.MAX_SIGNATURE_CHARS))
    assert [s.id for s in meter.signatures] == ["c3"]
    # At most MAX_PER_ANSWER kept of one answer.
    for i in range(ts.MAX_PER_ANSWER + 5):
        meter.record(ToolCallDelta(3 + i, f"d{i}", "f", "{}", b"", "sig"))
    assert len(meter.signatures) == ts.MAX_PER_ANSWER


async def test_an_oversized_signature_is_never_written_nor_read_back() -> None:
    store = MemoryStore()
    big = "A" * (ts.MAX_SIGNATURE_CHARS + 1)
    await ts.save(store, "co-a", [SignedCall("c1", "get_weather", "{}", big)])
    assert await store.get(ts.signature_key("co-a", "c1")) is None
    # Even if a value that large were in the store, it is not sent.
    raw = (ts.call_digest("get_weather", "{}") + big).encode()
    await store.set(ts.signature_key("co-a", "c1"), raw, 60)
    assert await ts.load(store, "co-a", [("c1", "get_weather", "{}")]) == {}


def test_the_request_carries_kept_signatures_else_the_stand_in() -> None:
    messages = call_history("call_1")
    body = gemini_body(messages, {"call_1": SIGNATURE})
    assert first_call_part(body)["thoughtSignature"] == SIGNATURE
    assert first_call_part(gemini_body(messages, {}))["thoughtSignature"] == SKIP_SIGNATURE
    # Another call's signature is not used for this one.
    other = gemini_body(messages, {"call_2": SIGNATURE})
    assert first_call_part(other)["thoughtSignature"] == SKIP_SIGNATURE


async def test_signatures_are_kept_per_company_and_per_call() -> None:
    """Company B's request naming company A's call id (and the very same call) finds
    nothing: the key is the grant's company's, never the client's to choose."""
    store = MemoryStore()
    call = SignedCall("call_abc", "get_weather", '{"city":"Paris"}', SIGNATURE)
    await ts.save(store, "company-a", [call])
    history = ts.history_calls(call_history("call_abc"))
    assert await ts.load(store, "company-a", history) == {"call_abc": SIGNATURE}
    assert await ts.load(store, "company-b", history) == {}
    # The client re-spacing the JSON text is the same call; edited arguments are not.
    spaced = ts.history_calls(call_history("call_abc", '{ "city": "Paris" }'))
    assert await ts.load(store, "company-a", spaced) == {"call_abc": SIGNATURE}
    edited = ts.history_calls(call_history("call_abc", '{"city":"Rome"}'))
    assert await ts.load(store, "company-a", edited) == {}


@pytest.mark.parametrize(
    "call_id",
    [
        "x}:{c:company-a}",
        "../../company-a",
        "call_abc\r\nDEL *",
        "*",
        "\ud800" * 3,
        "é" * 256,
    ],
    ids=["braces", "dots", "crlf", "glob", "surrogates", "long"],
)
def test_a_client_call_id_names_only_a_digest_in_its_companys_namespace(call_id: str) -> None:
    key = ts.signature_key("company-b", call_id)
    prefix = "gsig:{c:company-b}:"
    assert key.startswith(prefix)
    digest = key[len(prefix) :]
    assert len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


class DownStore(MemoryStore):
    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        raise ConnectionError("store down")

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        raise ConnectionError("store down")


async def test_a_store_that_fails_means_no_signatures_not_a_failure() -> None:
    store = DownStore()
    await ts.save(store, "co", [SignedCall("c1", "get_weather", "{}", SIGNATURE)])  # logged
    found = await ts.load(store, "co", ts.history_calls(call_history("c1")))
    assert found == {}
    assert first_call_part(gemini_body(call_history("c1"), found))["thoughtSignature"] == (
        SKIP_SIGNATURE
    )


# --- end to end: edge and mock Gemini ---------------------------------------------------


@pytest.fixture(scope="module")
def vendors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdapterStack]:
    workdir = tmp_path_factory.mktemp("gsig")
    with AdapterStack(base_env(f"sqlite:///{workdir / 'gateway.db'}"), workdir) as stack:
        yield stack


def request_id_of(grant: dict[str, Any]) -> str:
    payload = grant["stream_token"].split(".")[1]
    claims: dict[str, Any] = orjson.loads(base64.urlsafe_b64decode(payload + "=" * 4))
    return str(claims["request_id"])


def upstream_body(vendors: AdapterStack, grant: dict[str, Any]) -> dict[str, Any]:
    request_id = request_id_of(grant)
    found = [r for r in vendors.upstream_requests() if r["headers"]["x-request-id"] == request_id]
    assert found, "the backend got no request"
    body: dict[str, Any] = found[-1]["body"]
    return body


def first_turn(
    vendors: AdapterStack, token: str, ask: str
) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Turn 1 (a whole answer): Gemini calls a tool; the history to send back."""
    messages: list[Any] = [{"role": "user", "content": ask}]
    grant = vendors.client.init_ok(token, {"model": MODEL, "messages": messages, "tools": TOOLS})
    client = vendors.client.openai(grant["stream_token"], max_retries=0)
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    vendors.client.wait_usage(token, grant["reservation_id"])
    message = answer.choices[0].message
    assert message.tool_calls
    assert "thought" not in answer.model_dump_json().lower()  # the public shape is unchanged
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'})
    return messages, list(message.tool_calls), grant


def second_turn(
    vendors: AdapterStack, token: str, messages: list[Any]
) -> tuple[str | None, dict[str, Any]]:
    grant = vendors.client.init_ok(token, {"model": MODEL, "messages": messages, "tools": TOOLS})
    client = vendors.client.openai(grant["stream_token"], max_retries=0)
    with client.chat.completions.stream(model=MODEL, messages=messages, tools=TOOLS) as stream:
        final = stream.get_final_completion()
    return final.choices[0].message.content, upstream_body(vendors, grant)


def test_a_gemini_calls_signature_comes_back_on_the_next_turn(vendors: AdapterStack) -> None:
    """Turn 1: Gemini answers a call signed S. Turn 2 (the tool result) sends S back
    on that call; the mock refuses any other (`signatures=1`). Before: the stand-in
    went back, and Gemini 3 lost the reasoning behind its call (here, a 400)."""
    c = vendors.client
    token = c.new_user(c.new_company("100"))
    messages, calls, _ = first_turn(
        vendors, token, "Weather twice? [[mock tool_calls=2 signatures=1]]"
    )
    content, body = second_turn(vendors, token, messages)
    assert content  # the model answered the tool results
    part = first_call_part(body)
    expected = mock_signature(calls[0].function.name, orjson.loads(calls[0].function.arguments))
    assert part["thoughtSignature"] == expected != SKIP_SIGNATURE


def test_another_company_naming_the_call_ids_gets_no_signature(vendors: AdapterStack) -> None:
    """Company B replays company A's history, call ids and all: the request to Gemini
    carries Google's stand-in, never A's signature; with the mock's Gemini 3 rule the
    turn is refused rather than run on A's reasoning."""
    c = vendors.client
    token_a = c.new_user(c.new_company("100"))
    token_b = c.new_user(c.new_company("100"))
    messages, calls, _ = first_turn(vendors, token_a, "Trip plans? [[mock tool_calls=1]]")
    signed = mock_signature(calls[0].function.name, orjson.loads(calls[0].function.arguments))
    content, body = second_turn(vendors, token_b, messages)
    assert content
    assert first_call_part(body)["thoughtSignature"] == SKIP_SIGNATURE
    assert signed not in orjson.dumps(body).decode()
    # The same history from company A gets A's own signature back.
    _, body = second_turn(vendors, token_a, messages)
    assert first_call_part(body)["thoughtSignature"] == signed
    # With the mock requiring its signature, B's turn is refused by the backend.
    strict = [{**messages[0], "content": "Trip plans? [[mock tool_calls=1 signatures=1]]"}]
    strict += messages[1:]
    grant = c.init_ok(token_b, {"model": MODEL, "messages": strict, "tools": TOOLS})
    client = c.openai(grant["stream_token"], max_retries=0)
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model=MODEL, messages=strict, tools=TOOLS)


def test_the_store_failing_to_read_signatures_still_sends_the_request(
    vendors: AdapterStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = vendors.client
    token = c.new_user(c.new_company("100"))
    messages, _, _ = first_turn(vendors, token, "Store trouble? [[mock tool_calls=1]]")
    store = vendors.store
    real_get_many = store.get_many

    async def failing(keys: list[str]) -> list[bytes | None]:
        if any(k.startswith(ts.KEY_PREFIX) for k in keys):
            raise ConnectionError("store down")
        return await real_get_many(keys)

    monkeypatch.setattr(store, "get_many", failing)
    content, body = second_turn(vendors, token, messages)
    assert content
    assert first_call_part(body)["thoughtSignature"] == SKIP_SIGNATURE
