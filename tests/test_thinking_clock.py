"""A Gemini model that thinks longer than the first-token clock is answering, not
stalled (review of the money residuals, finding 3).

Gemini streams no text while it thinks, only frames whose `usageMetadata` counts the
thinking so far (`OutputSoFar`). The relay's first-token clock waited for text, a
tool call or reasoning: a single-backend stream thinking past
`LLMGW_FIRST_TOKEN_TIMEOUT_SECONDS` was cut with an `upstream_timeout` error, the
member served nothing and billed as failed while Google billed the thinking. Driven
through the control plane, the edge and the mock's Gemini API in one loop
(`tests/inproc.py`); the mock's first frames are turned into thinking-only ones, as
Gemini sends them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import pytest_asyncio
import yaml

from stream_edge.upstream.gemini import GeminiStreamParser
from tests.inproc import MOCK, Gateway, events, gateway_env, opened

on_loop = pytest.mark.asyncio(loop_scope="module")

PRICE = {"input_per_mtok": "1.0", "output_per_mtok": "2.0"}
CATALOG = {
    "default_model": "gemini-think",
    "providers": {
        "mock": {"api_type": "openai_chat", "base_url": f"{MOCK}/v1"},
        "mock-gemini": {"api_type": "gemini", "base_url": MOCK},
    },
    "models": {
        "mock-fast": {
            "provider": "mock",
            "upstream_model": "mock-fast",
            "context_length": 8192,
            "max_output_tokens": 1024,
            "features": ["streaming"],
            "price": PRICE,
        },
        "gemini-think": {
            "provider": "mock-gemini",
            "upstream_model": "mock-fast",
            "context_length": 8192,
            "max_output_tokens": 1024,
            "features": ["streaming"],
            "price": PRICE,
        },
    },
}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    tmp = tmp_path_factory.mktemp("thinking-clock")
    models = Path(tmp) / "models.yaml"
    models.write_text(yaml.safe_dump(CATALOG))
    # A short first-token clock: the model below thinks for far longer than this.
    env = gateway_env(
        str(tmp), LLMGW_FIRST_TOKEN_TIMEOUT_SECONDS="0.3", LLMGW_MODELS_FILE=str(models)
    )
    async with Gateway(env) as gateway:
        yield gateway


THINKING_READS = 30
THOUGHTS_PER_READ = 25


def thinking_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mock's first `THINKING_READS` frames of each stream replaced by what Gemini
    sends while it thinks: no candidates, a growing `thoughtsTokenCount`."""
    feed = GeminiStreamParser.feed
    reads: dict[int, int] = {}

    def thinking(self: GeminiStreamParser, chunk: bytes) -> object:
        reads[id(self)] = reads.get(id(self), 0) + 1
        if reads[id(self)] <= THINKING_READS:
            meta = {
                "promptTokenCount": 12,
                "thoughtsTokenCount": reads[id(self)] * THOUGHTS_PER_READ,
            }
            chunk = b"data: " + orjson.dumps({"usageMetadata": meta}) + b"\r\n\r\n"
        return feed(self, chunk)

    monkeypatch.setattr(GeminiStreamParser, "feed", thinking)


@on_loop
async def test_a_gemini_model_thinking_past_the_first_token_clock_is_not_cut_off(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    thinking_first(monkeypatch)
    access = await gw.new_user()
    # 40 frames 50 ms apart: the first 30 (1.5 s of thinking) outlast the 0.3 s clock;
    # the mock's last frame reports the thinking (`reasoning`) with the answer.
    query = "think hard [[mock tokens=40 delay_ms=50 reasoning=750]]"
    grant = await gw.init_ok(access, {"query": query, "model": "gemini-think"})
    async with opened(await gw.get(grant["stream_url"])) as response:
        assert response.status_code == 200
        got = await events(response)
    assert [e.event for e in got if e.event != "chunk"] == ["complete"], got[-1].data
    assert len([e for e in got if e.event == "chunk"]) == 40 - THINKING_READS
    record = await gw.wait_usage(access, grant["reservation_id"])
    # Google's own count: the answer's 40 tokens and the 750 of thinking.
    assert (record["status"], record["usage_source"]) == ("completed", "upstream")
    assert (record["output_tokens"], record["reasoning_tokens"]) == (40 + 750, 750)
