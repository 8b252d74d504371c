"""What leaks out (review 8): secrets a hostile backend echoes never reach a log line,
the client or a usage report.

A backend's mid-stream error event is logged for the operator. A backend that echoes
the credential it was sent (a company's own key, which may have any shape) put that
key into the edge's log: the pattern redaction of `shared.logs` only catches the
shapes it knows (`sk-…`, bearer values, JWTs)."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import orjson
import pytest
import pytest_asyncio

from llm_gateway import cli
from mock_llm import openai_api
from shared.logs import JsonFormatter
from shared.sse import ServerSentEvent
from shared.webhooks import generate_secret
from stream_edge.upstream.anthropic_messages import AnthropicMessagesAdapter
from stream_edge.upstream.base import VENDOR_ERROR, Adapter, Failure, parser_for
from stream_edge.upstream.gemini import GeminiAdapter
from stream_edge.upstream.openai_chat import OpenAIChatAdapter
from tests.inproc import Gateway, events, gateway_env, opened


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    tmp = tmp_path_factory.mktemp("leaks")
    async with Gateway(gateway_env(str(tmp))) as gateway:
        yield gateway


async def _member_of_company_with_key(gw: Gateway, key: str) -> str:
    """A member's access token, in a new company that stores `key` for the mock."""
    company = await gw.admin(
        "POST", "/v1/admin/companies", json={"name": f"c-{uuid.uuid4().hex[:10]}", "credits": "5"}
    )
    company_id = company.json()["data"]["id"]
    stored = await gw.admin(
        "PUT", f"/v1/admin/companies/{company_id}/providers/mock", json={"api_key": key}
    )
    assert stored.status_code == 200, stored.text
    email = f"u-{uuid.uuid4().hex[:10]}@example.com"
    user = {"company_id": company_id, "email": email, "password": "pw-123456", "role": "member"}
    assert (await gw.admin("POST", "/v1/admin/users", json=user)).status_code == 201
    login = await gw.http.post("/v1/auth/login", json={"email": email, "password": "pw-123456"})
    token: str = login.json()["data"]["access_token"]
    return token


async def _stream_failing_after_three_tokens(gw: Gateway, access: str) -> list[ServerSentEvent]:
    """A stream whose backend sends its error event after 3 tokens, streamed to its
    end; checks its report is `failed` and returns the events the client got."""
    query = "hello [[mock tokens=8 error_after=3]]"
    grant = await gw.init_ok(access, {"query": query})
    headers = {"Authorization": f"Bearer {grant['stream_token']}"}
    body = orjson.dumps({"stream": True, "messages": [{"role": "user", "content": query}]})
    async with opened(await gw.post("/v1/chat/completions", body, headers)) as response:
        assert response.status_code == 200
        got = await events(response)
    record = await gw.wait_usage(access, grant["reservation_id"])
    assert record["status"] == "failed"
    return got


