"""Billing per vendor wire format (review 7): what the edge reads of each vendor's
stream decides what a member pays, and a misreading is money.

- Reasoning an OpenAI-compatible backend streams (DeepSeek's `reasoning_content`) is
  the backend answering: a model that thinks longer than
  `LLMGW_FIRST_TOKEN_TIMEOUT_SECONDS` was cut as "no first token" while the client
  read its reasoning, and with a fallback left the chain moved on, the reasoning
  paid to the vendor and billed to no one.
- Anthropic's `message_delta` repeats the cumulative usage, leaving out the counts
  that do not apply (the official client keeps `message_start`'s then): with its
  `input_tokens` but no cache counts, the cache reads and writes of `message_start`
  were dropped from the bill.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import orjson
import pytest
import pytest_asyncio

from control_plane.usage_events import parse_usage_event
from shared.webhooks import MAX_TOKENS_REPORTED, UsageEvent
from stream_edge.fallback import await_first_token
from stream_edge.meter import Meter
from stream_edge.upstream.anthropic_messages import AnthropicStreamParser
from stream_edge.upstream.base import Usage
from stream_edge.upstream.openai_chat import OpenAIStreamParser
from tests.inproc import Gateway, events, gateway_env, opened

# --- reasoning is the backend answering ------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    tmp = tmp_path_factory.mktemp("vendor-billing")
    # A short first-token clock: the mock below reasons for far longer than this.
    env = gateway_env(str(tmp), LLMGW_FIRST_TOKEN_TIMEOUT_SECONDS="0.3")
    async with Gateway(env) as gateway:
        yield gateway


REASONING_READS = 30


def reasoning_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mock's first `REASONING_READS` reads of each stream turned into DeepSeek's
    reasoning deltas, as a reasoning model streams before its answer."""
    feed = OpenAIStreamParser.feed
    reads: dict[int, int] = {}

    def thinking(self: OpenAIStreamParser, chunk: bytes) -> object:
        reads[id(self)] = reads.get(id(self), 0) + 1
        if reads[id(self)] <= REASONING_READS:
            chunk = chunk.replace(b'"content":"', b'"reasoning_content":"')
        return feed(self, chunk)

    monkeypatch.setattr(OpenAIStreamParser, "feed", thinking)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_model_reasoning_past_the_first_token_clock_is_not_cut_off(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    reasoning_first(monkeypatch)
    access = await gw.new_user()
    # 40 tokens 50 ms apart: the first 30 (1.5 s of reasoning) outlast the 0.3 s clock.
    query = "think hard [[mock tokens=40 delay_ms=50]]"
    grant = await gw.init_ok(access, {"query": query})
    body = orjson.dumps({"stream": True, "messages": [{"role": "user", "content": query}]})
    headers = {"Authorization": f"Bearer {grant['stream_token']}"}
    async with opened(await gw.post("/v1/chat/completions", body, headers)) as response:
        assert response.status_code == 200
        got = await events(response)
    datas = [orjson.loads(e.data) for e in got if e.data.startswith("{")]
    assert not [d for d in datas if "error" in d], datas[-1]
    reasoning = [
        d for d in datas if d["choices"] and "reasoning_content" in d["choices"][0]["delta"]
    ]
    assert len(reasoning) >= REASONING_READS - 2  # the client read the reasoning
    assert got[-1].data == "[DONE]"
    record = await gw.wait_usage(access, grant["reservation_id"])
    assert (record["status"], record["output_tokens"]) == ("completed", 40)


class _Chunks:
    """A backend's answer whose chunks come from a queue (None ends it)."""

    status_code = 200

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed = False

    def aiter_raw(self) -> AsyncIterator[bytes]:
        return self._read()

    async def _read(self) -> AsyncIterator[bytes]:
        while (chunk := await self.queue.get()) is not None:
            yield chunk

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.asyncio(loop_scope="module")
async def test_a_reasoning_backend_is_committed_to_not_abandoned_for_its_fallback() -> None:
    """With a fallback left, the first reasoning delta commits the stream to its
    backend: abandoning it at the first-token clock made the platform pay the vendor
    for the reasoning while the member was billed at the fallback only."""
    answer = _Chunks()
    frame = {"choices": [{"index": 0, "delta": {"reasoning_content": "Let me see"}}]}
    answer.queue.put_nowait(b"data: " + orjson.dumps(frame) + b"\n\n")
    # No answer text ever comes within the (generous) clock: only reasoning.
    prefetched = await await_first_token(answer, OpenAIStreamParser(), timeout=10)  # type: ignore[arg-type]
    assert not answer.closed
    assert b"reasoning_content" in await prefetched.__anext__()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_thinking_gemini_backend_is_committed_to_not_abandoned_for_its_fallback() -> None:
    """Gemini's running count of its thinking (`OutputSoFar`) is output it bills, like
    a reasoning delta: with a fallback left, the edge waited for text or a call only,
    so a model thinking past the first-token clock was closed and the fallback served,
    the thinking paid to Google and billed to no one (the fallback's meter is fresh)."""
    from stream_edge.errors import UpstreamError
    from stream_edge.upstream.gemini import GeminiStreamParser

    answer = _Chunks()
    doc = {"usageMetadata": {"promptTokenCount": 10, "thoughtsTokenCount": 900}}
    answer.queue.put_nowait(b"data: " + orjson.dumps(doc) + b"\r\n\r\n")
    try:
        # No text ever comes within the clock: only the thinking's running count.
        prefetched = await await_first_token(answer, GeminiStreamParser(), timeout=2)  # type: ignore[arg-type]
    except UpstreamError as exc:
        pytest.fail(f"the thinking backend was abandoned: {exc}")
    assert not answer.closed
    assert b"thoughtsTokenCount" in await prefetched.__anext__()


# --- Anthropic's repeated usage --------------------------------------------------------


def _anthropic(events_: list[dict[str, object]]) -> bytes:
    return b"".join(
        b"event: " + str(e["type"]).encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n"
        for e in events_
    )


def test_anthropic_cache_counts_survive_a_message_delta_that_leaves_them_out() -> None:
    start_usage = {
        "input_tokens": 10,
        "cache_read_input_tokens": 50_000,
        "cache_creation_input_tokens": 2_000,
        "output_tokens": 1,
    }
    stream = _anthropic(
        [
            {"type": "message_start", "message": {"usage": start_usage}},
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "hi"},
            },
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"input_tokens": 10, "output_tokens": 100},
            },
            {"type": "message_stop"},
        ]
    )
    meter = Meter(10, keep_transcript=False, delta_is_token=False)
    for event in AnthropicStreamParser().feed(stream):
        meter.record(event)
    billing = meter.billing()
    assert (billing.source, billing.input_tokens, billing.output_tokens) == (
        "upstream",
        52_010,
        100,
    )
    assert (billing.cached_input_tokens, billing.cache_write_tokens) == (50_000, 2_000)


