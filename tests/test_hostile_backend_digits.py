"""A backend's numbers in a spelling `str.isdigit` takes and `int()` refuses ('²',
Latin-1 0xB2, as a header or an SSE field): before the fix a `Retry-After: ²` on a
503 escaped the upstream client as a ValueError, so the stream skipped its fallback
chain and the key pool's next key and failed as an internal error; a `retry: ²`
line broke the stream it was in. Now the value is simply not a number (review 5)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared.retry import Backoff, parse_retry_after
from shared.sse import SSEDecoder
from stream_edge.errors import EdgeError
from stream_edge.fallback import falls_back
from stream_edge.http1_connection import Headers
from stream_edge.upstream.base import Delta, HttpRequest
from stream_edge.upstream.openai_chat import OpenAIStreamParser
from stream_edge.upstream_client import RetryPolicy, open_stream

REQUEST = HttpRequest(url="http://backend.invalid/v1/chat", headers={}, body=b"{}")


class Answer:
    def __init__(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = status
        self.headers = Headers(headers)

    async def aread(self) -> bytes:
        return b""

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        yield b""

    async def aclose(self) -> None:
        return None


class Backend:
    def __init__(self, status: int, retry_after: bytes) -> None:
        self.answer = Answer(status, [(b"retry-after", retry_after)])

    async def send(
        self, method: str, url: str, headers: Any, body: bytes, company: str | None = None
    ) -> Answer:
        return self.answer


@pytest.mark.parametrize("status", [429, 503])
async def test_a_backends_unreadable_retry_after_is_an_upstream_error_that_falls_back(
    status: int,
) -> None:
    policy = RetryPolicy(retries=1, backoff=Backoff(base=0.0, cap=0.0))
    with pytest.raises(EdgeError) as refused:
        await open_stream(Backend(status, "²".encode("latin-1")), REQUEST, policy=policy)  # type: ignore[arg-type]
    assert falls_back(refused.value)


@pytest.mark.parametrize("value", ["²", "١٢", " ³ "])
def test_retry_after_takes_ascii_digits_only(value: str) -> None:
    assert parse_retry_after(value) is None
    assert parse_retry_after("7") == 7.0


def test_a_retry_field_that_is_no_number_leaves_the_stream_whole() -> None:
    chunk = 'retry: ²\ndata: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
    assert [e.data for e in SSEDecoder().feed(chunk.encode())] == [
        '{"choices": [{"index": 0, "delta": {"content": "hi"}}]}'
    ]
    events = OpenAIStreamParser().feed(chunk.encode())
    assert [e.text for e in events if isinstance(e, Delta)] == ["hi"]


def test_a_retry_field_too_long_for_int_leaves_the_stream_whole() -> None:
    """Past 4,300 digits `int()` refuses a string (CPython's limit on conversions):
    the ValueError escaped the parser (measured), and the relay's catch-all ended the
    stream as broken off, the answer lost. Our parsers never use `retry`; one too
    long to be a delay is no number."""
    data = 'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
    chunk = "retry: " + "9" * 5000 + "\n" + data
    assert [e.retry for e in SSEDecoder().feed(chunk.encode())] == [None]
    events = OpenAIStreamParser().feed(chunk.encode())
    assert [e.text for e in events if isinstance(e, Delta)] == ["hi"]
    assert [e.retry for e in SSEDecoder().feed(b"retry: 1000\ndata: x\n\n")] == [1000]
