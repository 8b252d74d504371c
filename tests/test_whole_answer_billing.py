"""A whole answer (`"stream": false`) that fails after the backend generated it is
billed (review of the money residuals, finding 2).

The edge read the answer, and when it was longer than 8 MiB, outlived the stream's
maximum life or could not be parsed, answered 502/504 and reported the stream
`failed` with no output: billed nothing, while the vendor bills every token. A member
could repeat it at will. Now what was read is billed as a cut stream is: the input
estimate and the output the bytes can hold (`completion.bill_unread`), `failed`,
`estimated`. Driven through the control plane and the edge against a backend that
misbehaves on request (`tests/inproc.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import pytest_asyncio
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from shared.text_tokens import text_tokens
from tests.inproc import MOCK, Gateway, gateway_env

on_loop = pytest.mark.asyncio(loop_scope="module")

BACKEND = "http://generates.test"
MAX_TOKENS = 60_000
PRICE = {"input_per_mtok": "1.0", "output_per_mtok": "2.0"}
CATALOG = {
    "default_model": "mock-fast",
    "providers": {
        "mock": {"api_type": "openai_chat", "base_url": f"{MOCK}/v1"},
        "generates": {"api_type": "openai_chat", "base_url": f"{BACKEND}/v1"},
    },
    "models": {
        name: {
            "provider": provider,
            "upstream_model": "mock-fast",
            "context_length": 131_072,
            "max_output_tokens": MAX_TOKENS,
            "features": ["streaming"],
            "price": PRICE,
        }
        for name, provider in (("mock-fast", "mock"), ("whole", "generates"))
    },
}

TEXT = "1,2,3,4,5,6,7,8," * 1024  # 16 KiB, a token per byte at every vendor
HEAD = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":'
# A well-formed JSON answer whose `content` is no string.
MALFORMED = HEAD + orjson.dumps({"role": "assistant", "content": {"text": TEXT}}) + b"}]}"
# The start of an answer whose end never comes.
STARTED = HEAD + b'{"role":"assistant","content":"' + TEXT.encode()


def generating_backend() -> Starlette:
    """An OpenAI-compatible backend whose whole answers fail as the prompt asks."""

    async def chat(request: Request) -> Response:
        prompt = orjson.loads(await request.body())["messages"][-1]["content"]
        if prompt == "malformed":
            return Response(MALFORMED, media_type="application/json")
        if prompt == "huge":  # over the 8 MiB the edge reads

            async def huge() -> AsyncIterator[bytes]:
                yield HEAD + b'{"role":"assistant","content":"'
                for _ in range(9 * 64):
                    yield TEXT.encode()

            return StreamingResponse(huge(), media_type="application/json")

        async def stalls() -> AsyncIterator[bytes]:
            yield STARTED
            await asyncio.Event().wait()  # still writing when the stream's life ends

        return StreamingResponse(stalls(), media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    tmp = tmp_path_factory.mktemp("whole-answer")
    models = Path(tmp) / "models.yaml"
    models.write_text(yaml.safe_dump(CATALOG))
    async with Gateway(gateway_env(str(tmp), LLMGW_MODELS_FILE=str(models))) as gateway:
        gateway.backends.route(BACKEND, generating_backend())
        yield gateway


@on_loop
@pytest.mark.parametrize(
    ("prompt", "status", "code", "output"),
    [
        ("malformed", 502, "upstream_error", text_tokens((MALFORMED,))),
        ("huge", 502, "upstream_error", MAX_TOKENS),  # never past what was asked for
        ("stalls", 504, "upstream_timeout", text_tokens((STARTED,))),
    ],
)
async def test_a_whole_answer_that_fails_after_it_was_generated_is_billed(
    gw: Gateway,
    monkeypatch: pytest.MonkeyPatch,
    prompt: str,
    status: int,
    code: str,
    output: int,
) -> None:
    if prompt == "stalls":  # the stream's maximum life (10 s at least), cut short
        monkeypatch.setattr("stream_edge.jobs.remaining_life", lambda settings, accepted: 0.5)
    access = await gw.new_user()
    grant = await gw.init_ok(access, {"query": prompt, "model": "whole"})
    body = {"stream": False, "messages": [{"role": "user", "content": prompt}]}
    answered, answer = await gw.complete(grant["stream_token"], body)
    assert answered == status
    assert answer["error"]["code"] == code
    record = await gw.wait_usage(access, grant["reservation_id"])
    assert (record["status"], record["usage_source"]) == ("failed", "estimated")
    # Before: 0 output, nothing charged.
    assert record["output_tokens"] == output
    assert record["cost"] != "0.000000"
