"""Each upstream adapter's stream parser against literal vendor captures.

Every capture in `tests/fixtures/` is fed in byte chunks of every size from 1 to 7,
split between CR and LF, and at random points: the text, the finish reason and the
usage must come out the same every time. Then the traps: interrupted streams (no
usage, not done), vendor error events (a generic `Failure`, never the vendor's text),
malformed events.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.catalog import Provider, SSEBackendSpec
from stream_edge.upstream import adapter_for
from stream_edge.upstream.base import (
    MALFORMED_EVENT,
    VENDOR_ERROR,
    Delta,
    Failure,
    Finish,
    StreamParser,
    UpstreamEvent,
    Usage,
)

FIXTURES = Path(__file__).parent / "fixtures"


def parser_for(api_type: str) -> StreamParser:
    sse = SSEBackendSpec() if api_type == "sse_backend" else None
    adapter = adapter_for(Provider("p", api_type, "http://backend", sse=sse))
    assert adapter is not None
    return adapter.stream_parser()


@dataclass(frozen=True)
class Capture:
    file: str
    api_type: str
    text: str
    finish: str
    usage: tuple[int, int]
    finish_marker: bytes  # where the event carrying the finish reason starts

    @property
    def data(self) -> bytes:
        return (FIXTURES / self.file).read_bytes()


CAPTURES = [
    Capture(
        "openai_chat_stream.sse",
        "openai_chat",
        "Hello! Café ☕ How can I help?",
        "stop",
        (9, 12),
        b'"finish_reason":"stop"',
    ),
    Capture(
        "anthropic_messages_stream.sse",
        "anthropic_messages",
        "Hello!",
        "stop",
        (25, 15),
        b"event: message_delta",
    ),
    Capture(
        "gemini_stream.sse",
        "gemini",
        "The magic backpack hummed — a faint, café-warm glow spilled from its seams.\n",
        "stop",
        (8, 17),
        b'"finishReason"',
    ),
    Capture(
        "sse_backend_stream.sse",
        "sse_backend",
        "Bonjour, ça va?",
        "stop",
        (11, 3),
        b'"finish": "stop"',
    ),
]
IDS = [c.api_type for c in CAPTURES]


@dataclass(frozen=True)
class Outcome:
    text: str
    finishes: tuple[str, ...]
    usages: tuple[tuple[int, int], ...]
    failures: tuple[str, ...]
    done: bool


def feed(api_type: str, chunks: Iterator[bytes] | list[bytes]) -> Outcome:
    parser = parser_for(api_type)
    events: list[UpstreamEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return Outcome(
        text="".join(e.text for e in events if isinstance(e, Delta)),
        finishes=tuple(e.reason for e in events if isinstance(e, Finish)),
        usages=tuple((e.input_tokens, e.output_tokens) for e in events if isinstance(e, Usage)),
        failures=tuple(e.message for e in events if isinstance(e, Failure)),
        done=parser.done,
    )


def fixed(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def at_line_breaks(data: bytes) -> list[bytes]:
    """Split before every CR and LF and between every CR and LF."""
    cuts = sorted({i for i, byte in enumerate(data) if byte in b"\r\n"} | {len(data)})
    chunks, start = [], 0
    for cut in cuts:
        chunks.append(data[start:cut])
        start = cut
    return [c for c in chunks if c]


def expect_complete(outcome: Outcome, capture: Capture) -> None:
    assert outcome.text == capture.text
    assert outcome.finishes == (capture.finish,)
    # The meter bills the last Usage; it must be the final figure, never a partial one
    # (Anthropic's placeholder output_tokens, Gemini's growing usageMetadata).
    assert outcome.usages == (capture.usage,)
    assert outcome.failures == ()
    assert outcome.done


@pytest.mark.parametrize("size", range(1, 8))
@pytest.mark.parametrize("capture", CAPTURES, ids=IDS)
def test_capture_at_every_small_chunk_size(capture: Capture, size: int) -> None:
    expect_complete(feed(capture.api_type, fixed(capture.data, size)), capture)


@pytest.mark.parametrize("capture", CAPTURES, ids=IDS)
def test_capture_split_at_cr_and_lf(capture: Capture) -> None:
    expect_complete(feed(capture.api_type, at_line_breaks(capture.data)), capture)
    expect_complete(feed(capture.api_type, [capture.data]), capture)


def test_gemini_frames_really_end_in_crlf() -> None:
    data = (FIXTURES / "gemini_stream.sse").read_bytes()
    assert data.count(b"\r\n\r\n") == 3 and data.endswith(b"}\r\n\r\n")
    assert b"\n\n" not in data.replace(b"\r\n\r\n", b"")


@given(st.data())
@pytest.mark.parametrize("capture", CAPTURES, ids=IDS)
def test_capture_at_random_splits(capture: Capture, data: st.DataObject) -> None:
    raw = capture.data
    cuts = sorted(data.draw(st.sets(st.integers(1, len(raw) - 1), max_size=40)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    expect_complete(feed(capture.api_type, chunks), capture)


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("capture", CAPTURES, ids=IDS)
def test_interrupted_stream_has_no_usage_and_is_not_done(capture: Capture, fraction: float) -> None:
    raw = capture.data
    # Cut before the event that carries the finish reason: what a dropped connection
    # leaves. Everything relayed so far is still text; nothing is billable usage.
    finish_at = raw.index(capture.finish_marker)
    assert finish_at > 0
    cut = raw[: int(finish_at * fraction)]
    outcome = feed(capture.api_type, fixed(cut, 5))
    assert outcome.usages == () and outcome.finishes == () and not outcome.done
    assert capture.text.startswith(outcome.text)


def test_openai_stream_cut_before_its_usage_chunk_has_no_usage() -> None:
    raw = CAPTURES[0].data
    outcome = feed("openai_chat", fixed(raw[: raw.index(b'"choices":[],"usage"')], 7))
    assert outcome.finishes == ("stop",) and outcome.usages == () and not outcome.done


ERROR_STREAMS = [
    ("anthropic_messages", (FIXTURES / "anthropic_error_stream.sse").read_bytes(), "Overloaded"),
    ("gemini", (FIXTURES / "gemini_error_stream.sse").read_bytes(), "overloaded"),
    (
        "openai_chat",
        b'data: {"error": {"message": "Internal error sk-proj-abc", "type": "server_error"}}\n\n',
        "sk-proj",
    ),
    ("sse_backend", b'data: {"delta": "a"}\n\ndata: {"error": {"message": "db down"}}\n\n', "db"),
]


@pytest.mark.parametrize(("api_type", "stream", "vendor_text"), ERROR_STREAMS)
def test_vendor_error_event_is_a_generic_failure(
    api_type: str, stream: bytes, vendor_text: str, caplog: pytest.LogCaptureFixture
) -> None:
    for size in (1, 3, len(stream)):
        outcome = feed(api_type, fixed(stream, size))
        assert outcome.failures == (VENDOR_ERROR,)
        assert vendor_text not in outcome.failures[0]
        assert outcome.usages == () and not outcome.done
    # The vendor's words go to the log (briefly), for the operator.
    assert vendor_text in caplog.text


@pytest.mark.parametrize("api_type", IDS)
@pytest.mark.parametrize("frame", [b"data: {not json}\n\n", b"data: [1, 2]\n\n"])
def test_malformed_event_is_a_failure(api_type: str, frame: bytes) -> None:
    assert feed(api_type, [frame]).failures == (MALFORMED_EVENT,)


@pytest.mark.parametrize(
    ("events", "usages"),
    [
        # Newer API versions repeat (cumulative) input counts, cache included, in message_delta.
        (
            [
                b'{"type":"message_start","message":{"usage":{"input_tokens":12,'
                b'"cache_read_input_tokens":100,"output_tokens":1}}}',
                b'{"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":'
                b'{"input_tokens":12,"cache_read_input_tokens":100,"output_tokens":30}}',
            ],
            ((112, 30),),
        ),
        # Several message_delta events: each cumulative; a repeat is not re-emitted.
        (
            [
                b'{"type":"message_start","message":{"usage":{"input_tokens":5,"output_tokens":1}}}',
                b'{"type":"message_delta","delta":{},"usage":{"output_tokens":4}}',
                b'{"type":"message_delta","delta":{},"usage":{"output_tokens":4}}',
                b'{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":9}}',
            ],
            ((5, 4), (5, 9)),
        ),
        # No message_start usage at all: no billable figure.
        ([b'{"type":"message_delta","delta":{},"usage":{"output_tokens":4}}'], ()),
    ],
)
def test_anthropic_usage_is_cumulative(events: list[bytes], usages: tuple[object, ...]) -> None:
    stream = b"".join(b"data: " + e + b"\n\n" for e in events)
    assert feed("anthropic_messages", [stream]).usages == usages


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("something_new", "stop"),
    ],
)
def test_anthropic_finish_reasons(stop_reason: str, finish: str) -> None:
    event = (
        b'data: {"type":"message_delta","delta":{"stop_reason":"%s"}}\n\n' % stop_reason.encode()
    )
    assert feed("anthropic_messages", [event]).finishes == (finish,)


@pytest.mark.parametrize(
    ("doc", "text", "finishes", "usages", "done"),
    [
        ('{"candidates":[{"content":{"parts":[{"text":"a"}]},"finishReason":"MAX_TOKENS"}],'
         '"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":2,"thoughtsTokenCount":5}}',
         "a", ("length",), ((3, 7),), True),
        ('{"candidates":[{"content":{"parts":[{"text":"x"}]},"finishReason":"SAFETY"}]}',
         "x", ("content_filter",), (), True),
        ('{"candidates":[{"finishReason":"RECITATION"}]}', "", ("content_filter",), (), True),
        ('{"promptFeedback":{"blockReason":"SAFETY"},"usageMetadata":{"promptTokenCount":4}}',
         "", ("content_filter",), ((4, 0),), True),
        ('{"candidates":[{"content":{"parts":[{"text":"t","thought":true},{"text":"v"}]}}]}',
         "v", (), (), False),
    ],
)  # fmt: skip
def test_gemini_frames(
    doc: str, text: str, finishes: tuple[str, ...], usages: tuple[object, ...], done: bool
) -> None:
    outcome = feed("gemini", [b"data: " + doc.encode() + b"\r\n\r\n"])
    assert (outcome.text, outcome.finishes, outcome.usages, outcome.done) == (
        text,
        finishes,
        usages,
        done,
    )
