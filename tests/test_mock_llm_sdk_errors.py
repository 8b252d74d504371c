"""Each vendor's errors and usage details as its official client reads them from the mock.

What the other mock tests leave out: every status a vendor answers (401, 403, 404 for
an unknown model, 413, 429, 500, 503, 529) parsed by `openai`, `anthropic` and
`google-genai` into their own exception classes, with the vendor's own ``type`` /
``status`` and message; and cache and reasoning counts through each SDK's usage type.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from google import genai
from google.genai import errors, types

from mock_llm.app import create_app
from mock_llm.script import Message, count_prompt_tokens
from tests.harness import served_on_a_socket

KEY = "mock-key-sdk-errors"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with served_on_a_socket(create_app(api_key=KEY)) as base_url:
        yield base_url


@pytest.fixture
def gpt(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as client:
        yield client


@pytest.fixture
def claude(url: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0) as client:
        yield client


@pytest.fixture
def gemini(url: str) -> Iterator[genai.Client]:
    options = types.HttpOptions(
        base_url=url, api_version="v1beta", retry_options=types.HttpRetryOptions(attempts=1)
    )
    with genai.Client(api_key=KEY, http_options=options) as client:
        yield client


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


# --- OpenAI ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "type_"),
    [
        (400, openai.BadRequestError, "invalid_request_error"),
        (403, openai.PermissionDeniedError, "permission_error"),
        (429, openai.RateLimitError, "requests"),  # OpenAI's load 429: "requests" or "tokens"
        (500, openai.InternalServerError, "server_error"),
        (503, openai.InternalServerError, "server_error"),
    ],
)
def test_openai_statuses_are_the_sdk_classes(
    gpt: openai.OpenAI, status: int, kind: type[openai.APIStatusError], type_: str
) -> None:
    with pytest.raises(openai.APIStatusError) as raised:
        gpt.chat.completions.create(model="mock-fast", messages=user(f"[[mock fail={status}]]"))
    error = raised.value
    assert type(error) is kind and error.status_code == status
    assert (error.type, error.code) == (type_, "mock_failure")
    assert error.message == f"Error code: {status} - mock: failing with {status} as asked"


def test_openai_refused_key_and_unknown_model_in_openais_words(
    url: str, gpt: openai.OpenAI
) -> None:
    with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as refused:
            bad.chat.completions.create(model="mock-fast", messages=user("hi"))
    # OpenAI's 401 is an invalid_request_error with code invalid_api_key.
    assert (refused.value.type, refused.value.code) == ("invalid_request_error", "invalid_api_key")
    with pytest.raises(openai.NotFoundError) as unknown:
        gpt.chat.completions.create(model="gpt-nope", messages=user("hi"))
    assert (unknown.value.type, unknown.value.code) == ("invalid_request_error", "model_not_found")
    assert unknown.value.message == (
        "Error code: 404 - The model `gpt-nope` does not exist or you do not have access to it."
    )


def test_openai_usage_details_whole_and_streamed(gpt: openai.OpenAI) -> None:
    text = "hi [[mock tokens=3 cached=2 reasoning=4]]"
    prompt = count_prompt_tokens([Message("user", text)])
    whole = gpt.chat.completions.create(model="mock-fast", messages=user(text))
    chunks = list(
        gpt.chat.completions.create(
            model="mock-fast",
            messages=user(text),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    for usage in (whole.usage, chunks[-1].usage):
        assert usage is not None
        # Cached tokens are part of prompt_tokens, reasoning part of completion_tokens.
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, 3 + 4)
        assert usage.total_tokens == prompt + 7
        assert usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens == 2
        assert usage.completion_tokens_details is not None
        assert usage.completion_tokens_details.reasoning_tokens == 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


# --- Anthropic -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "type_"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (403, anthropic.PermissionDeniedError, "permission_error"),
        (413, anthropic.APIStatusError, "request_too_large"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
def test_anthropic_statuses_are_the_sdk_classes(
    claude: anthropic.Anthropic, status: int, kind: type[anthropic.APIStatusError], type_: str
) -> None:
    with pytest.raises(anthropic.APIStatusError) as raised:
        claude.messages.create(
            model="mock-fast", max_tokens=5, messages=user(f"[[mock fail={status}]]")
        )
    error = raised.value
    assert isinstance(error, kind) and error.status_code == status
    assert error.body == {
        "type": "error",
        "error": {"type": type_, "message": f"mock: failing with {status} as asked"},
    }


def test_anthropic_unknown_model_in_anthropics_words(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as unknown:
        claude.messages.create(model="claude-nope", max_tokens=5, messages=user("hi"))
    assert unknown.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "model: claude-nope"},
    }


@pytest.mark.parametrize("path", ["/v1/nothing", "/v1/complete", "/v1/models/claude-x"])
def test_anthropic_unknown_path_in_anthropics_words(claude: anthropic.Anthropic, path: str) -> None:
    """An Anthropic client's unknown path answers as Anthropic does, not in OpenAI's
    shape (measured before: `/v1/…` paths outside `/v1/messages` were OpenAI's)."""
    with pytest.raises(anthropic.NotFoundError) as unknown:
        claude.get(path, cast_to=object)
    assert unknown.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "Not Found"},
    }


def test_anthropic_bad_request_in_anthropics_words(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.post("/v1/messages", body={"model": "mock-fast"}, cast_to=object)
    assert bad.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }


def test_anthropic_cache_counts_whole_and_streamed(claude: anthropic.Anthropic) -> None:
    text = "hi [[mock tokens=3 cached=2 cache_write=5 reasoning=4]]"
    prompt = count_prompt_tokens([Message("user", text)])
    whole = claude.messages.create(model="mock-fast", max_tokens=50, messages=user(text))
    with claude.messages.stream(model="mock-fast", max_tokens=50, messages=user(text)) as stream:
        streamed = stream.get_final_message()
    for message in (whole, streamed):
        usage = message.usage
        # input_tokens leaves out cache reads and writes; thinking is in output_tokens.
        assert (usage.input_tokens, usage.cache_read_input_tokens) == (prompt - 2 - 5, 2)
        assert (usage.cache_creation_input_tokens, usage.output_tokens) == (5, 3 + 4)
        assert message.stop_reason == "end_turn"


# --- Gemini ----------------------------------------------------------------------------


def test_gemini_unknown_model_in_googles_words(gemini: genai.Client) -> None:
    with pytest.raises(errors.ClientError) as unknown:
        gemini.models.generate_content(model="gemini-nope", contents="hi")
    assert (unknown.value.code, unknown.value.status) == (404, "NOT_FOUND")
    assert unknown.value.message == (
        "models/gemini-nope is not found for API version v1beta, or is not supported for "
        "generateContent. Call ListModels to see the list of available models and their "
        "supported methods."
    )


def test_gemini_load_429_tells_when_in_retry_info(gemini: genai.Client) -> None:
    with pytest.raises(errors.ClientError) as raised:
        gemini.models.generate_content(
            model="mock-fast", contents="[[mock fail=429 retry_after=9]]"
        )
    assert (raised.value.code, raised.value.status) == (429, "RESOURCE_EXHAUSTED")
    assert "retry-after" not in raised.value.response.headers
    [retry] = raised.value.details["error"]["details"]
    assert retry == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "9s"}
