"""The mock LLM backend: its pure script, then the app on a real uvicorn socket.

The socket tests matter because pacing, flushing and disconnects only show on a
real connection; the official ``openai`` client proves the wire format.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
import uvicorn
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette

from mock_llm.app import create_app
from mock_llm.errors import MockAPIError
from mock_llm.request import parse_chat_request
from mock_llm.script import (
    MAX_DIRECTIVE_CHARS,
    MODEL_DEFAULTS,
    Message,
    MockBehaviour,
    Overrides,
    answer_tokens,
    count_prompt_tokens,
    parse_directives,
    parse_headers,
    plan_completion,
    resolve_behaviour,
)

# --- pure script ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hello", Overrides()),
        ("[[mock]]", Overrides()),
        ("[[mock tokens=5]]", Overrides(tokens=5)),
        (
            "x [[mock first_ms=250 delay_ms=20]] y",
            Overrides(first_token_delay_s=0.25, token_delay_s=0.02),
        ),
        ("[[mock tokens=0]]", Overrides(tokens=0)),
        ("[[mock fail=429]]", Overrides(fail_status=429)),
        ("[[mock drop_after=3 tokens=10]]", Overrides(tokens=10, drop_after=3)),
        ("[[mock fail=429 retry_after=5]]", Overrides(fail_status=429, retry_after_s=5)),
        ("[[mock error_after=2 usage=0]]", Overrides(error_after=2, report_usage=False)),
        ("[[mock usage=1]]", Overrides(report_usage=True)),
        ("[[mock tokens=1 tokens=4]]", Overrides(tokens=4)),
        ("[[mock tokens=1]] then [[mock delay_ms=5]]", Overrides(tokens=1, token_delay_s=0.005)),
        ("[[mock  tokens=7\n delay_ms=0 ]]", Overrides(tokens=7, token_delay_s=0.0)),
        ("[[mockery tokens=5]]", Overrides()),
        ("[[ mock tokens=5]]", Overrides()),
        ("[mock tokens=5]", Overrides()),
    ],
)
def test_parse_directives(text: str, expected: Overrides) -> None:
    assert parse_directives(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "[[mock tokens=abc]]",
        "[[mock tokens=-1]]",
        "[[mock tokens=²]]",
        "[[mock tokens=1.5]]",
        "[[mock tokens]]",
        "[[mock colour=red]]",
        "[[mock fail=200]]",
        "[[mock fail=600]]",
        "[[mock delay_ms=600001]]",
        "[[mock tokens=100001]]",
        "[[mock usage=2]]",
        "[[mock retry_after=-1]]",
        "[[mock error_after=x]]",
        "fine [[mock]] then [[mock drop_after=x]]",
    ],
)
def test_parse_directives_rejects_bad_values(text: str) -> None:
    with pytest.raises(MockAPIError) as caught:
        parse_directives(text)
    assert caught.value.status == 400
    assert caught.value.body()["error"]["type"] == "invalid_request_error"


def test_parse_headers_is_case_insensitive_and_ignores_others() -> None:
    headers = {"X-Mock-Tokens": "3", "x-mock-first-token-ms": "100", "X-Other": "zz"}
    assert parse_headers(headers) == Overrides(tokens=3, first_token_delay_s=0.1)
    with pytest.raises(MockAPIError):
        parse_headers({"X-Mock-Token-Delay-Ms": "soon"})


def test_headers_override_directives_override_model_defaults() -> None:
    messages = [
        Message("system", "[[mock tokens=9 delay_ms=7]]"),
        Message("user", "hi [[mock tokens=8 fail=503]]"),
    ]
    behaviour = resolve_behaviour(MODEL_DEFAULTS["mock-chat"], messages, {"x-mock-tokens": "2"})
    assert behaviour == MockBehaviour(
        tokens=2, first_token_delay_s=0.3, token_delay_s=0.007, fail_status=503
    )


def test_answers_are_deterministic_prefix_stable_and_prompt_dependent() -> None:
    tokens = answer_tokens("Tell me a story", 40)
    assert tokens == answer_tokens("Tell me a story", 40)
    assert answer_tokens("Tell me a story", 10) == tokens[:10]
    assert answer_tokens("Tell me a poem", 40) != tokens
    assert len(tokens) == 40
    assert not tokens[0].startswith(" ") and tokens[0][0].isupper()
    assert all(token.startswith(" ") and token.strip() for token in tokens[1:])
    assert answer_tokens("anything", 0) == []


@pytest.mark.parametrize(
    ("max_tokens", "count", "finish_reason"),
    [
        (None, 64, "stop"),
        (10, 10, "length"),
        (63, 63, "length"),
        (64, 64, "stop"),
        (99, 64, "stop"),
    ],
)
def test_plan_completion_truncates_to_max_tokens(
    max_tokens: int | None, count: int, finish_reason: str
) -> None:
    messages = [Message("user", "Tell me a story"), Message("assistant", "Once")]
    plan = plan_completion(messages, MODEL_DEFAULTS["mock-fast"], max_tokens)
    assert (len(plan.tokens), plan.finish_reason) == (count, finish_reason)
    # The answer follows the last user message, whatever comes after it.
    assert plan.tokens == answer_tokens("Tell me a story", count)


@pytest.mark.parametrize(
    ("texts", "expected"),
    [([], 0), ([""], 3), (["abcd"], 4), (["abcde"], 5), (["hi", "é" * 4], 4 + 5)],
)
def test_count_prompt_tokens(texts: list[str], expected: int) -> None:
    assert count_prompt_tokens(Message("user", text) for text in texts) == expected


@given(st.lists(st.text()))
def test_prompt_count_never_exceeds_the_gateway_estimate(texts: list[str]) -> None:
    gateway = sum(math.ceil(len(text.encode("utf-8")) / 3) + 4 for text in texts)
    assert count_prompt_tokens(Message("user", text) for text in texts) <= gateway


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "mock-fast"}, "messages"),
        ({"model": "mock-fast", "messages": []}, "messages"),
        ({"model": "mock-fast", "messages": ["hi"]}, "messages[0]"),
        ({"model": "mock-fast", "messages": [{"content": "hi"}]}, "messages[0].role"),
        (
            {"model": "mock-fast", "messages": [{"role": "user", "content": 3}]},
            "messages[0].content",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0]",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": ""}], "stream": 1}, "stream"),
        (
            {"model": "m", "messages": [{"role": "user", "content": ""}], "max_tokens": 0},
            "max_tokens",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": ""}], "stream_options": 1},
            "stream_options",
        ),
    ],
)
def test_parse_chat_request_rejects(body: Any, param: str | None) -> None:
    with pytest.raises(MockAPIError) as caught:
        parse_chat_request(body)
    assert (caught.value.status, caught.value.param) == (400, param)


def test_parse_chat_request_flattens_parts_and_takes_the_smaller_limit() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    chat = parse_chat_request(
        {
            "model": "mock-fast",
            "messages": [{"role": "user", "content": parts}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 50,
            "max_completion_tokens": 20,
            "temperature": 0.2,
        }
    )
    assert chat.messages == (Message("user", "ab"),)
    assert (chat.stream, chat.include_usage, chat.max_tokens) == (True, True, 20)


# --- a real server -------------------------------------------------------------------


@contextlib.contextmanager
def run_server(app: Starlette) -> Iterator[str]:
    """Serve ``app`` with uvicorn on an unused port in a background thread; yield its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=asyncio.run, args=(server.serve(sockets=[sock]),))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def base_url() -> Iterator[str]:
    with run_server(create_app()) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[openai.OpenAI]:
    # No retries: a 429 or 5xx from the mock must surface at once.
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10) as http:
        yield http


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def sse_payloads(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if line.startswith("data: "):
            yield line.removeprefix("data: ")


def test_list_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["mock-fast", "mock-chat"]
    assert all(m.owned_by == "mock" and m.object == "model" for m in models.data)


def test_non_streaming_completion(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(model="mock-fast", messages=user("Tell me a story"))
    assert result.id.startswith("chatcmpl-") and result.object == "chat.completion"
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "".join(answer_tokens("Tell me a story", 64))
    assert choice.finish_reason == "stop"
    assert result.usage is not None
    assert result.usage.prompt_tokens == count_prompt_tokens([Message("user", "Tell me a story")])
    assert (result.usage.completion_tokens, result.usage.total_tokens) == (64, 64 + 7)


def test_streaming_with_usage_matches_non_streaming(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model="mock-fast", messages=user("Same prompt"))
    stream = client.chat.completions.create(
        model="mock-fast",
        messages=user("Same prompt"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    first, *tokens, finish, last = chunks
    assert (first.choices[0].delta.role, first.choices[0].delta.content) == ("assistant", "")
    assert len(tokens) == 64
    text = "".join(c.choices[0].delta.content or "" for c in tokens)
    assert text == plain.choices[0].message.content
    assert finish.choices[0].finish_reason == "stop" and finish.choices[0].delta.content is None
    assert all(c.usage is None for c in chunks[:-1])
    assert last.choices == [] and last.usage is not None and plain.usage is not None
    assert last.usage.model_dump() == plain.usage.model_dump()


def test_streaming_without_include_usage_has_no_usage(http: httpx.Client) -> None:
    body = {"model": "mock-fast", "messages": user("hi"), "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        payloads = list(sse_payloads(response.iter_lines()))
    assert payloads[-1] == "[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    assert len(chunks) == 1 + 64 + 1
    assert all("usage" not in c and len(c["choices"]) == 1 for c in chunks)


def test_max_tokens_truncates_the_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="mock-chat",
        messages=user("[[mock first_ms=0 delay_ms=0]] long please"),
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_tokens_are_paced_and_flushed_one_by_one(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="mock-fast", messages=user("[[mock tokens=5 delay_ms=50]] go"), stream=True
    )
    arrivals = [time.monotonic() for c in stream if c.choices and c.choices[0].delta.content]
    assert len(arrivals) == 5
    # Four 50 ms gaps: a buffered response would deliver all five together.
    assert arrivals[-1] - arrivals[0] >= 0.15


def test_first_token_delay_header(client: openai.OpenAI) -> None:
    started = time.monotonic()
    stream = client.chat.completions.create(
        model="mock-fast",
        messages=user("[[mock first_ms=0]] hi"),
        stream=True,
        extra_headers={"X-Mock-First-Token-Ms": "200", "X-Mock-Tokens": "2"},
    )
    contents = [c.choices[0].delta.content for c in stream if c.choices]
    assert time.monotonic() - started >= 0.2
    assert len([c for c in contents if c]) == 2


def test_bad_requests_are_400_in_openai_shape(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="mock-fast", messages=[])
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="mock-fast", messages=user("[[mock tokens=x]]"))
    assert caught.value.code == "invalid_mock_directive"
    for content in (b"{not json", b"[1]", b"\xff\xfe"):
        response = http.post("/v1/chat/completions", content=content)
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
    response = http.post(
        "/v1/chat/completions",
        json={"model": "mock-fast", "messages": user("hi")},
        headers={"X-Mock-Tokens": "many"},
    )
    assert response.status_code == 400


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-nope", messages=user("hi"))
    assert caught.value.code == "model_not_found"


def test_fail_directive(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="mock-fast", messages=user("[[mock fail=429]]"), stream=True
        )
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="mock-fast", messages=user("[[mock fail=503]]"))
    assert caught.value.status_code == 503
    assert http.get("/_mock/stats").json()["failed"] == 2


def test_drop_after_cuts_the_stream_without_done(http: httpx.Client) -> None:
    body = {
        "model": "mock-fast",
        "messages": user("[[mock tokens=10 drop_after=3]]"),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    payloads: list[str] = []
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        # The connection is cut mid-body, as a crashing backend would.
        with pytest.raises(httpx.RemoteProtocolError):
            payloads.extend(sse_payloads(response.iter_lines()))
    assert "[DONE]" not in payloads
    chunks = [orjson.loads(p) for p in payloads]
    contents = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert len([c for c in contents if c]) == 3
    assert all(c["usage"] is None for c in chunks)
    stats = wait_for_stats(http, lambda s: s["active"] == 0)
    assert (stats["failed"], stats["completed"]) == (1, 0)


def wait_for_stats(http: httpx.Client, done: Any, timeout: float = 2.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        stats: dict[str, int] = http.get("/_mock/stats").json()
        if done(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def test_client_disconnect_counts_as_cancelled(base_url: str, http: httpx.Client) -> None:
    body = {
        "model": "mock-fast",
        "messages": user("[[mock tokens=100 delay_ms=20]]"),
        "stream": True,
    }
    with httpx.Client(base_url=base_url) as streamer:
        with streamer.stream("POST", "/v1/chat/completions", json=body) as response:
            payloads = sse_payloads(response.iter_lines())
            next(payloads), next(payloads), next(payloads)
            assert http.get("/_mock/stats").json()["active"] == 1
    # Leaving the block closes the connection; the mock must notice within a second.
    stats = wait_for_stats(http, lambda s: s["cancelled"] == 1 and s["active"] == 0, 1.0)
    assert stats == {"requests": 1, "active": 0, "cancelled": 1, "completed": 0, "failed": 0}


def test_stats_count_and_reset(client: openai.OpenAI, http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    client.chat.completions.create(model="mock-fast", messages=user("a"))
    list(client.chat.completions.create(model="mock-fast", messages=user("b"), stream=True))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=user("c"))
    expected = {"requests": 3, "active": 0, "cancelled": 0, "completed": 2, "failed": 0}
    assert http.get("/_mock/stats").json() == expected
    assert http.post("/_mock/reset").json()["requests"] == 0
    assert http.get("/_mock/stats").json()["completed"] == 0


def test_unknown_path_answers_in_openai_shape(http: httpx.Client) -> None:
    response = http.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert http.get("/v1/chat/completions").status_code == 405


def test_api_key_is_enforced_when_set() -> None:
    with run_server(create_app(api_key="sekret")) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError) as caught:
                bad.chat.completions.create(model="mock-fast", messages=user("hi"))
            assert caught.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        with openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0) as good:
            assert good.chat.completions.create(model="mock-fast", messages=user("hi")).choices
        # Health and stats stay open: they are for operators and tests, not clients.
        assert httpx.get(f"{url}/_mock/stats").json()["requests"] == 2


def test_a_directive_is_short_and_holds_no_bracket() -> None:
    """A directive runs to the next `]` or `[`, at most `MAX_DIRECTIVE_CHARS`: each
    "[[mock" of a prompt was scanned to the next `]` however far, so a prompt of them
    with none took quadratic time, every stream of the stand-in vendor stalled (32 KB:
    2.2 s; 1 MiB: the better part of an hour)."""
    assert parse_directives("[[mock tokens=3" + " " * MAX_DIRECTIVE_CHARS + "]]") == Overrides()
    assert parse_directives("[[mock tokens=3 [[mock tokens=4]]") == Overrides(tokens=4)
    assert parse_directives("[[mock " * 150_000) == Overrides()
