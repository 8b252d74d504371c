"""Pure parts of the edge: the OpenAI stream parser, client encoders, request checks."""

from __future__ import annotations

import orjson
import pytest

from shared.catalog import load_catalog
from shared.sse import SSEDecoder
from shared.tokens import StreamGrant
from stream_edge.errors import BadRequest, Forbidden, InputTooLarge
from stream_edge.formats import EventSourceWriter, OpenAIChunkWriter
from stream_edge.meter import Meter
from stream_edge.requests import parse_chat_request
from stream_edge.upstream.base import Delta, Failure, Finish, Passthrough, Usage
from stream_edge.upstream.openai_chat import OpenAIStreamParser

# OpenAI's documented stream with include_usage: usage null on every chunk but the last.
OPENAI_STREAM = (
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":'
    b'[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":'
    b'[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":'
    b'[{"index":0,"delta":{"content":"lo \xc3\xa9"},"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":'
    b'[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}\n\n'
    b"data: [DONE]\n\n"
)


def parse(stream: bytes, size: int) -> tuple[list[object], bool]:
    parser = OpenAIStreamParser()
    events: list[object] = []
    for i in range(0, len(stream), size):
        events += parser.feed(stream[i : i + size])
    return events, parser.done


@pytest.mark.parametrize("size", [1, 3, 17, 100, 10_000])
def test_openai_parser_at_any_split(size: int) -> None:
    events, done = parse(OPENAI_STREAM, size)
    assert done
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Passthrough", "Delta", "Delta", "Finish", "Usage"]
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "Hello é"
    usage = next(e for e in events if isinstance(e, Usage))
    assert (usage.input_tokens, usage.output_tokens) == (9, 2)


def test_openai_parser_interrupted_stream_has_no_usage_and_is_not_done() -> None:
    cut = OPENAI_STREAM[: OPENAI_STREAM.index(b"data: {", 400)]
    events, done = parse(cut, 50)
    assert not done
    assert not any(isinstance(e, Usage) for e in events)


@pytest.mark.parametrize(
    "frame",
    [b"data: {not json}\n\n", b'data: {"error": {"message": "overloaded"}}\n\n', b"data: [1]\n\n"],
)
def test_openai_parser_failures(frame: bytes) -> None:
    events, _ = parse(frame, 1000)
    assert len(events) == 1 and isinstance(events[0], Failure)


def frames(data: bytes) -> list[str]:
    return [e.data for e in SSEDecoder().feed(data)]


def test_passthrough_forwards_vendor_bytes_once_and_drops_unrequested_usage() -> None:
    events, _ = parse(OPENAI_STREAM, 10_000)
    writer = OpenAIChunkWriter("m", include_usage=False, passthrough=True)
    out = b"".join(writer.write(e) for e in events)  # type: ignore[arg-type]
    sent = frames(out)
    assert len(sent) == 4  # role, two deltas, finish; the usage-only chunk dropped
    assert sent[1].encode() in OPENAI_STREAM  # byte-for-byte the vendor's event
    writer = OpenAIChunkWriter("m", include_usage=True, passthrough=True)
    assert len(frames(b"".join(writer.write(e) for e in events))) == 5  # type: ignore[arg-type]


def test_reencoded_chunks_are_openai_shaped() -> None:
    writer = OpenAIChunkWriter("ours", include_usage=True, passthrough=False)
    out = [writer.write(Delta("a")), writer.write(Finish("length")), writer.write(Usage(3, 1))]
    docs = [orjson.loads(frames(o)[0]) for o in out]
    assert docs[0]["choices"][0]["delta"] == {"content": "a", "role": "assistant"}
    assert docs[0]["model"] == "ours" and docs[0]["object"] == "chat.completion.chunk"
    assert docs[1]["choices"][0]["finish_reason"] == "length"
    assert docs[2]["choices"] == [] and docs[2]["usage"]["total_tokens"] == 4
    assert writer.write(Passthrough(b"x")) == b""


def test_eventsource_writer_numbers_events() -> None:
    writer = EventSourceWriter("s1")
    first, second = writer.write(Delta("a")), writer.write(Delta("b"))
    done = writer.complete("stop", 5, 2)
    events = list(SSEDecoder().feed(first + second + done))
    assert [(e.id, e.event) for e in events] == [("1", "chunk"), ("2", "chunk"), ("3", "complete")]
    assert orjson.loads(events[1].data) == {"content": "b", "index": 1}
    assert orjson.loads(events[2].data)["usage"] == {"input_tokens": 5, "output_tokens": 2}


GRANT = StreamGrant(
    jti="j", user_id="u", company_id="c", role="member", scopes=("llm:chat:send",),
    session_id="s", model="mock-fast", max_tokens=50, max_input_tokens=30,
    reservation_id="r", request_id="q", issued_at=0, expires_at=0,
)  # fmt: skip
MSG = [{"role": "user", "content": "hi"}]
MODEL = load_catalog(None).models["mock-fast"]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ([], BadRequest),
        ({"messages": []}, BadRequest),
        ({"messages": [{"role": "wizard", "content": "x"}]}, BadRequest),
        ({"messages": [{"role": "user", "content": 5}]}, BadRequest),
        ({"messages": MSG, "model": "other"}, Forbidden),
        ({"messages": MSG, "max_tokens": 0}, BadRequest),
        ({"messages": MSG, "max_tokens": "9"}, BadRequest),
        ({"messages": MSG, "stream": "yes"}, BadRequest),
        ({"messages": [{"role": "user", "content": "x" * 200}]}, InputTooLarge),
    ],
)
def test_bad_requests(body: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_chat_request(body, GRANT, MODEL)


def test_max_tokens_clamped_and_params_filtered() -> None:
    chat = parse_chat_request(
        {"messages": MSG, "max_tokens": 999, "temperature": 0.2, "tools": [], "stream": True,
         "stream_options": {"include_usage": True}},
        GRANT, MODEL,
    )  # fmt: skip
    assert chat.max_tokens == 50
    assert chat.params == {"temperature": 0.2}
    assert chat.stream and chat.include_usage


def test_meter_prefers_upstream_usage_else_estimates() -> None:
    meter = Meter(input_estimate=30, keep_transcript=True)
    for event in (Delta("a"), Delta("b"), Finish("stop")):
        meter.record(event)
    assert (meter.billing().input_tokens, meter.billing().output_tokens) == (30, 2)
    assert meter.billing().source == "estimated"
    assert meter.content == "ab"
    meter.record(Usage(12, 2))
    assert meter.billing().source == "upstream"
    assert meter.billing().input_tokens == 12