# --- OpenAI-compatible reasoning beside the answer ------------------------------------


def test_reasoning_sharing_a_delta_with_the_answer_is_billed_too() -> None:
    """vLLM's reasoning parser (and a batching stream interval) can put the end of
    the reasoning and the start of the answer in one delta; the client reads both."""
    thought = "so the answer must be the product of six and seven"  # 51 bytes
    frame = {"choices": [{"index": 0, "delta": {"reasoning_content": thought, "content": "42"}}]}
    meter = Meter(10, keep_transcript=True)
    for event in OpenAIStreamParser().feed(b"data: " + orjson.dumps(frame) + b"\n\n"):
        meter.record(event)
    billing = meter.billing()
    # The answer's token, and the reasoning's 17 (past a token's length a delta is a
    # batch: a token per 3 bytes, `stream_edge.output_estimate`).
    assert (billing.source, billing.output_tokens) == ("estimated", 1 + 17)
    assert meter.content == "42"


@pytest.mark.parametrize(
    ("usage", "billed"),
    [
        # OpenAI: the reasoning inside `completion_tokens`, the total prompt + completion.
        ({"completion_tokens": 30, "total_tokens": 40, "reasoning_tokens": 20}, (30, 20)),
        # xAI's Grok: the reasoning beside it, in the total.
        ({"completion_tokens": 10, "total_tokens": 40, "reasoning_tokens": 20}, (30, 20)),
        ({"completion_tokens": 30, "total_tokens": 60, "reasoning_tokens": 20}, (50, 20)),
        # Gemini's OpenAI-compatible endpoint: its thinking in the total alone.
        ({"completion_tokens": 10, "total_tokens": 40}, (30, 0)),
        # Kimi: one reasoning token more than the completion it is inside of.
        ({"completion_tokens": 7, "total_tokens": 17, "reasoning_tokens": 8}, (7, 7)),
        # No total (or a total below the parts, or not a count): the completion.
        ({"completion_tokens": 30, "reasoning_tokens": 20}, (30, 20)),
        ({"completion_tokens": 30, "total_tokens": 5}, (30, 0)),
        ({"completion_tokens": 30, "total_tokens": "999"}, (30, 0)),
        ({"completion_tokens": 30, "total_tokens": True}, (30, 0)),
    ],
)
def test_reasoning_counted_beside_the_completion_is_billed(
    usage: dict[str, int], billed: tuple[int, int]
) -> None:
    """Some OpenAI-compatible vendors count reasoning beside `completion_tokens`
    (xAI) or only in `total_tokens` (Gemini's compatible endpoint) and bill it as
    output: read as OpenAI's, it was dropped."""
    reasoning = usage.pop("reasoning_tokens", None)
    doc: dict[str, object] = {"prompt_tokens": 10, **usage}
    if reasoning is not None:
        doc["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    frame = b"data: " + orjson.dumps({"choices": [], "usage": doc}) + b"\n\n"
    (counted,) = [e for e in OpenAIStreamParser().feed(frame) if isinstance(e, Usage)]
    assert (counted.output_tokens, counted.reasoning_tokens) == billed
    assert counted.input_tokens == 10


# --- an in-house SSE backend's counts ----------------------------------------------------


def test_an_in_house_backends_negative_count_is_clamped_like_every_vendors() -> None:
    """A negative count reached the usage report as is, which the control plane
    refuses (422): the report went to the dead letters instead of settling."""
    from stream_edge.upstream.sse_backend import SSEBackendAdapter

    frame = {"usage": {"input": 12, "output": -3}, "finish": "stop"}
    parser = SSEBackendAdapter().stream_parser()
    usages = [
        e for e in parser.feed(b"data: " + orjson.dumps(frame) + b"\n\n") if isinstance(e, Usage)
    ]
    assert [u.counts() for u in usages] == [(12, 0, 0, 0, 0)]


def test_a_backends_count_past_any_context_is_clamped_so_its_report_still_settles() -> None:
    """A backend reporting 10**12 tokens: the control plane refuses a count past 10**9
    (422), so the report went to the dead letters and the stream stayed unsettled
    until its hold's end. Clamped at the edge, the report is taken (and the charge,
    as always, capped at the hold)."""
    usage = {"prompt_tokens": 10**12, "completion_tokens": 10**12, "total_tokens": 2 * 10**12}
    frame = {"choices": [], "usage": usage}
    parser = OpenAIStreamParser()
    (counted,) = [
        e for e in parser.feed(b"data: " + orjson.dumps(frame) + b"\n\n") if isinstance(e, Usage)
    ]
    assert (counted.input_tokens, counted.output_tokens) == (MAX_TOKENS_REPORTED,) * 2
    now = datetime.now(UTC).isoformat()
    event = UsageEvent(
        jti="j", reservation_id="r", company_id="c", user_id="u", session_id=None,
        request_id="q", model="mock-fast", provider="mock", status="completed",
        finish_reason="stop", input_tokens=counted.input_tokens,
        output_tokens=counted.output_tokens, usage_source="upstream", started_at=now,
        first_token_at=None, ended_at=now, content=None,
    )  # fmt: skip
    parsed = parse_usage_event(orjson.loads(event.body()))
    assert parsed.output_tokens == MAX_TOKENS_REPORTED


def test_gemini_thinking_is_billed_when_the_client_leaves_before_the_usage() -> None:
    """Gemini thinks before it writes (2.5: by default), and bills the thinking as
    output; its running `usageMetadata` came on every frame but counted only from the
    finishing one: a member who left while the model thought paid for no output.
    The running count is the estimate's floor."""
    from stream_edge.upstream.gemini import GeminiStreamParser

    def frame(thoughts: int, text: str | None = None) -> bytes:
        doc: dict[str, object] = {
            "usageMetadata": {"promptTokenCount": 10, "thoughtsTokenCount": thoughts}
        }
        if text is not None:
            doc["candidates"] = [{"content": {"parts": [{"text": text}], "role": "model"}}]
        return b"data: " + orjson.dumps(doc) + b"\r\n\r\n"

    parser, meter = GeminiStreamParser(), Meter(10, keep_transcript=True)
    for read in (frame(200), frame(900), frame(900, "Hi")):  # the client leaves here
        for event in parser.feed(read):
            meter.record(event)
    billing = meter.billing()
    assert (billing.source, billing.output_tokens) == ("estimated", 900)
    assert meter.content == "Hi"
