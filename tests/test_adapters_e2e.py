"""Every wire format end to end: client → edge → adapter → mock vendor → webhook.

The client always sees OpenAI chunks (official `openai` client) or our EventSource
events, whatever the backend speaks; usage is the vendor's when it reports it and the
edge's count when not; vendor failures map to our errors without leaking the
vendor's words or our keys; the in-house backend gets the service token and the
caller's context, and no backend ever sees the client's stream token.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import orjson
import pytest

from mock_llm.script import Message, answer_tokens, count_prompt_tokens
from shared.sse import ServerSentEvent, SSEDecoder
from shared.text_tokens import pieces
from tests.adapter_stack import MODELS, SERVICE_TOKEN, VENDOR_KEY, WRONG_KEY, AdapterStack
from tests.stack import base_env, micro
from tests.token_claims import claims_of

WORKING = ["claude-test", "gemini-test", "gpt-test", "inhouse-test"]
STREAM_TOKENS: list[str] = []  # every stream token issued here; no backend may see one


@pytest.fixture(scope="module")
def vendors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdapterStack]:
    workdir = tmp_path_factory.mktemp("adapters")
    with AdapterStack(base_env(f"sqlite:///{workdir / 'gateway.db'}"), workdir) as stack:
        yield stack
        # The last word on what reached the backends, after every test of the module.
        seen = orjson.dumps(stack.upstream_requests()).decode()
        assert STREAM_TOKENS and not [t for t in STREAM_TOKENS if t in seen]


@pytest.fixture(scope="module")
def user_token(vendors: AdapterStack) -> str:
    c = vendors.client
    return c.new_user(c.new_company("100"))


def start(vendors: AdapterStack, token: str, model: str, text: str, **extra: Any) -> dict[str, Any]:
    grant = vendors.client.init_ok(
        token, {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    )
    STREAM_TOKENS.append(grant["stream_token"])
    claims: dict[str, Any] = claims_of(grant["stream_token"])
    return {**grant, "claims": claims}


def edge_client(vendors: AdapterStack, grant: dict[str, Any]) -> openai.OpenAI:
    return vendors.client.openai(grant["stream_token"], max_retries=0)


def upstream_request(vendors: AdapterStack, grant: dict[str, Any]) -> dict[str, Any]:
    request_id = grant["claims"]["request_id"]
    found = [r for r in vendors.upstream_requests() if r["headers"]["x-request-id"] == request_id]
    assert len(found) == 1, found
    return found[0]


def events(vendors: AdapterStack, grant: dict[str, Any]) -> list[ServerSentEvent]:
    decoder, out = SSEDecoder(), []
    with vendors.client.http.stream("GET", grant["stream_url"]) as response:
        assert response.status_code == 200, response.read()
        for raw in response.iter_raw():
            out.extend(decoder.feed(raw))
    return out


def user_prompt_tokens(text: str) -> int:
    return count_prompt_tokens([Message("user", text)])


def assert_asked_for_the_upstream_model(request: dict[str, Any], model: str, stream: bool) -> None:
    if MODELS[model][1] == "gemini":
        method = "streamGenerateContent" if stream else "generateContent"
        assert request["path"] == f"/v1beta/models/mock-fast:{method}"
        assert request["query"] == ({"alt": "sse"} if stream else {})
    else:
        assert request["body"]["model"] == "mock-fast"


@pytest.mark.parametrize("model", WORKING)
def test_stream_through_the_openai_client(
    vendors: AdapterStack, user_token: str, model: str
) -> None:
    text = f"Tell me about {model} [[mock tokens=12]]"
    grant = start(vendors, user_token, model, text)
    with edge_client(vendors, grant) as client:
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": text}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert content == "".join(answer_tokens(text, 12))
    assert {ch.model for ch in chunks} == {model}  # our id, never the vendor's
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert [f for f in finishes if f] == ["stop"]
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (user_prompt_tokens(text), 12)

    record = vendors.client.wait_usage(user_token, grant["reservation_id"])
    assert (record["status"], record["usage_source"]) == ("completed", "upstream")
    assert (record["input_tokens"], record["output_tokens"]) == (user_prompt_tokens(text), 12)
    assert (record["model"], record["provider"]) == (model, MODELS[model][0])
    assert_asked_for_the_upstream_model(upstream_request(vendors, grant), model, stream=True)


@pytest.mark.parametrize("model", WORKING)
def test_eventsource_stream(vendors: AdapterStack, user_token: str, model: str) -> None:
    text = f"Stream {model} to me [[mock tokens=9]]"
    grant = start(vendors, user_token, model, text)
    received = events(vendors, grant)
    chunks = [orjson.loads(e.data) for e in received if e.event == "chunk"]
    assert "".join(c["content"] for c in chunks) == "".join(answer_tokens(text, 9))
    assert [c["index"] for c in chunks] == list(range(9))
    assert received[-1].event == "complete"
    complete = orjson.loads(received[-1].data)
    assert complete["finish_reason"] == "stop"
    assert complete["usage"] == {"input_tokens": user_prompt_tokens(text), "output_tokens": 9}
    record = vendors.client.wait_usage(user_token, grant["reservation_id"])
    assert (record["usage_source"], record["output_tokens"]) == ("upstream", 9)


@pytest.mark.parametrize("model", WORKING)
def test_non_streaming(vendors: AdapterStack, user_token: str, model: str) -> None:
    text = f"Briefly, {model} [[mock tokens=20]]"
    grant = start(vendors, user_token, model, text)
    with edge_client(vendors, grant) as client:
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}], max_tokens=5
        )
    assert answer.model == model and answer.object == "chat.completion"
    assert answer.choices[0].message.content == "".join(answer_tokens(text, 5))
    assert answer.choices[0].finish_reason == "length"  # max_tokens / MAX_TOKENS, mapped
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        user_prompt_tokens(text),
        5,
    )
    record = vendors.client.wait_usage(user_token, grant["reservation_id"])
    assert (record["usage_source"], record["output_tokens"]) == ("upstream", 5)
    request = upstream_request(vendors, grant)
    # Every backend is asked for a stream, joined by the edge: a vendor's JSON answer
    # comes only once generated, a long one past the edge's read timeout.
    assert_asked_for_the_upstream_model(request, model, stream=True)


@pytest.mark.parametrize("model", WORKING)
def test_backend_without_usage_is_estimated(
    vendors: AdapterStack, user_token: str, model: str
) -> None:
    grant = start(vendors, user_token, model, "count for me [[mock tokens=6 usage=0]]")
    received = events(vendors, grant)
    complete = orjson.loads(received[-1].data)
    assert received[-1].event == "complete"
    assert len([e for e in received if e.event == "chunk"]) == 6
    assert complete["usage"]["output_tokens"] == estimated_output(model, received)
    record = vendors.client.wait_usage(user_token, grant["reservation_id"])
    assert (record["status"], record["usage_source"]) == ("completed", "estimated")
    assert record["output_tokens"] == estimated_output(model, received)


def post_completion(vendors: AdapterStack, grant: dict[str, Any], text: str) -> httpx.Response:
    return vendors.client.http.post(
        f"{vendors.client.edge_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {grant['stream_token']}"},
        json={"messages": [{"role": "user", "content": text}], "stream": True},
    )


# The vendors' own words for these failures: none may reach our client.
VENDOR_WORDS = ("x-api-key", "API key", "Incorrect", "Service-Token", "mock:", "Overloaded")


def assert_nothing_leaks(body: str) -> None:
    for secret in (VENDOR_KEY, WRONG_KEY, SERVICE_TOKEN, *VENDOR_WORDS):
        assert secret not in body


@pytest.mark.parametrize(
    "model",
    [
        "claude-badkey",
        "gpt-badkey",
        "gemini-nokey",  # Google: a missing key is 403
        "inhouse-notoken",
        "gemini-badkey",  # Google: a wrong key is 400 API_KEY_INVALID
    ],
)
def test_refused_credentials_are_502_upstream_auth(
    vendors: AdapterStack, user_token: str, model: str
) -> None:
    grant = start(vendors, user_token, model, "hello")
    response = post_completion(vendors, grant, "hello")
    assert_nothing_leaks(response.text)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_auth"
    record = vendors.client.wait_usage(user_token, grant["reservation_id"])
    assert (record["status"], record["output_tokens"]) == ("failed", 0)


@pytest.mark.parametrize("model", WORKING)
def test_vendor_429_keeps_its_retry_after(
    vendors: AdapterStack, user_token: str, model: str
) -> None:
    text = "busy? [[mock fail=429 retry_after=17]]"
    response = post_completion(vendors, start(vendors, user_token, model, text), text)
    assert response.status_code == 429 and response.headers["retry-after"] == "17"
    assert_nothing_leaks(response.text)


@pytest.mark.parametrize("model", WORKING)
def test_vendor_500_is_502(vendors: AdapterStack, user_token: str, model: str) -> None:
    text = "broken? [[mock fail=500]]"
    response = post_completion(vendors, start(vendors, user_token, model, text), text)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    assert_nothing_leaks(response.text)


@pytest.mark.parametrize("how", ["error_after", "drop_after"])
@pytest.mark.parametrize("model", WORKING)
def test_mid_stream_failure_is_an_error_event(
    vendors: AdapterStack, user_token: str, model: str, how: str
) -> None:
    grant = start(vendors, user_token, model, f"fail later [[mock tokens=10 {how}=3]]")
    received = events(vendors, grant)
    assert [e.event for e in received] == ["chunk"] * 3 + ["error"]
    error = orjson.loads(received[-1].data)
    assert error["code"] == "upstream_error"
    assert_nothing_leaks(received[-1].data)
    record = vendors.client.wait_usage(user_token, grant["reservation_id"])
    assert (record["status"], record["output_tokens"]) == (
        "failed",
        estimated_output(model, received),
    )


def estimated_output(model: str, received: list[ServerSentEvent]) -> int:
    """The edge's count when a backend gives no usage (`stream_edge.output_estimate`):
    OpenAI-compatible backends send a token per delta, so a delta is one token, or its
    pieces when it holds several (the mock's `" word."` ending a sentence: a real
    vendor streams the word and the period apart); other vendors batch tokens, so
    the input estimate's bound: a token per 3 UTF-8 bytes at least, and per piece."""
    raws = [orjson.loads(e.data)["content"].encode() for e in received if e.event == "chunk"]
    if MODELS[model][1] == "openai_chat":
        return sum(max(1, pieces(raw)) for raw in raws)
    size = sum(map(len, raws))
    return max(len(raws), -(-size // 3), sum(map(pieces, raws)) + size // 24)


def test_inhouse_backend_gets_the_service_token_and_caller_context(
    vendors: AdapterStack, user_token: str
) -> None:
    grant = start(vendors, user_token, "inhouse-test", "who am I? [[mock tokens=2]]")
    assert events(vendors, grant)[-1].event == "complete"
    headers = upstream_request(vendors, grant)["headers"]
    claims = grant["claims"]
    assert {
        name: headers.get(name)
        for name in ("x-service-token", "x-user-id", "x-company-id", "x-user-role",
                     "x-session-id", "x-request-id")
    } == {
        "x-service-token": SERVICE_TOKEN, "x-user-id": claims["sub"],
        "x-company-id": claims["company_id"], "x-user-role": claims["role"],
        "x-session-id": claims["session_id"], "x-request-id": claims["request_id"],
    }  # fmt: skip
    assert grant["stream_token"] not in " ".join(headers.values())
    assert "authorization" not in headers  # no api_key_env: no Bearer at all


@pytest.mark.parametrize("model", ["claude-test", "gemini-test", "gpt-test"])
def test_public_vendors_never_learn_the_caller(
    vendors: AdapterStack, user_token: str, model: str
) -> None:
    grant = start(vendors, user_token, model, "private [[mock tokens=1]]")
    assert events(vendors, grant)[-1].event == "complete"
    headers = upstream_request(vendors, grant)["headers"]
    assert not {"x-service-token", "x-user-id", "x-company-id", "x-session-id"} & set(headers)
    assert grant["stream_token"] not in " ".join(headers.values())
    assert VENDOR_KEY in " ".join(headers.values())  # the platform's key, in its header


def test_fixture_catalog_routes_every_model_to_the_mock(vendors: AdapterStack) -> None:
    catalog = vendors.settings.catalog
    assert set(catalog.models) == set(MODELS)
    assert all(m.upstream_model == "mock-fast" != m.id for m in catalog.models.values())
    assert {catalog.providers[p].api_type for p, _ in MODELS.values()} == {
        "anthropic_messages",
        "gemini",
        "openai_chat",
        "sse_backend",
    }


# --- issue 15.2: images and files reach each vendor in its own shape ----------------------

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kg"
PNG += "AAAABJRU5ErkJggg=="
PDF = "JVBERi0xLjQKJcfsj6IKMSAwIG9iago8PD4+CmVuZG9iagp0cmFpbGVyCjw8Pj4KJSVFT0YK"
MEDIA_SHAPES = {
    "claude-test": [
        {"type": "text", "text": "Describe both."},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "document",
         "source": {"type": "base64", "media_type": "application/pdf", "data": PDF}},
    ],
    "gemini-test": [
        {"text": "Describe both."},
        {"inlineData": {"mimeType": "image/png", "data": PNG}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/cat.jpg"}},
        {"inlineData": {"mimeType": "application/pdf", "data": PDF}},
    ],
}  # fmt: skip


@pytest.mark.parametrize("model", sorted(MEDIA_SHAPES))
def test_images_and_files_reach_the_vendor_in_its_shape(
    vendors: AdapterStack, user_token: str, model: str
) -> None:
    parts = [
        {"type": "text", "text": "Describe both."},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "file", "file": {"filename": "a.pdf",
                                  "file_data": f"data:application/pdf;base64,{PDF}"}},
    ]  # fmt: skip
    grant = vendors.client.init_ok(
        user_token,
        {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": parts}]},
    )
    STREAM_TOKENS.append(grant["stream_token"])
    grant["claims"] = claims_of(grant["stream_token"])
    received = events(vendors, grant)
    assert received[-1].event == "complete", received[-1]
    body = upstream_request(vendors, grant)["body"]
    if model == "claude-test":
        assert body["messages"] == [{"role": "user", "content": MEDIA_SHAPES[model]}]
    else:
        assert body["contents"] == [{"role": "user", "parts": MEDIA_SHAPES[model]}]
    record = vendors.client.wait_usage(user_token, grant["reservation_id"])
    assert (record["status"], record["usage_source"]) == ("completed", "upstream")


# --- issue 15.3: cache reads, cache writes and reasoning, each at its own rate --------------

# Which details each vendor reports: OpenAI and Gemini have no cache-write count,
# Anthropic no count of thinking tokens (they are inside its output_tokens).
WRITES = {"claude-test": True, "gemini-test": False, "gpt-test": False}
REASONING = {"claude-test": False, "gemini-test": True, "gpt-test": True}


def price_of(input_tokens: int, cached: int, write: int, output: int) -> int:
    exact = (
        (input_tokens - cached - write) * Decimal("1.0")
        + cached * Decimal("0.1")
        + write * Decimal("1.25")
        + output * Decimal("2.0")
    )
    return math.ceil(exact)


@pytest.mark.parametrize("model", sorted(WRITES))
def test_cache_and_reasoning_usage_is_priced_at_each_rate(
    vendors: AdapterStack, user_token: str, model: str
) -> None:
    text = f"Think hard, {model} [[mock tokens=5 cached=7 cache_write=3 reasoning=4]]"
    grant = start(vendors, user_token, model, text)
    assert events(vendors, grant)[-1].event == "complete"
    record = vendors.client.wait_usage(user_token, grant["reservation_id"])
    write = 3 if WRITES[model] else 0
    prompt = user_prompt_tokens(text)
    assert record["usage_source"] == "upstream"
    assert record["input_tokens"] == prompt  # the total input, cache included
    assert (record["cached_input_tokens"], record["cache_write_tokens"]) == (7, write)
    reasoning = 4 if REASONING[model] else 0
    assert (record["output_tokens"], record["reasoning_tokens"]) == (9, reasoning)
    assert micro(record["cost"]) == price_of(prompt, 7, write, 9)


def test_a_backend_claiming_more_cached_than_input_pays_cached_at_most(
    vendors: AdapterStack, user_token: str
) -> None:
    """A hostile backend cannot make the uncached remainder (and the charge) negative:
    the edge keeps each part within its whole before it signs the usage."""
    text = "Free tokens please [[mock tokens=5 cached=100000 reasoning=999]]"
    grant = start(vendors, user_token, "gpt-test", text)
    assert events(vendors, grant)[-1].event == "complete"
    record = vendors.client.wait_usage(user_token, grant["reservation_id"])
    prompt = user_prompt_tokens(text)
    assert (record["input_tokens"], record["cached_input_tokens"]) == (prompt, prompt)
    assert (record["output_tokens"], record["reasoning_tokens"]) == (1004, 999)
    assert micro(record["cost"]) == min(
        price_of(prompt, prompt, 0, 1004), micro(grant["reserved_credits"])
    )
    assert micro(record["cost"]) > 0


def test_reasoning_reported_beside_the_completion_count_is_billed(
    vendors: AdapterStack, user_token: str
) -> None:
    """xAI's Grok (and Gemini's OpenAI-compatible endpoint) counts its reasoning
    beside `completion_tokens`, not inside it as OpenAI does; `total_tokens` has both,
    and the vendor bills both. Read as OpenAI's, the reasoning was dropped (clamped
    to the visible answer): 400 tokens of thinking billed as 5."""
    text = "Think it through [[mock tokens=5 reasoning=400 reasoning_apart=1]]"
    grant = start(vendors, user_token, "gpt-test", text)
    assert events(vendors, grant)[-1].event == "complete"
    record = vendors.client.wait_usage(user_token, grant["reservation_id"])
    prompt = user_prompt_tokens(text)
    assert (record["output_tokens"], record["reasoning_tokens"]) == (405, 400)
    assert micro(record["cost"]) == price_of(prompt, 0, 0, 405) < micro(grant["reserved_credits"])
    # A whole answer (`stream: false`) reads its usage the same way.
    grant = start(vendors, user_token, "gpt-test", text)
    answer = edge_client(vendors, grant).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": text}]
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 405
    record = vendors.client.wait_usage(user_token, grant["reservation_id"])
    assert (record["output_tokens"], record["reasoning_tokens"]) == (405, 400)


# OpenAI request fields that multiply what a vendor bills (several answers, audio,
# a dearer tier, longer reasoning), none of which a hold is sized for.
COST_MULTIPLIERS: dict[str, Any] = {
    "n": 4,
    "best_of": 4,
    "logprobs": True,
    "top_logprobs": 20,
    "service_tier": "priority",
    "reasoning_effort": "high",
    "prediction": {"type": "content", "content": "x" * 2000},
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "web_search_options": {},
    "logit_bias": {"50256": 100},
    "response_format": {"type": "json_object"},
}


def test_fields_that_multiply_a_vendors_bill_never_reach_it(
    vendors: AdapterStack, user_token: str
) -> None:
    """Checked sound: neither the edge's completions nor init's stashed request pass
    such fields upstream (only the sampling and tool parameters the estimate counts
    go), so one answer is generated and billed as held."""
    text = "Just once [[mock tokens=3]]"
    grant = start(vendors, user_token, "gpt-test", text)
    with edge_client(vendors, grant) as client:
        answer = client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": text}],
            extra_body=COST_MULTIPLIERS,
        )
    assert len(answer.choices) == 1
    grant_via_init = start(vendors, user_token, "gpt-test", text, **COST_MULTIPLIERS)
    assert events(vendors, grant_via_init)[-1].event == "complete"
    for each in (grant, grant_via_init):
        body = upstream_request(vendors, each)["body"]
        assert body["messages"] and not set(body) & set(COST_MULTIPLIERS), body
        record = vendors.client.wait_usage(user_token, each["reservation_id"])
        assert record["output_tokens"] == 3


# --- review 5: Anthropic's own overheads are held for, at init and at the edge ------------

SCHEMA = {"type": "object", "properties": {}}
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": SCHEMA}}


def test_an_anthropic_hold_covers_its_tool_prompt_and_dearer_images(
    vendors: AdapterStack, user_token: str
) -> None:
    """Anthropic adds a tool-use system prompt (~350 tokens) whenever tools are sent,
    and bills an image at up to 1,600 tokens: the same body is held dearer on an
    Anthropic route than on Gemini's, and the edge sizes it the same way."""
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    body = {"max_tokens": 8, "tools": [TOOL],
            "messages": [{"role": "user", "content": content}]}  # fmt: skip
    grants = {}
    for model in ("claude-test", "gemini-test"):
        grant = vendors.client.init_ok(user_token, {"model": model, **body})
        STREAM_TOKENS.append(grant["stream_token"])
        grants[model] = claims_of(grant["stream_token"])
        grants[model]["stream_token"] = grant["stream_token"]
    claude, gemini = grants["claude-test"], grants["gemini-test"]
    assert claude["max_input_tokens"] == gemini["max_input_tokens"] + 350 + (1600 - 1445)
    # At the edge: ~300 tokens more text than init held fits the allowance only if
    # the edge forgets Anthropic's overheads.
    longer = [{"role": "user", "content": [*content, {"type": "text", "text": "a" * 900}]}]
    response = vendors.client.http.post(
        f"{vendors.client.edge_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {claude['stream_token']}"},
        json={"messages": longer, "tools": [TOOL], "max_tokens": 8},
    )
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "input_too_large"
    # The very body init held for fits.
    response = vendors.client.http.post(
        f"{vendors.client.edge_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {claude['stream_token']}"},
        json={"messages": body["messages"], "tools": [TOOL], "max_tokens": 8},
    )
    assert response.status_code == 200, response.text
