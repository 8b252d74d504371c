"""The mock's Gemini API read by Google's official client, `google-genai`, on a real socket.

Whatever the SDK sends, the mock must take as Google does, and whatever the mock
answers, the SDK must read as it reads Google: text, growing ``usageMetadata``
(thoughts and cache counts included), finish reasons, the system instruction,
function calls, images and its error classes. Where the two disagreed the mock was
wrong: Google parses proto3 JSON field names in either spelling and the SDK sends
both (``inlineData`` around ``mime_type``); the SDK's default path is ``/v1``; its
schema types are upper case (``INTEGER``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from google import genai
from google.genai import errors, types

from mock_llm.app import create_app
from mock_llm.script import Message, answer_tokens, count_prompt_tokens
from mock_llm.tools import mock_signature
from tests.harness import served_on_a_socket

KEY = "mock-key-gemini"
PROMPT = "Tell me about gateways"
NO_RETRY = types.HttpRetryOptions(attempts=1)
WEATHER = types.Tool(
    function_declarations=[
        types.FunctionDeclaration(
            name="get_weather",
            description="Weather now",
            parameters=types.Schema(
                type=types.Type.OBJECT,
                properties={
                    "city": types.Schema(type=types.Type.STRING),
                    "days": types.Schema(type=types.Type.INTEGER),
                },
                required=["city"],
            ),
        ),
        # The newer way to declare: a plain JSON Schema, lower-case types.
        types.FunctionDeclaration(
            name="get_time",
            parameters_json_schema={
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        ),
    ]
)
# Declarations only: the SDK must hand the calls back, not try to run them.
TOOLS = types.GenerateContentConfig(
    tools=[WEATHER],
    automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with served_on_a_socket(create_app(api_key=KEY)) as base_url:
        yield base_url


@pytest.fixture
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=10) as client:
        client.post("/_mock/reset")
        yield client


def client_for(url: str, key: str = KEY, **options: Any) -> genai.Client:
    # `api_version` unset is the SDK's own default path (``/v1``); the edge uses v1beta.
    http_options = types.HttpOptions(base_url=url, retry_options=NO_RETRY, **options)
    return genai.Client(api_key=key, http_options=http_options)


@pytest.fixture
def gemini(url: str, http: httpx.Client) -> Iterator[genai.Client]:
    with client_for(url, api_version="v1beta") as client:
        yield client


def test_generate_content_text_usage_and_system_instruction(gemini: genai.Client) -> None:
    prompt = f"{PROMPT} [[mock reasoning=7 cached=3]]"
    config = types.GenerateContentConfig(system_instruction="be brief", max_output_tokens=100)
    response = gemini.models.generate_content(model="mock-fast", contents=prompt, config=config)
    assert response.text == "".join(answer_tokens(prompt, 64))
    candidate = (response.candidates or [])[0]
    assert candidate.finish_reason == types.FinishReason.STOP
    assert response.model_version == "mock-fast" and response.response_id
    usage = response.usage_metadata
    assert usage is not None
    prompt_tokens = count_prompt_tokens([Message("system", "be brief"), Message("user", prompt)])
    assert (usage.prompt_token_count, usage.candidates_token_count) == (prompt_tokens, 64)
    assert (usage.thoughts_token_count, usage.cached_content_token_count) == (7, 3)
    assert usage.total_token_count == prompt_tokens + 64 + 7


def test_stream_grows_usage_and_finishes_max_tokens(gemini: genai.Client) -> None:
    config = types.GenerateContentConfig(max_output_tokens=5)
    chunks = list(
        gemini.models.generate_content_stream(model="mock-fast", contents=PROMPT, config=config)
    )
    assert "".join(c.text or "" for c in chunks) == "".join(answer_tokens(PROMPT, 5))
    counts = [c.usage_metadata.candidates_token_count for c in chunks if c.usage_metadata]
    assert counts == [1, 2, 3, 4, 5, 5]
    finishes = [c.candidates[0].finish_reason for c in chunks if c.candidates]
    assert finishes == [None] * 5 + [types.FinishReason.MAX_TOKENS]


def test_usage_directive_leaves_usage_metadata_out(gemini: genai.Client) -> None:
    response = gemini.models.generate_content(model="mock-fast", contents="hi [[mock usage=0]]")
    assert response.text and response.usage_metadata is None


def test_the_sdk_default_api_version_is_served(url: str, http: httpx.Client) -> None:
    # google-genai calls /v1/models/…: Google serves it beside v1beta, so must the mock.
    with client_for(url) as client:
        whole = client.models.generate_content(model="mock-fast", contents=PROMPT)
        streamed = list(client.models.generate_content_stream(model="mock-fast", contents=PROMPT))
        with pytest.raises(errors.ClientError) as unknown:
            client.models.generate_content(model="no-such-model", contents=PROMPT)
    answer = "".join(answer_tokens(PROMPT, 64))
    assert whole.text == "".join(c.text or "" for c in streamed) == answer
    assert (unknown.value.code, unknown.value.status) == (404, "NOT_FOUND")
    paths = [r["path"] for r in http.get("/_mock/requests").json()["requests"]]
    assert paths[0] == "/v1/models/mock-fast:generateContent"
    # OpenAI's model paths beside them (no colon) still answer in OpenAI's shape.
    openai_path = http.get("/v1/models/gpt-4o")
    assert openai_path.status_code == 404 and openai_path.json()["error"]["type"]


def check_calls(calls: list[types.FunctionCall] | None, count: int) -> None:
    assert calls is not None and len(calls) == count
    # The calls go to the declared functions in turn (`mock_llm.tools`).
    assert [call.name for call in calls] == ["get_weather", "get_time"][:count]
    for call in calls:
        assert call.args is not None
        # The declared INTEGER parameter gets a number, as a real model's call would.
        assert isinstance(call.args["city"], str) and isinstance(call.args["days"], int)


def test_function_calls_whole_and_streamed_then_the_answer(gemini: genai.Client) -> None:
    ask = "Weather in two cities? [[mock tool_calls=2]]"
    whole = gemini.models.generate_content(model="mock-fast", contents=ask, config=TOOLS)
    check_calls(whole.function_calls, 2)
    assert (whole.candidates or [])[0].finish_reason == types.FinishReason.STOP  # as Gemini
    chunks = list(
        gemini.models.generate_content_stream(model="mock-fast", contents=ask, config=TOOLS)
    )
    check_calls([call for c in chunks for call in c.function_calls or []], 2)
    assert [len(c.function_calls or []) for c in chunks] == [1, 1, 0]  # each call whole
    # The calls answered: the model speaks.
    calls = whole.function_calls or []
    contents = [
        types.Content(role="user", parts=[types.Part(text=ask)]),
        types.Content(role="model", parts=[types.Part(function_call=c) for c in calls]),
        types.Content(
            role="user",
            parts=[
                types.Part.from_function_response(name=c.name or "", response={"temp": 21})
                for c in calls
            ],
        ),
    ]
    answer = gemini.models.generate_content(model="mock-fast", contents=contents, config=TOOLS)
    assert answer.text and answer.function_calls is None


PNG = b"\x89PNG\r\n\x1a\n" + bytes(16)


def test_images_and_documents_as_the_sdk_sends_them(gemini: genai.Client) -> None:
    parts = [
        types.Part.from_bytes(data=PNG, mime_type="image/png"),
        types.Part.from_uri(file_uri="https://example.com/doc.pdf", mime_type="application/pdf"),
        "What is in these?",
    ]
    response = gemini.models.generate_content(model="mock-fast", contents=parts)
    usage = response.usage_metadata
    # Each part counts as the mock's placeholder text (`mock_llm.media`).
    text = "[media][media]What is in these?"
    assert usage is not None and usage.prompt_token_count == count_prompt_tokens(
        [Message("user", text)]
    )
    with pytest.raises(errors.ClientError) as refused:
        gemini.models.generate_content(
            model="mock-fast",
            contents=[types.Part.from_bytes(data=PNG, mime_type="image/x-unknown"), "hi"],
        )
    assert (refused.value.code, refused.value.status) == (400, "INVALID_ARGUMENT")


@pytest.mark.parametrize(
    ("prompt", "kind", "code", "status"),
    [
        ("[[mock fail=400]]", errors.ClientError, 400, "INVALID_ARGUMENT"),
        ("[[mock fail=401]]", errors.ClientError, 401, "UNAUTHENTICATED"),
        ("[[mock fail=429 retry_after=4]]", errors.ClientError, 429, "RESOURCE_EXHAUSTED"),
        ("[[mock fail=500]]", errors.ServerError, 500, "INTERNAL"),
        ("[[mock fail=503]]", errors.ServerError, 503, "UNAVAILABLE"),
    ],
)
def test_errors_are_the_sdk_classes(
    gemini: genai.Client, prompt: str, kind: type[errors.APIError], code: int, status: str
) -> None:
    with pytest.raises(errors.APIError) as raised:
        gemini.models.generate_content(model="mock-fast", contents=prompt)
    assert type(raised.value) is kind
    assert (raised.value.code, raised.value.status) == (code, status)
    assert raised.value.message == f"mock: failing with {code} as asked"
    if code == 429:
        # Google says when to come back in the body's RetryInfo, never in a header.
        assert "retry-after" not in raised.value.response.headers
        assert raised.value.details["error"]["details"] == [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "4s"}
        ]


def test_a_wrong_key_is_api_key_invalid(url: str) -> None:
    with client_for(url, key="wrong", api_version="v1beta") as client:
        with pytest.raises(errors.ClientError) as raised:
            client.models.generate_content(model="mock-fast", contents="hi")
    assert (raised.value.code, raised.value.status) == (400, "INVALID_ARGUMENT")
    assert raised.value.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"


def test_a_mid_stream_error_raises_after_the_text(gemini: genai.Client) -> None:
    prompt = "[[mock tokens=5 error_after=2]]"
    texts: list[str] = []
    with pytest.raises(errors.ServerError) as raised:
        for chunk in gemini.models.generate_content_stream(model="mock-fast", contents=prompt):
            texts.append(chunk.text or "")
    assert "".join(texts) == "".join(answer_tokens(prompt, 2))
    assert (raised.value.code, raised.value.status) == (503, "UNAVAILABLE")


def test_the_sdk_retries_a_503_the_mock_then_answers(url: str, http: httpx.Client) -> None:
    retry = types.HttpRetryOptions(attempts=2, initial_delay=0, max_delay=0, jitter=0)
    with client_for(url, api_version="v1beta") as client:
        options = types.HttpOptions(base_url=url, api_version="v1beta", retry_options=retry)
        config = types.GenerateContentConfig(http_options=options)
        prompt = "[[mock fail=503 fail_times=1 tokens=3]]"
        response = client.models.generate_content(model="mock-fast", contents=prompt, config=config)
    assert response.text == "".join(answer_tokens(prompt, 3))
    stats = http.get("/_mock/stats").json()
    assert (stats["failed"], stats["completed"]) == (1, 1)


async def test_the_async_client_streams(url: str, http: httpx.Client) -> None:
    client = client_for(url, api_version="v1beta")
    try:
        stream = await client.aio.models.generate_content_stream(model="mock-fast", contents=PROMPT)
        texts = [chunk.text or "" async for chunk in stream]
    finally:
        await client.aio.aclose()
        client.close()
    assert "".join(texts) == "".join(answer_tokens(PROMPT, 64))


def test_snake_case_field_names_are_read_as_google_reads_them(http: httpx.Client) -> None:
    # proto3 JSON: a parser takes the lowerCamelCase name or the proto field's own name
    # (https://protobuf.dev/programming-guides/json/); Google's does, at every level.
    camel = {
        "contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
        "systemInstruction": {"parts": [{"text": "be brief"}]},
        "generationConfig": {"maxOutputTokens": 3},
    }
    snake = {
        "contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
        "system_instruction": {"parts": [{"text": "be brief"}]},
        "generation_config": {"max_output_tokens": 3},
    }
    path = "/v1beta/models/mock-fast:generateContent"
    headers = {"x-goog-api-key": KEY}
    answers = [http.post(path, json=body, headers=headers).json() for body in (camel, snake)]
    for answer in answers:
        answer.pop("responseId")
    assert answers[0] == answers[1]
    assert answers[0]["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert answers[0]["usageMetadata"]["promptTokenCount"] == count_prompt_tokens(
        [Message("system", "be brief"), Message("user", PROMPT)]
    )
    calls = {
        "contents": [{"parts": [{"text": "go [[mock tool_calls=1]]"}]}],
        "tools": [{"function_declarations": [{"name": "f", "parameters": {"type": "object"}}]}],
    }
    answer = http.post(path, json=calls, headers=headers).json()
    # Signed as Gemini 3 signs the first call of a step (`tools.mock_signature`).
    call = {"functionCall": {"name": "f", "args": {}}, "thoughtSignature": mock_signature("f", {})}
    assert answer["candidates"][0]["content"]["parts"] == [call]
    reply = {
        "contents": [
            {"role": "user", "parts": [{"text": "go [[mock tool_calls=1]]"}]},
            {"role": "model", "parts": [{"function_call": {"name": "f", "args": {}}}]},
            {"role": "user", "parts": [{"function_response": {"name": "f", "response": {}}}]},
        ],
        "tools": calls["tools"],
    }
    answer = http.post(path, json=reply, headers=headers).json()
    assert "text" in answer["candidates"][0]["content"]["parts"][0]  # the loop ends
