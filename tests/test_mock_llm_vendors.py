"""The mock's Anthropic, Gemini and in-house formats on a real socket.

Fidelity is checked with the official `anthropic` client (streaming and not, usage,
errors) and, for Gemini and the in-house service, by parsing the raw bytes with the
edge's own adapters (Google's `google-genai` client reads Gemini's in
`test_mock_llm_gemini_sdk.py`). The OpenAI format is covered in `test_mock_llm.py`; the new
directives (`retry_after`, `error_after`, `usage`) are checked here for all four.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from mock_llm.app import create_app
from mock_llm.script import Message, answer_tokens, count_prompt_tokens
from shared.catalog import Provider, SSEBackendSpec
from stream_edge.upstream import adapter_for
from stream_edge.upstream.base import Delta, Failure, Finish, Usage
from tests.harness import served_on_a_socket

KEY = "mock-key-123"
SERVICE_TOKEN = "svc-token-456"
PROMPT = "Tell me about gateways"
ANSWER = "".join(answer_tokens(PROMPT, 64))
PROMPT_TOKENS = count_prompt_tokens([Message("user", PROMPT)])


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with served_on_a_socket(create_app(api_key=KEY, service_token=SERVICE_TOKEN)) as base_url:
        yield base_url


@pytest.fixture
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=10) as client:
        client.post("/_mock/reset")
        yield client


@pytest.fixture
def claude(url: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0) as client:
        yield client


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


# --- Anthropic, through the official client ------------------------------------------


def test_anthropic_non_streaming(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model="mock-fast", max_tokens=1000, system="be brief", messages=user(PROMPT)
    )
    assert message.type == "message" and message.role == "assistant"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == ANSWER  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    prompt = count_prompt_tokens([Message("system", "be brief"), Message("user", PROMPT)])
    assert (message.usage.input_tokens, message.usage.output_tokens) == (prompt, 64)


def test_anthropic_streaming_helper(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model="mock-fast", max_tokens=5, messages=user(PROMPT)) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "".join(answer_tokens(PROMPT, 5))
    assert final.stop_reason == "max_tokens"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (PROMPT_TOKENS, 5)


def test_anthropic_raw_events(claude: anthropic.Anthropic, http: httpx.Client) -> None:
    events = list(
        claude.messages.create(
            model="mock-fast", max_tokens=100, messages=user(f"{PROMPT} [[mock tokens=3]]"),
            stream=True,
        )
    )  # fmt: skip
    kinds = [event.type for event in events]
    assert kinds == [  # the client drops `ping` events
        "message_start", "content_block_start", "content_block_delta",
        "content_block_delta", "content_block_delta", "content_block_stop", "message_delta",
        "message_stop",
    ]  # fmt: skip
    start, delta = events[0], events[-2]
    assert start.type == "message_start" and start.message.usage.output_tokens == 1  # placeholder
    assert delta.type == "message_delta" and delta.usage.output_tokens == 3  # cumulative
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    body = {"model": "mock-fast", "max_tokens": 9, "messages": user("hi"), "stream": True}
    raw = http.post("/v1/messages", json=body, headers=headers).content
    assert raw.startswith(b"event: message_start\ndata: {")
    assert b'event: ping\ndata: {"type":"ping"}\n\n' in raw


def test_anthropic_errors(url: str, claude: anthropic.Anthropic, http: httpx.Client) -> None:
    with anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError) as auth:
            bad.messages.create(model="mock-fast", max_tokens=5, messages=user("hi"))
    assert auth.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid x-api-key"},
    }
    with pytest.raises(anthropic.RateLimitError) as limited:
        claude.messages.create(
            model="mock-fast", max_tokens=5, messages=user("[[mock fail=429 retry_after=7]]")
        )
    assert limited.value.response.headers["retry-after"] == "7"
    with pytest.raises(anthropic.InternalServerError):
        claude.messages.create(model="mock-fast", max_tokens=5, messages=user("[[mock fail=500]]"))
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-nope", max_tokens=5, messages=user("hi"))
    with pytest.raises(anthropic.APIStatusError) as mid_stream:
        list(
            claude.messages.create(
                model="mock-fast", max_tokens=50, messages=user("[[mock error_after=2]]"),
                stream=True,
            )
        )  # fmt: skip
    assert mid_stream.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    # The raw API: x-api-key, the required anthropic-version, the required max_tokens.
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    body = {"model": "mock-fast", "max_tokens": 3, "messages": user("hi")}
    assert http.post("/v1/messages", json=body, headers=headers).status_code == 200
    response = http.post("/v1/messages", json=body, headers={"x-api-key": KEY})
    assert response.status_code == 400 and response.json()["type"] == "error"
    response = http.post("/v1/messages", json={**body, "max_tokens": None}, headers=headers)
    assert response.json()["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens: Field required",
    }
    stats = http.get("/_mock/stats").json()
    assert stats["active"] == 0 and stats["failed"] == 3


# --- Gemini and the in-house service, read with the edge's adapters --------------------


def gemini_post(http: httpx.Client, method: str, text: str, **headers: str) -> httpx.Response:
    query = "?alt=sse" if method == "streamGenerateContent" else ""
    body = {
        "contents": [{"role": "user", "parts": [{"text": text}]}],
        "generationConfig": {"maxOutputTokens": 1000},
    }
    headers = {"x-goog-api-key": KEY, **headers}
    return http.post(f"/v1beta/models/mock-fast:{method}{query}", json=body, headers=headers)


@dataclass(frozen=True)
class Read:
    """A raw vendor stream as the edge's adapter reads it."""

    text: str
    finishes: list[str]
    usages: list[tuple[int, int]]
    failures: int
    done: bool


