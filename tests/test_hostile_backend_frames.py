"""A backend's events in SSE shapes the spec allows and OpenAI's servers never send.

Passthrough (an OpenAI-compatible backend serving our model name) forwards each
event's data as the backend sent it, once parsed for billing. An event whose JSON
spans several `data:` lines is one event (the lines are joined with a newline, JSON
whitespace): before the fix its data was written back as one `data:` line with raw
newlines in it, so the client read the first line alone, `{"choices": [` and the
like, and the official OpenAI client failed on every chunk (measured: JSONDecodeError
on the first chunk, nothing of the answer read). Now each line of the data goes out
as its own `data:` line, and the client joins them back (review: edge DoS).

EventSource events are our own JSON, written by `orjson`, which leaves U+2028,
U+2029 and U+0085 raw in strings (JSON allows them). The encoder cut data into lines
with `str.splitlines`, which also breaks at those: an answer holding one (text copied
from a web page or a PDF, or a backend or prompt that wants it) went out as two
`data:` lines, joined back by the client with a newline inside a JSON string, which
`JSON.parse` refuses (measured: every such `chunk` event unreadable). SSE lines end
at CR, LF or CRLF only, and the encoder now splits there only."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from shared.sse import SSEDecoder, encode_data, encode_event
from tests.hostile_catalog import hostile_backend_stack
from tests.stack import InProcessStack

WORDS = ["Hello", " there\u2028", ",\u0085", " friend\u2029"]


def _spread(doc: dict[str, Any]) -> bytes:
    """One event whose JSON is pretty-printed over several `data:` lines."""
    lines = json.dumps(doc, indent=1).splitlines()
    return b"".join(b"data: " + line.encode() + b"\n" for line in lines) + b"\n"


async def _chat(request: Request) -> Response:
    async def frames() -> AsyncIterator[bytes]:
        for word in WORDS:
            yield _spread({"choices": [{"index": 0, "delta": {"content": word}}]})
        yield _spread({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        usage = {"prompt_tokens": 7, "completion_tokens": len(WORDS), "total_tokens": 11}
        yield _spread({"choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessStack]:
    with hostile_backend_stack(tmp_path_factory.mktemp("spread"), "spread", _chat) as gateway:
        yield gateway


def test_an_event_over_several_data_lines_reaches_the_openai_client_whole(
    stack: InProcessStack,
) -> None:
    c = stack.client
    token = c.new_user(c.new_company("100"))
    messages = [{"role": "user", "content": "hi"}]
    grant = c.init_ok(token, {"model": "spread-model", "messages": messages})
    chunks = list(
        c.openai(grant["stream_token"]).chat.completions.create(
            model="spread-model",
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "".join(WORDS)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(WORDS)
    record = c.wait_usage(token, grant["reservation_id"])
    assert (record["status"], record["output_tokens"]) == ("completed", len(WORDS))


def test_data_with_newlines_is_written_as_several_data_lines() -> None:
    payload = b'{"choices": [\n {"index": 0}\n]}'
    frame = encode_data(payload)
    assert frame.count(b"\n\n") == 1 and frame.endswith(b"\n\n")
    assert [e.data.encode() for e in SSEDecoder().feed(frame)] == [payload]
    assert encode_data(b'{"a":1}') == b'data: {"a":1}\n\n'


def test_an_answer_with_unicode_line_separators_reaches_an_eventsource_client_as_json(
    stack: InProcessStack,
) -> None:
    c = stack.client
    token = c.new_user(c.new_company("100"))
    grant = c.init_ok(token, {"model": "spread-model", "query": "hi"})
    decoder = SSEDecoder()
    with httpx.stream("GET", grant["stream_url"], timeout=30) as response:
        assert response.status_code == 200
        events = [e for raw in response.iter_raw() for e in decoder.feed(raw)]
    assert [e.event for e in events] == ["chunk"] * len(WORDS) + ["complete"]
    # What a browser does with each event: JSON.parse (json.loads is as strict).
    assert [json.loads(e.data)["content"] for e in events[:-1]] == WORDS
    record = c.wait_usage(token, grant["reservation_id"])
    assert (record["status"], record["output_tokens"]) == ("completed", len(WORDS))


@pytest.mark.parametrize("data", ["a\u2028b\x85c\u2029", "a\nb", "a\r\nb\rc", "", "a\n"])
def test_an_event_is_cut_into_lines_where_sse_ends_lines_only(data: str) -> None:
    [event] = SSEDecoder().feed(encode_event(data, event="chunk", id=1))
    assert event.data == data.replace("\r\n", "\n").replace("\r", "\n")
