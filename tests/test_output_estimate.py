"""The output a stream is billed when the backend's usage never comes is an upper
bound even for text that defeats the merges (review of the money residuals, finding 1).

OpenAI-compatible deltas of up to 16 characters counted one token, longer ones a token
per 4 bytes, other vendors' a token per 4 bytes; ``"1,2,3,4,5,6,7,8,"`` costs a vendor
16 tokens (a token per byte: the tokenizers cut digits and punctuation apart before
merging). A member prompting a batching backend (OpenRouter, vLLM's stream interval)
for such text and leaving before the usage chunk paid a sixteenth of it. The same
held for Chinese, Japanese or Korean text: a run of CJK characters is one piece
however long, and about a token a character (review: CJK estimate). The attacks
run through the control plane and the edge against a batching backend
(`tests/inproc.py`); the rules are pinned on the meter below them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from stream_edge.meter import Meter
from stream_edge.output_estimate import one_piece
from stream_edge.upstream.base import Delta
from tests.inproc import MOCK, Gateway, gateway_env, opened

on_loop = pytest.mark.asyncio(loop_scope="module")

BATCHER = "http://batcher.test"
ADVERSARIAL = "1,2,3,4,5,6,7,8,"  # 16 tokens at every vendor, 16 characters
CJK_BATCHER = "http://cjk-batcher.test"
# One piece of 15 Han characters: 10 tokens at o200k, 15 at cl100k (counted with the
# vendors' published ranks); billed a token a character, the input estimate's rate.
CJK = "人工智能是计算机科学的一个分支"
SENT = 10  # deltas the batching backend sends before it stalls

PRICE = {"input_per_mtok": "1.0", "output_per_mtok": "2.0"}
CATALOG = {
    "default_model": "mock-fast",
    "providers": {
        "mock": {"api_type": "openai_chat", "base_url": f"{MOCK}/v1"},
        "batcher": {"api_type": "openai_chat", "base_url": f"{BATCHER}/v1"},
        "cjk_batcher": {"api_type": "openai_chat", "base_url": f"{CJK_BATCHER}/v1"},
    },
    "models": {
        name: {
            "provider": provider,
            "upstream_model": "mock-fast",
            "context_length": 8192,
            "max_output_tokens": 1024,
            "features": ["streaming"],
            "price": PRICE,
        }
        for name, provider in (
            ("mock-fast", "mock"),
            ("batched", "batcher"),
            ("batched-cjk", "cjk_batcher"),
        )
    },
}


def batching_backend(text: str) -> Starlette:
    """An OpenAI-compatible backend that batches several tokens (`text`) per delta,
    then goes on generating (it stalls here) while the member reads."""

    async def chat(request: Request) -> StreamingResponse:
        async def frames() -> AsyncIterator[bytes]:
            for _ in range(SENT):
                delta = {"choices": [{"index": 0, "delta": {"content": text}}]}
                yield b"data: " + orjson.dumps(delta) + b"\n\n"
            await asyncio.Event().wait()  # still generating when the member leaves

        return StreamingResponse(frames(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    tmp = tmp_path_factory.mktemp("output-estimate")
    models = Path(tmp) / "models.yaml"
    models.write_text(yaml.safe_dump(CATALOG))
    async with Gateway(gateway_env(str(tmp), LLMGW_MODELS_FILE=str(models))) as gateway:
        gateway.backends.route(BATCHER, batching_backend(ADVERSARIAL))
        gateway.backends.route(CJK_BATCHER, batching_backend(CJK))
        yield gateway


async def leave_before_usage(gw: Gateway, model: str, text: str, query: str) -> dict[str, Any]:
    """A member streams `model` until it has read `SENT` deltas of `text`, leaves
    before the usage chunk, and gets the usage record the edge settled."""
    access = await gw.new_user()
    grant = await gw.init_ok(access, {"query": query, "model": model})
    body = orjson.dumps({"stream": True, "messages": [{"role": "user", "content": query}]})
    headers = {"Authorization": f"Bearer {grant['stream_token']}"}
    read = 0
    async with opened(await gw.post("/v1/chat/completions", body, headers)) as response:
        assert response.status_code == 200
        async for chunk in response.aiter_raw():
            read += chunk.count(text.encode())
            if read == SENT:
                break  # the member has every delta and leaves before the usage chunk
    record = await gw.wait_usage(access, grant["reservation_id"])
    assert (record["status"], record["usage_source"]) == ("cancelled", "estimated")
    return record


@on_loop
async def test_a_member_leaving_a_batched_stream_of_adversarial_text_pays_its_tokens(
    gw: Gateway,
) -> None:
    record = await leave_before_usage(
        gw, "batched", ADVERSARIAL, "count to eight, with commas, over and over"
    )
    # Before: 10 (a token a delta), a sixteenth of what the vendor bills.
    assert record["output_tokens"] == SENT * 16


@on_loop
async def test_a_member_leaving_a_batched_stream_of_chinese_pays_a_token_per_character(
    gw: Gateway,
) -> None:
    """A delta of 15 Han characters is one piece: before, it counted one token plus
    one per 24 bytes (2), against 10 at o200k and 15 at cl100k."""
    record = await leave_before_usage(gw, "batched-cjk", CJK, "用中文介绍人工智能，不要标点")  # noqa: RUF001
    # Before: 20, a fifth of o200k's 100 and a seventh and a half of cl100k's 150.
    assert record["output_tokens"] == SENT * len(CJK)


# --- the rules, on the meter -----------------------------------------------------------

# (delta, as an OpenAI-compatible delta: the most tokens it can be)
OPENAI_DELTAS = [
    (" the", 1),  # a token per delta, as OpenAI streams
    ("The", 1),
    (" NASA", 1),
    (" international", 1),  # a long word is one delta
    (".", 1),
    ("\n", 1),
    (" " * 16, 1),  # an indentation
    ("\n\n", 1),  # a paragraph break
    ("", 1),
    ("1,2,3,4,5,6,7,8,", 16),  # a batch that defeats the merges
    ("a1a1a1a1a1a1a1a1", 16),
    (" lorem.", 2),  # a word and its period: two tokens, never one delta from OpenAI
    ("café", 1),  # accented Latin: one piece, one token
    ("你", 1),  # CJK: OpenAI's tokens hold up to 3 characters in practice
    ("我们", 1),
    ("机器人", 1),
    (" 습니다", 1),
    ("你好世界", 4),  # more is a batch: a token per character (3 bytes)
    ("人工智能是计算机科学的一个分支", 15),
    ("ありがとうございました", 11),  # the bound's price: one o200k token (rare in text)
    ("fooBar", 2),
    ("The quick brown fox jumps over the lazy dog. ", 15),  # past 16 chars: 3 bytes a token
    ("1," * 40, 83),  # and a piece a token, + 1 per 24 bytes
]


@pytest.mark.parametrize(("text", "tokens"), OPENAI_DELTAS)
def test_an_openai_compatible_delta_counts_one_token_or_all_it_can_hold(
    text: str, tokens: int
) -> None:
    meter = Meter(0, keep_transcript=False)
    meter.record(Delta(text))
    assert meter.billing().output_tokens == tokens


# o200k's tokens of running text, one delta each as OpenAI streams them (counted with
# its published ranks; a character split over two tokens comes whole in the second).
HONEST_STREAMS = [
    "人工 智能 是 计算 机 科学 的 一个 分 支 ，它 企 图 了解 智能 的 实 质 。 "  # noqa: RUF001
    "今天 北京 的 天气 很好 ，我们",  # noqa: RUF001
    "今日は と ても 良 い 天 気 なので 、公 園 に 散 歩 に 行 き ま しょう 。",
    "오늘 은 |날 씨 가 |정말 |좋아 서 |친구 들과 |함께 |공 원 에 |산 책 을 | 갔 습니다 .",
    "Le |café |était |délicieux |et |très |léger ; |nous |sommes |all és |à |la |plage |près |de .",
]


@pytest.mark.parametrize("stream", HONEST_STREAMS)
def test_an_honest_one_token_per_delta_stream_of_cjk_or_accents_is_billed_its_deltas(
    stream: str,
) -> None:
    """The rule for CJK batches costs OpenAI's own streams nothing on running text:
    a delta of up to 3 CJK characters (and any accented word) is still one token.
    (An apostrophe that leads a word, ``'hôtel``, was two before and still is.)"""
    deltas = [d.replace("|", " ") for d in stream.split(" ")]
    meter = Meter(0, keep_transcript=False)
    for text in deltas:
        meter.record(Delta(text))
    assert meter.billing().output_tokens == len(deltas)


@pytest.mark.parametrize(
    ("deltas", "tokens"),
    [
        (["1,2,3,4,5,6,7,8,"] * 10, 160 + 6),  # a piece a token, + 1 per 24 bytes: before, 40
        (["Hello, how are you today?"] * 4, 34),  # 100 bytes: a token per 3
        ([" the"], 2),
        (["é"], 1),
    ],
)
def test_a_batching_vendors_deltas_count_the_input_estimates_bound(
    deltas: list[str], tokens: int
) -> None:
    """Anthropic, Gemini and in-house SSE backends: the larger of a token per 3 bytes
    and a token per piece plus one per 24 bytes, over all they sent."""
    meter = Meter(0, keep_transcript=False, delta_is_token=False)
    for text in deltas:
        meter.record(Delta(text))
    assert meter.billing().output_tokens == tokens


@pytest.mark.parametrize(
    "text",
    [
        "the",
        " the",
        " The",
        " NASA",
        "x",
        ".",
        " ",
        "\n",
        "'",
        "é",
        "fooBar",
        " lorem.",
        "ª",
        "  x",
        "1,",
        " 1",
        "\n\n",
        "   ",
    ],
)
def test_the_cheap_one_piece_check_never_says_one_where_the_pieces_are_more(
    text: str,
) -> None:
    """`one_piece` skips `pieces` for the common delta: it may say one only where the
    split patterns cut one piece (runs of spaces or line breaks standing alone, which
    `pieces` counts as two, are the deliberate exception)."""
    from shared.text_tokens import pieces

    if one_piece(text) and not text.isspace():
        assert pieces(text.encode()) == 1