def parse(api_type: str, raw: bytes) -> Read:
    sse = SSEBackendSpec() if api_type == "sse_backend" else None
    adapter = adapter_for(Provider("p", api_type, "http://x", sse=sse))
    assert adapter is not None
    parser = adapter.stream_parser()
    events = [e for i in range(0, len(raw), 3) for e in parser.feed(raw[i : i + 3])]
    return Read(
        text="".join(e.text for e in events if isinstance(e, Delta)),
        finishes=[e.reason for e in events if isinstance(e, Finish)],
        usages=[(e.input_tokens, e.output_tokens) for e in events if isinstance(e, Usage)],
        failures=sum(isinstance(e, Failure) for e in events),
        done=parser.done,
    )


def test_gemini_stream_is_crlf_framed_with_growing_usage(http: httpx.Client) -> None:
    response = gemini_post(http, "streamGenerateContent", PROMPT)
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = response.content.split(b"\r\n\r\n")
    assert frames[-1] == b"" and len(frames) == 64 + 2  # one per token, the last, the tail
    docs = [orjson.loads(f.removeprefix(b"data: ")) for f in frames[:-1]]
    assert [d["usageMetadata"]["candidatesTokenCount"] for d in docs[:3]] == [1, 2, 3]
    assert docs[-1]["candidates"][0]["finishReason"] == "STOP"
    assert parse("gemini", response.content) == Read(
        ANSWER, ["stop"], [(PROMPT_TOKENS, 64)], failures=0, done=True
    )


def test_gemini_non_streaming_and_errors(http: httpx.Client) -> None:
    prompt = f"{PROMPT} [[mock tokens=4]]"
    answer = gemini_post(http, "generateContent", prompt).json()
    candidate = answer["candidates"][0]
    assert candidate["content"]["parts"][0]["text"] == "".join(answer_tokens(prompt, 4))
    assert candidate["finishReason"] == "STOP"
    assert answer["usageMetadata"]["candidatesTokenCount"] == 4
    by_query = http.post(
        f"/v1beta/models/mock-fast:generateContent?key={KEY}",
        json={"contents": [{"parts": [{"text": "hi"}]}]},
    )
    assert by_query.status_code == 200
    wrong = gemini_post(http, "generateContent", "hi", **{"x-goog-api-key": "nope"})
    assert wrong.status_code == 400
    error = wrong.json()["error"]
    assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")
    assert error["details"][0]["reason"] == "API_KEY_INVALID"
    missing = http.post(
        "/v1beta/models/mock-fast:generateContent", json={"contents": [{"parts": [{"text": "x"}]}]}
    )
    assert missing.status_code == 403 and missing.json()["error"]["status"] == "PERMISSION_DENIED"
    limited = gemini_post(http, "generateContent", "[[mock fail=429 retry_after=3]]")
    assert limited.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    # Google's wait is in the body (google.rpc.RetryInfo), never a Retry-After header.
    assert "retry-after" not in limited.headers
    retry = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "3s"}
    assert limited.json()["error"]["details"] == [retry]
    assert gemini_post(http, "generateContent", "[[mock fail=503]]").status_code == 503
    broken = gemini_post(http, "streamGenerateContent", "[[mock tokens=5 error_after=2]]")
    read = parse("gemini", broken.content)
    assert read.text == "".join(answer_tokens("[[mock tokens=5 error_after=2]]", 2))
    assert (read.failures, read.finishes, read.usages) == (1, [], [])
    assert http.post("/v1beta/models/mock-fast:countTokens").json()["error"]["code"] == 404


def inhouse_post(http: httpx.Client, text: str, **headers: str) -> httpx.Response:
    headers = {"x-service-token": SERVICE_TOKEN, **headers}
    return http.post("/sse/chat", json={"messages": user(text), "max_tokens": 50}, headers=headers)