@pytest.mark.asyncio(loop_scope="module")
async def test_a_backend_echoing_the_key_it_was_sent_into_its_error_never_logs_it(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    key = f"acme.{uuid.uuid4().hex}"  # a company's key: no shape the redaction knows
    access = await _member_of_company_with_key(gw, key)

    def echoing(self: openai_api.ChunkFrames) -> bytes:
        error = {"message": f"quota exceeded for key {key}", "type": "insufficient_quota"}
        return openai_api.sse_frame({"error": error})

    monkeypatch.setattr(openai_api.ChunkFrames, "error", echoing)
    caplog.set_level(logging.INFO)
    got = await _stream_failing_after_three_tokens(gw, access)
    assert not [e.data for e in got if key in e.data]  # the client is told nothing of it
    assert [r for r in caplog.records if "upstream error event" in r.getMessage()]
    lines = [JsonFormatter().format(r) for r in caplog.records]
    assert not [line for line in lines if key in line]


@contextlib.contextmanager
def logging_left_as_found() -> Iterator[None]:
    """`cli.main` configures the process's logging (a redacting handler on the root):
    left in place, it would redact what later tests' log captures look for."""
    names = ("", "uvicorn", "uvicorn.access", "uvicorn.error", "alembic", "httpx", "httpcore")
    loggers = [logging.getLogger(name) for name in names]
    saved = [(list(lg.handlers), list(lg.filters), lg.level) for lg in loggers]
    try:
        yield
    finally:
        for logger, (handlers, filters, level) in zip(loggers, saved, strict=True):
            logger.handlers[:], logger.filters[:] = handlers, filters
            logger.setLevel(level)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LLMGW_REDIS_URL", "redis//:{secret}@redis.internal:6379/0"),
        ("LLMGW_CONTROL_PLANE_URL", "htp://ops:{secret}@cp.internal"),
    ],
)
def test_a_mistyped_url_is_refused_without_printing_its_password(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The start-up refusal echoed the whole URL, password included, to stderr: the
    operator's log pipeline (the `://user:pass@` redaction needs a well-formed URL)."""
    secret = uuid.uuid4().hex
    monkeypatch.setenv("LLMGW_WEBHOOK_SECRET", generate_secret())
    monkeypatch.setenv("LLMGW_REDIS_URL", "redis://127.0.0.1:6379")
    monkeypatch.setenv(name, value.format(secret=secret))
    with logging_left_as_found():
        assert cli.main(["stream-edge"]) == 2
    err = capsys.readouterr().err
    assert name in err
    assert secret not in err


@pytest.mark.asyncio(loop_scope="module")
async def test_a_backend_echoing_the_key_inside_a_structured_error_never_logs_it(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An error whose `message` is no string (a list, an object) was logged as its
    Python repr, which doubles a backslash and escapes a quote: a company key holding
    one (`_valid_key` takes any printable ASCII) was no longer the text cut out, and
    reached the log whole."""
    secret = uuid.uuid4().hex
    key = f"acme\\{secret}'\""  # a backslash and both quotes: repr escapes all three
    access = await _member_of_company_with_key(gw, key)

    def echoing(self: openai_api.ChunkFrames) -> bytes:
        error = {"message": ["quota exceeded for key", {"key": key}], "type": "x"}
        return openai_api.sse_frame({"error": error})

    monkeypatch.setattr(openai_api.ChunkFrames, "error", echoing)
    caplog.set_level(logging.INFO)
    got = await _stream_failing_after_three_tokens(gw, access)
    assert not [e.data for e in got if secret in e.data]
    logged = [r for r in caplog.records if "upstream error event" in r.getMessage()]
    assert logged and "quota exceeded" in logged[0].getMessage()
    assert not [r for r in caplog.records if secret in JsonFormatter().format(r)]


@pytest.mark.parametrize(
    ("adapter", "event"),
    [
        (OpenAIChatAdapter, b'{"error": %s}'),
        (OpenAIChatAdapter, b'{"error": {"message": %s}}'),
        (AnthropicMessagesAdapter, b'{"type": "error", "error": {"type": %s}}'),
        (GeminiAdapter, b'{"error": {"status": %s, "message": "m"}}'),
    ],
    ids=["openai-error", "openai-message", "anthropic-type", "gemini-status"],
)
def test_an_error_event_nested_too_deep_is_a_vendor_error_not_a_crash(
    adapter: Callable[[], Adapter], event: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A backend's error detail nested 1,000 levels (orjson reads 1,024): its repr
    raised RecursionError inside the parser, an unexpected exception for the stream."""
    deep = b"[" * 1000 + b"]" * 1000
    parser = parser_for(adapter(), ("k",))
    caplog.set_level(logging.WARNING)
    out = parser.feed(b"data: " + event % deep + b"\n\n")
    assert out == [Failure(VENDOR_ERROR)]
    assert [r for r in caplog.records if "upstream error event" in r.getMessage()]
