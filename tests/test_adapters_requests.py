"""The adapters' pure request side: URLs, headers, bodies; whole answers; error
statuses; the registry. Tables of cases, no I/O."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest

from shared.catalog import Provider, SSEBackendSpec
from stream_edge.upstream import adapter_for
from stream_edge.upstream.anthropic_messages import AnthropicMessagesAdapter
from stream_edge.upstream.base import Adapter, CallerContext, Completion, UpstreamCall, Usage
from stream_edge.upstream.gemini import GeminiAdapter
from stream_edge.upstream.openai_chat import OpenAIChatAdapter
from stream_edge.upstream.sse_backend import SSEBackendAdapter, lookup

MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Tell "}, {"type": "text", "text": "me"}],
    },
]
CONTEXT = CallerContext("user-1", "company-1", "member", "session-1", "req-1")
CALL = UpstreamCall(
    base_url="https://backend.example", api_key="upstream-key", upstream_model="vendor/model-1",
    messages=MESSAGES, max_tokens=77, stream=True,
    params={"temperature": 1.5, "top_p": 0.5, "stop": ["END"], "seed": 3},
    request_id="req-1", context=CONTEXT,
)  # fmt: skip
TRUSTED = {"x-service-token", "x-user-id", "x-company-id", "x-user-role", "x-session-id"}
ADAPTERS: dict[str, Adapter] = {
    "openai_chat": OpenAIChatAdapter(),
    "anthropic_messages": AnthropicMessagesAdapter(),
    "gemini": GeminiAdapter(),
    "sse_backend": SSEBackendAdapter(SSEBackendSpec(path="/sse/chat")),
}


def build(api_type: str, **changes: Any) -> tuple[str, dict[str, str], dict[str, Any]]:
    request = ADAPTERS[api_type].build_request(dataclasses.replace(CALL, **changes))
    return request.url, request.headers, orjson.loads(request.body)


@pytest.mark.parametrize(
    ("api_type", "stream", "url", "auth"),
    [
        ("openai_chat", True, "https://backend.example/chat/completions",
         {"authorization": "Bearer upstream-key"}),
        ("openai_chat", False, "https://backend.example/chat/completions",
         {"authorization": "Bearer upstream-key"}),
        ("anthropic_messages", True, "https://backend.example/v1/messages",
         {"x-api-key": "upstream-key", "anthropic-version": "2023-06-01"}),
        ("gemini", True,
         "https://backend.example/v1beta/models/vendor%2Fmodel-1:streamGenerateContent?alt=sse",
         {"x-goog-api-key": "upstream-key"}),
        ("gemini", False, "https://backend.example/v1beta/models/vendor%2Fmodel-1:generateContent",
         {"x-goog-api-key": "upstream-key"}),
        ("sse_backend", True, "https://backend.example/sse/chat",
         {"authorization": "Bearer upstream-key"}),
    ],
)  # fmt: skip
def test_url_and_auth_headers(api_type: str, stream: bool, url: str, auth: dict[str, str]) -> None:
    got_url, headers, _ = build(api_type, stream=stream)
    assert got_url == url
    assert headers.items() >= auth.items()
    assert headers["content-type"] == "application/json"
    assert "upstream-key" not in got_url  # keys in URLs end up in access logs
    # Exactly one credential header, and no caller context for a provider without a
    # service token (public vendors never learn who the caller is).
    credentials = {"authorization", "x-api-key", "x-goog-api-key"} & set(headers)
    assert len(credentials) == 1
    assert not TRUSTED & set(headers)


@pytest.mark.parametrize("api_type", list(ADAPTERS))
def test_no_key_no_credential_header(api_type: str) -> None:
    _, headers, _ = build(api_type, api_key=None)
    assert not {"authorization", "x-api-key", "x-goog-api-key"} & set(headers)


@pytest.mark.parametrize("api_type", list(ADAPTERS))
def test_service_token_sends_the_caller_context(api_type: str) -> None:
    _, headers, _ = build(api_type, service_token="svc-token")
    assert {k: headers[k] for k in (*TRUSTED, "x-request-id")} == {
        "x-service-token": "svc-token",
        "x-user-id": "user-1",
        "x-company-id": "company-1",
        "x-user-role": "member",
        "x-session-id": "session-1",
        "x-request-id": "req-1",
    }


def test_context_header_values_cannot_break_the_request() -> None:
    context = CallerContext("u\r\nX-Evil: 1", "c", "member", "sé", "r")
    _, headers, _ = build("sse_backend", service_token="t", context=context)
    assert headers["x-user-id"] == "u%0D%0AX-Evil%3A%201"
    assert headers["x-session-id"] == "s%C3%A9"


def test_openai_body() -> None:
    _, _, body = build("openai_chat")
    assert body["model"] == "vendor/model-1" and body["max_tokens"] == 77
    assert body["messages"] == MESSAGES and body["temperature"] == 1.5
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    _, _, body = build("openai_chat", stream=False)
    assert body["stream"] is False and "stream_options" not in body


def test_anthropic_body_pulls_the_system_prompt_out() -> None:
    _, _, body = build("anthropic_messages")
    assert body == {
        "model": "vendor/model-1",
        "max_tokens": 77,
        "system": "Be brief.",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Tell me"},
        ],
        "stream": True,
        "temperature": 1.0,  # clamped to Anthropic's 0..1
        "top_p": 0.5,
        "stop_sequences": ["END"],
    }
    _, _, body = build("anthropic_messages", messages=MESSAGES[1:2], params={}, stream=False)
    assert "system" not in body and body["stream"] is False


def test_gemini_body() -> None:
    _, _, body = build("gemini")
    assert body == {
        "contents": [
            {"role": "user", "parts": [{"text": "Hi"}]},
            {"role": "model", "parts": [{"text": "Hello!"}]},
            {"role": "user", "parts": [{"text": "Tell me"}]},
        ],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "generationConfig": {
            "maxOutputTokens": 77,
            "temperature": 1.5,
            "topP": 0.5,
            "seed": 3,
            "stopSequences": ["END"],
        },
    }
    assert "model" not in body  # the model is in the URL


def test_sse_backend_body() -> None:
    _, headers, body = build("sse_backend", stream=False)
    # The service only streams; a non-streaming call reads the whole stream.
    assert body["stream"] is True and headers["accept"] == "text/event-stream"
    assert body["model"] == "vendor/model-1" and body["max_tokens"] == 77
    assert body["messages"] == MESSAGES


@pytest.mark.parametrize(
    ("api_type", "body", "expected"),
    [
        ("openai_chat",
         {"choices": [{"message": {"content": "hi"}, "finish_reason": "length"}],
          "usage": {"prompt_tokens": 3, "completion_tokens": 1}},
         Completion("hi", "length", Usage(3, 1))),
        ("anthropic_messages",
         {"type": "message", "content": [{"type": "text", "text": "Hel"},
                                         {"type": "tool_use", "id": "x"},
                                         {"type": "text", "text": "lo"}],
          "stop_reason": "max_tokens",
          "usage": {"input_tokens": 4, "cache_creation_input_tokens": 6, "output_tokens": 2}},
         Completion("Hello", "length", Usage(10, 2, cache_write_tokens=6))),
        ("anthropic_messages",
         {"type": "message", "content": [], "stop_reason": "end_turn", "usage": {}},
         Completion("", "stop", None)),
        ("gemini",
         {"candidates": [{"content": {"parts": [{"text": "Hi"}, {"text": " there"}]},
                          "finishReason": "STOP"}],
          "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2,
                            "thoughtsTokenCount": 10}},
         Completion("Hi there", "stop", Usage(5, 12, reasoning_tokens=10))),
        ("gemini", {"promptFeedback": {"blockReason": "SAFETY"}},
         Completion("", "content_filter", None)),
    ],
)  # fmt: skip
def test_parse_completion(api_type: str, body: Any, expected: Completion) -> None:
    assert ADAPTERS[api_type].parse_completion(orjson.dumps(body)) == expected


def test_sse_backend_completion_reads_the_whole_stream() -> None:
    stream = b'data: {"delta":"a"}\r\n\r\ndata: {"delta":"b"}\n\ndata: {"finish":"length"}\n\n'
    adapter = ADAPTERS["sse_backend"]
    assert adapter.parse_completion(stream) == Completion("ab", "length", None)
    with_usage = stream + b'data: {"usage":{"input":2,"output":2}}\n\ndata: [DONE]'
    assert adapter.parse_completion(with_usage).usage == Usage(2, 2)


@pytest.mark.parametrize(
    ("api_type", "body"),
    [
        ("openai_chat", b"not json"),
        ("openai_chat", b'{"choices": []}'),
        ("anthropic_messages", b'{"type": "error", "error": {"type": "api_error"}}'),
        ("anthropic_messages", b"[]"),
        ("anthropic_messages", b'{"type": "message"}'),
        ("gemini", b'{"error": {"code": 500}}'),
        ("gemini", b"{}"),
        ("gemini", b"<html>"),
        ("sse_backend", b'data: {"delta": "cut short"}\n\n'),
        ("sse_backend", b'data: {"error": {"message": "no"}}\n\ndata: [DONE]\n\n'),
    ],
)
def test_parse_completion_rejects(api_type: str, body: bytes) -> None:
    with pytest.raises(ValueError):
        ADAPTERS[api_type].parse_completion(body)


@pytest.mark.parametrize(
    ("api_type", "status", "body", "expected"),
    [
        ("gemini", 400, b'{"error":{"details":[{"reason":"API_KEY_INVALID"}]}}', 401),
        ("gemini", 400, b'{"error":{"status":"INVALID_ARGUMENT"}}', 400),
        # Google quoting a member's tool schema back: the words are not the reason.
        (
            "gemini",
            400,
            b'{"error":{"code":400,"message":"Invalid JSON payload received. Unknown name '
            b"\\\"API_KEY_INVALID\\\" at 'tools[0].function_declarations[0].parameters': "
            b'Cannot find field.","status":"INVALID_ARGUMENT","details":[{"@type":'
            b'"type.googleapis.com/google.rpc.BadRequest"}]}}',
            400,
        ),
        ("gemini", 400, b"API_KEY_INVALID", 400),
        ("gemini", 403, b"", 403),
        ("anthropic_messages", 529, b"", 529),
        ("openai_chat", 401, b"", 401),
        ("sse_backend", 400, b"API_KEY_INVALID", 400),
    ],
)
def test_error_status(api_type: str, status: int, body: bytes, expected: int) -> None:
    assert ADAPTERS[api_type].error_status(status, body) == expected


RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"


def google_error(*details: object) -> bytes:
    return orjson.dumps(
        {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": details}}
    )


@pytest.mark.parametrize(
    ("api_type", "body", "expected"),
    [
        # Google's 429: no Retry-After header, the wait is a RetryInfo Duration.
        ("gemini", google_error({"@type": RETRY_INFO, "retryDelay": "17s"}), 17.0),
        (
            "gemini",
            google_error(
                {"@type": "x.QuotaFailure"}, {"@type": RETRY_INFO, "retryDelay": "45.837906927s"}
            ),
            45.837906927,
        ),
        ("gemini", google_error({"@type": RETRY_INFO, "retryDelay": "-3s"}), None),
        ("gemini", google_error({"@type": RETRY_INFO, "retryDelay": "1e400s"}), None),
        ("gemini", google_error({"@type": RETRY_INFO, "retryDelay": 17}), None),
        ("gemini", google_error({"retryDelay": "17s"}), None),
        ("gemini", orjson.dumps({"error": {"details": "17s"}}), None),
        ("gemini", b"not json", None),
        ("openai_chat", google_error({"@type": RETRY_INFO, "retryDelay": "17s"}), None),
    ],
)
def test_retry_after_read_from_the_error_body(
    api_type: str, body: bytes, expected: float | None
) -> None:
    assert ADAPTERS[api_type].retry_after(body) == expected


def test_registry_picks_the_adapter_by_api_type() -> None:
    kinds = {
        api_type: type(adapter_for(Provider("p", api_type, "http://x")))
        for api_type in (*ADAPTERS, "soap")
    }
    assert kinds == {
        "openai_chat": OpenAIChatAdapter,
        "anthropic_messages": AnthropicMessagesAdapter,
        "gemini": GeminiAdapter,
        "sse_backend": SSEBackendAdapter,
        "soap": type(None),
    }
    spec = SSEBackendSpec(path="/v2/stream", content_path="text")
    adapter = adapter_for(Provider("p", "sse_backend", "http://x", sse=spec))
    assert isinstance(adapter, SSEBackendAdapter) and adapter.spec == spec


def test_sse_backend_paths_are_configurable() -> None:
    spec = SSEBackendSpec(
        content_path="choices.0.delta.content",
        usage_input_path="usage.prompt_tokens",
        usage_output_path="usage.completion_tokens",
        finish_path="choices.0.finish_reason",
        error_path="failure",
    )
    parser = SSEBackendAdapter(spec).stream_parser()
    events = parser.feed(
        b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
        b'data: {"choices":[{"delta":{},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":4,"completion_tokens":1}}\n\n'
        b'data: {"error": "ignored: not the configured error path"}\n\n'
        b"data: [DONE]\n\n"
    )
    assert [type(e).__name__ for e in events] == ["Delta", "Finish", "Usage"]
    assert parser.done
    assert type(parser.feed(b'data: {"failure": {"message": "x"}}\n\n')[0]).__name__ == "Failure"


@pytest.mark.parametrize(
    ("doc", "path", "value"),
    [
        ({"a": {"b": 1}}, ("a", "b"), 1),
        ({"a": [{"b": 2}]}, ("a", "0", "b"), 2),
        ({"a": [1]}, ("a", "1"), None),
        ({"a": [1]}, ("a", "x"), None),
        ({"a": "s"}, ("a", "b"), None),
        ([5], ("0",), 5),
    ],
)
def test_lookup(doc: Any, path: tuple[str, ...], value: Any) -> None:
    assert lookup(doc, path) == value


@pytest.mark.parametrize(
    ("event", "kinds"),
    [
        ({"meta": {"error": ""}, "out": {"text": "x"}}, ["Failure"]),  # present, however falsy
        ({"meta": {"error": None}, "out": {"text": "x"}}, ["Delta"]),
        ({"meta": [], "out": {"text": 5}, "calls": None}, []),
        ({"calls": {"list": [{"index": 0, "function": {"arguments": "{}"}}]}}, ["ToolCallDelta"]),
        ({"n": {"in": 3}, "m": {"out": 1}}, ["Usage"]),  # input and output under other keys
        ({"m": {"out": 1}}, []),
    ],
)
def test_sse_backend_nested_paths_read_as_lookup_reads_them(
    event: dict[str, Any], kinds: list[str]
) -> None:
    spec = SSEBackendSpec(
        content_path="out.text",
        error_path="meta.error",
        tool_calls_path="calls.list",
        usage_input_path="n.in",
        usage_output_path="m.out",
    )
    events = SSEBackendAdapter(spec).stream_parser().feed(b"data: " + orjson.dumps(event) + b"\n\n")
    assert [type(e).__name__ for e in events] == kinds
