"""Reasoning an OpenAI-compatible backend streams (DeepSeek's and vLLM's
`delta.reasoning_content`, OpenRouter's `delta.reasoning`) is output the vendor bills,
and the edge forwards it to the client as it came (the passthrough writer). Before
the fix the meter counted only `content` deltas: a member who read the reasoning
(often the answer itself) and left before the final usage chunk was billed for the
answer's few content tokens only, the reasoning free (review 6). Fed through the
objects the relay uses on every stream: the vendor's parser, the meter, the writer."""

from __future__ import annotations

import orjson
import pytest

from stream_edge.formats import OpenAIChunkWriter
from stream_edge.meter import Meter
from stream_edge.upstream.openai_chat import OpenAIStreamParser


def _frame(delta: dict[str, str]) -> bytes:
    return b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": delta}]}) + b"\n\n"


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_the_client_read_is_billed_when_it_leaves_before_the_usage(field: str) -> None:
    parser, meter = OpenAIStreamParser(), Meter(10, keep_transcript=True)
    writer = OpenAIChunkWriter("r1", include_usage=False, passthrough=True)
    reads = [_frame({field: f" step {i}"}) for i in range(300)] + [_frame({"content": "42"})]
    sent = b""
    for read in reads:  # the client leaves here: no finish, no usage chunk
        for event in parser.feed(read):
            meter.record(event)
            sent += writer.write(event)
    assert sent.count(f'"{field}"'.encode()) == 300  # the client got every step
    billing = meter.billing()
    # " step 7" is three tokens (OpenAI cuts the space before a digit off the word and
    # streams each token on its own): three a step, one more for the 200 steps of
    # three digits (`pieces` counts k digits as 1 + k // 3, never below the vendors'
    # groups of 3), and the answer's one.
    assert (billing.source, billing.output_tokens) == ("estimated", 3 * 300 + 200 + 1)
    assert meter.content == "42"  # the transcript keeps the answer only


def test_a_reasoning_field_that_is_no_string_counts_nothing() -> None:
    parser, meter = OpenAIStreamParser(), Meter(10, keep_transcript=False)
    for event in parser.feed(_frame({"reasoning": None}) + _frame({"reasoning_content": ""})):  # type: ignore[dict-item]
        meter.record(event)
    assert meter.billing().output_tokens == 0


def test_a_backend_batching_tokens_per_delta_is_billed_for_them_when_the_usage_never_comes() -> (
    None
):
    """OpenRouter and vLLM (its stream interval) may send several tokens in one
    OpenAI-compatible delta: counted one a delta, a member reading ten 176-byte
    deltas (~40 tokens each) and leaving before the usage chunk paid for 10 tokens."""
    parser, meter = OpenAIStreamParser(), Meter(10, keep_transcript=False)
    batch = "The quick brown fox jumps over the lazy dog. " * 4  # 180 bytes
    call = {"index": 0, "id": "c", "function": {"name": "f", "arguments": batch}}
    calls = {"tool_calls": [call]}
    for delta in [{"content": batch}] * 10 + [{"reasoning": batch}, calls]:
        for event in parser.feed(_frame(delta)):  # type: ignore[arg-type]
            meter.record(event)
    # Past a token's length a delta is a batch: a token per 3 bytes (the input
    # estimate's bound, `stream_edge.output_estimate`).
    assert meter.billing().output_tokens == 12 * 60
    # One token a delta stays one token: a word, a long word, a run of spaces.
    meter = Meter(10, keep_transcript=False)
    for word in (" the", " international", " " * 16):
        for event in parser.feed(_frame({"content": word})):
            meter.record(event)
    assert meter.billing().output_tokens == 3