def test_inhouse_stream_and_service_token(http: httpx.Client) -> None:
    response = inhouse_post(http, PROMPT, **{"X-User-Id": "u-1", "X-Company-Id": "c-1"})
    assert response.content.endswith(b'"finish":"length"}\n\ndata: [DONE]\n\n')
    assert parse("sse_backend", response.content) == Read(
        "".join(answer_tokens(PROMPT, 50)), ["length"], [(PROMPT_TOKENS, 50)], 0, done=True
    )
    logged = http.get("/_mock/requests").json()["requests"][-1]
    assert logged["path"] == "/sse/chat" and logged["body"]["max_tokens"] == 50
    assert logged["headers"]["x-user-id"] == "u-1" and logged["headers"]["x-company-id"] == "c-1"
    refused = inhouse_post(http, "hi", **{"x-service-token": "guess"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_token"


@pytest.mark.parametrize("api_type", ["openai_chat", "anthropic_messages", "gemini", "sse_backend"])
def test_usage_directive_turns_usage_off(http: httpx.Client, api_type: str) -> None:
    text = "no counts here [[mock tokens=4 usage=0]]"
    if api_type == "gemini":
        raw = gemini_post(http, "streamGenerateContent", text).content
    elif api_type == "sse_backend":
        raw = inhouse_post(http, text).content
    else:
        path, body, headers = (
            ("/v1/chat/completions", {"stream_options": {"include_usage": True}},
             {"authorization": f"Bearer {KEY}"})
            if api_type == "openai_chat"
            else ("/v1/messages", {"max_tokens": 50},
                  {"x-api-key": KEY, "anthropic-version": "2023-06-01"})
        )  # fmt: skip
        body |= {"model": "mock-fast", "messages": user(text), "stream": True}
        raw = http.post(path, json=body, headers=headers).content
    read = parse(api_type, raw)
    assert read.text == "".join(answer_tokens(text, 4))
    assert (read.finishes, read.usages, read.failures, read.done) == (["stop"], [], 0, True)


def test_openai_mid_stream_error_and_retry_after(http: httpx.Client) -> None:
    auth = {"authorization": f"Bearer {KEY}"}
    body = {"model": "mock-fast", "messages": user("[[mock error_after=1]]"), "stream": True}
    raw = http.post("/v1/chat/completions", json=body, headers=auth).content
    read = parse("openai_chat", raw)
    assert read.text and read.failures == 1 and not read.done and b"[DONE]" not in raw
    body = {"model": "mock-fast", "messages": user("[[mock fail=429 retry_after=9]]")}
    limited = http.post("/v1/chat/completions", json=body, headers=auth)
    assert limited.status_code == 429 and limited.headers["retry-after"] == "9"
    assert limited.json()["error"]["type"] == "requests"  # OpenAI names the limit hit


def test_a_request_over_the_tpm_limit_is_refused_in_each_vendors_words(
    url: str, claude: anthropic.Anthropic, http: httpx.Client
) -> None:
    """`[[mock tpm=N]]`: a request asking more than the per-minute limit on its own is
    refused with each vendor's 429, read by the official clients as a rate limit."""
    text = "big [[mock tpm=50]]"
    requested = count_prompt_tokens([Message("user", text)]) + 100
    with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as gpt:
        with pytest.raises(openai.RateLimitError) as too_large:
            gpt.chat.completions.create(model="mock-fast", messages=user(text), max_tokens=100)
    error = too_large.value.body
    assert isinstance(error, dict) and error["code"] == "rate_limit_exceeded"
    assert error["type"] == "tokens" and error["message"].startswith(
        f"Request too large for mock-fast in organization org-mock on tokens per min (TPM): "
        f"Limit 50, Requested {requested}."
    )
    headers = too_large.value.response.headers
    assert headers["x-ratelimit-limit-tokens"] == headers["x-ratelimit-remaining-tokens"] == "50"
    with pytest.raises(anthropic.RateLimitError) as claude_limited:
        claude.messages.create(model="mock-fast", max_tokens=100, messages=user(text))
    assert claude_limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert claude_limited.value.response.headers["retry-after"] == "7"
    google = gemini_post(http, "generateContent", text)
    assert google.status_code == 429 and "retry-after" not in google.headers
    doc = google.json()["error"]
    assert (doc["code"], doc["status"]) == (429, "RESOURCE_EXHAUSTED")
    [quota, _help, retry] = doc["details"]
    assert quota["violations"][0]["quotaValue"] == "50"
    assert retry == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}
    # Within the limit, the same prompt is answered.
    small = {"model": "mock-fast", "messages": user("hi [[mock tpm=5000]]"), "max_tokens": 3}
    auth = {"authorization": f"Bearer {KEY}"}
    assert http.post("/v1/chat/completions", json=small, headers=auth).status_code == 200
