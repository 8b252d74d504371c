"""What `completion.bill_unread` costs the event loop (pure, no servers needed).

A whole answer that fails after the backend generated it is billed from the bytes
read (tests/test_whole_answer_billing.py drives that through the services). Those
bytes were also fed to a stream parser, for the in-house SSE backend whose answer is
its stream; a JSON document (every other vendor's answer) holds no event, and the
parser's pass over 8 MiB of a pretty-printed one held the event loop 0.44 s
(measured), a stall for every stream on the edge each time such a backend failed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from shared.text_tokens import text_tokens
from stream_edge.completion import MAX_COMPLETION_BYTES, bill_unread, read_completion
from stream_edge.errors import UpstreamError
from stream_edge.meter import Meter
from stream_edge.upstream.openai_chat import OpenAIChatAdapter
from stream_edge.upstream.sse_backend import SSEBackendAdapter


class CountedParsers(SSEBackendAdapter):
    """The in-house SSE backend's adapter, counting the stream parsers it makes."""

    made = 0

    def stream_parser(self) -> Any:
        self.made += 1
        return super().stream_parser()


class WholeBody:
    """A backend's whole answer as `read_completion` reads it, in one chunk."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        yield self._body

    async def aclose(self) -> None:
        return None


class DocumentOnly(OpenAIChatAdapter):
    """A JSON vendor whose answers must never go through a stream parser."""

    def stream_parser(self) -> Any:
        raise AssertionError("a JSON document was fed to a stream parser")


def backend(adapter: Any, max_tokens: int) -> Any:
    return SimpleNamespace(
        adapter=adapter,
        meter=Meter(input_estimate=10, keep_transcript=False),
        credentials=(),
        attempt=SimpleNamespace(max_tokens=max_tokens),
    )


# Pretty-printed, cut off: one short line after another, the parser's worst case.
PRETTY = b'{\n  "choices": [\n' + b'    {"content": "1,2,3"},\n' * 20_000


@pytest.mark.parametrize("lead", [b"", b"\n  \r\n"])
def test_a_cut_json_document_is_billed_by_its_bytes_without_a_stream_parse(lead: bytes) -> None:
    raw = lead + PRETTY
    cut = backend(DocumentOnly(), max_tokens=10**9)
    bill_unread(cut, raw)
    assert cut.meter.relayed_tokens == text_tokens((raw,))
    # Past `max_tokens` by its bytes alone: that cap, however large the body.
    huge = (b"[" + b'  "x",\n' * (MAX_COMPLETION_BYTES // 7))[:MAX_COMPLETION_BYTES]
    capped = backend(DocumentOnly(), max_tokens=4096)
    bill_unread(capped, huge)
    assert capped.meter.relayed_tokens == 4096


def test_an_sse_backends_answer_is_still_counted_event_by_event() -> None:
    events = b"".join(b"data: " + orjson.dumps({"delta": "word "}) + b"\n\n" for _ in range(50))
    cut = backend(SSEBackendAdapter(), max_tokens=10**9)
    bill_unread(cut, events + b"data: {broken")
    assert cut.meter.deltas == 50


@pytest.mark.parametrize("end", [b"data: {broken", b""], ids=["malformed", "ended_early"])
async def test_a_failed_sse_answer_is_parsed_once_for_its_error_and_its_bill(end: bytes) -> None:
    # Parsed again to bill it, an 8 MiB answer held the event loop twice as long.
    events = b"".join(b"data: " + orjson.dumps({"delta": "word "}) + b"\n\n" for _ in range(50))
    adapter = CountedParsers()
    cut = backend(adapter, max_tokens=10**9)
    with pytest.raises(UpstreamError, match="malformed"):
        await read_completion(WholeBody(events + end), cut)
    assert adapter.made == 1
    assert cut.meter.deltas == 50
