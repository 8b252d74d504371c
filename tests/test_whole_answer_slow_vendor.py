"""A whole answer (`"stream": false`) from a vendor that takes longer to generate it
than the edge waits for its headers (agent-features review, finding 1).

A JSON vendor sends a whole answer's headers only once the answer is generated, and
bills what it generated whether or not the caller was still waiting (OpenAI and
Anthropic bill a non-streamed request the client stopped waiting for). The edge
waited `LLMGW_UPSTREAM_READ_TIMEOUT` (120 s by default) for those headers, then gave
up: a failure "before the first byte", so the chain moved to its fallback (which
generated the answer again) and the stream was reported `failed` with nothing read,
billed nothing. A member asking a large `max_tokens` of a slow model got every
such answer for free, and the platform paid each model of the chain for it.

Driven through the control plane and the edge (`tests/inproc.py`) against
OpenAI-compatible backends that generate at a fixed pace: streamed answers token by
token (stopping when the caller hangs up, as vendors do), whole answers once all is
generated, generating on after the caller left.
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

from stream_edge.upstream.anthropic_messages import AnthropicStreamParser
from stream_edge.upstream.stream_answer import StreamAnswer
from tests.inproc import MOCK, Gateway, gateway_env

on_loop = pytest.mark.asyncio(loop_scope="module")

FIRST, SECOND = "http://slow-one.test", "http://slow-two.test"
TOKENS = 12
PACE = 0.1  # seconds a token: 12 tokens take 1.2 s, past the edge's 1 s read timeout
PRICE = {"input_per_mtok": "1.0", "output_per_mtok": "1000.0"}
CATALOG = {
    "default_model": "mock-fast",
    "providers": {
        "mock": {"api_type": "openai_chat", "base_url": f"{MOCK}/v1"},
        "one": {"api_type": "openai_chat", "base_url": f"{FIRST}/v1"},
        "two": {"api_type": "openai_chat", "base_url": f"{SECOND}/v1"},
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
        "slow": {
            "provider": "one",
            "upstream_model": "slow",
            "context_length": 8192,
            "max_output_tokens": 1024,
            "features": ["streaming"],
            "price": PRICE,
            "fallbacks": ["slow-2"],
        },
        "slow-2": {
            "provider": "two",
            "upstream_model": "slow",
            "context_length": 8192,
            "max_output_tokens": 1024,
            "features": ["streaming"],
            "price": PRICE,
        },
    },
}


class Vendor:
    """An OpenAI-compatible vendor generating a token every `PACE` seconds; `billed`:
    the output tokens it generated, which it bills."""

    def __init__(self) -> None:
        self.billed = 0
        self._work: set[asyncio.Task[None]] = set()

    async def _generate(self, done: asyncio.Event) -> None:
        for _ in range(TOKENS):
            await asyncio.sleep(PACE)
            self.billed += 1
        done.set()

    def app(self) -> Starlette:
        async def chat(request: Request) -> Response:
            body = orjson.loads(await request.body())
            if body.get("stream"):

                async def tokens() -> AsyncIterator[bytes]:
                    for i in range(TOKENS):
                        await asyncio.sleep(PACE)
                        self.billed += 1  # a closed stream stops here
                        delta = {"role": "assistant", "content": f"w{i} "}
                        chunk = {"id": "c", "choices": [{"index": 0, "delta": delta}]}
                        yield b"data: " + orjson.dumps(chunk) + b"\n\n"
                    end = {"index": 0, "delta": {}, "finish_reason": "stop"}
                    yield b"data: " + orjson.dumps({"id": "c", "choices": [end]}) + b"\n\n"
                    usage = {"prompt_tokens": 10, "completion_tokens": TOKENS}
                    last = {"id": "c", "choices": [], "usage": usage}
                    yield b"data: " + orjson.dumps(last) + b"\n\ndata: [DONE]\n\n"

                return StreamingResponse(tokens(), media_type="text/event-stream")
            # A whole answer: generated apart from the connection, which the vendor
            # finishes (and bills) whether or not the caller still waits.
            done = asyncio.Event()
            task = asyncio.create_task(self._generate(done))
            self._work.add(task)
            task.add_done_callback(self._work.discard)
            await done.wait()
            answer = {
                "id": "c",
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "w " * TOKENS},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": TOKENS},
            }
            return Response(orjson.dumps(answer), media_type="application/json")

        return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])

    async def settled(self) -> None:
        """Every whole answer it started is generated (a bound, not a timing check)."""
        async with asyncio.timeout(10):
            while self._work:
                await asyncio.sleep(0.01)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    tmp = tmp_path_factory.mktemp("slow-vendor")
    models = Path(tmp) / "models.yaml"
    models.write_text(yaml.safe_dump(CATALOG))
    env = gateway_env(str(tmp), LLMGW_MODELS_FILE=str(models), LLMGW_UPSTREAM_READ_TIMEOUT="1")
    async with Gateway(env) as gateway:
        yield gateway


@on_loop
async def test_a_whole_answer_slower_than_the_read_timeout_is_served_and_billed(
    gw: Gateway,
) -> None:
    one, two = Vendor(), Vendor()
    gw.backends.route(FIRST, one.app())
    gw.backends.route(SECOND, two.app())
    access = await gw.new_user()
    grant = await gw.init_ok(access, {"query": "write", "model": "slow", "max_tokens": 64})
    body = {"stream": False, "messages": [{"role": "user", "content": "write"}]}
    status, answer = await gw.complete(grant["stream_token"], body)
    record = await gw.wait_usage(access, grant["reservation_id"])
    await one.settled()
    await two.settled()
    # Before: 504, both vendors generated (and billed) the 12 tokens, the member was
    # billed 0 output and 0 credits past the input.
    assert status == 200, answer
    assert answer["choices"][0]["message"]["content"].startswith("w0 ")
    assert (record["status"], record["model"]) == ("completed", "slow")
    assert record["output_tokens"] == TOKENS == one.billed
    assert two.billed == 0


def test_a_whole_answer_joined_from_a_stream_keeps_the_vendors_cache_counts() -> None:
    """Joined from Anthropic's stream, a whole answer keeps the cache reads and writes
    its JSON answer carried (priced at their own rates), not only the two totals."""
    start = {"usage": {"input_tokens": 10, "cache_read_input_tokens": 600,
                       "cache_creation_input_tokens": 300, "output_tokens": 1}}  # fmt: skip
    frames = [
        {"type": "message_start", "message": start},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 5},
        },
        {"type": "message_stop"},
    ]
    answer = StreamAnswer(AnthropicStreamParser())
    answer.feed(b"".join(b"data: " + orjson.dumps(f) + b"\n\n" for f in frames))
    completion = answer.completion()
    assert completion.text == "hi"
    assert completion.usage is not None
    assert completion.usage.counts() == (910, 5, 600, 300, 0)
