"""A stream's checkpoints start when the edge begins opening its backend, not when
the backend's answer starts (review of the residuals: a stream killed before its
first checkpoint).

The heartbeat that tells the sweeper an edge is alive started with the relay, after
the backend's headers. Before that, opening can take a minute (retries, a fallback
chain waiting for its first token, a slow backend's head), and a whole answer
(`"stream": false`) had no checkpoint at all: an edge killed then left no trace the
sweeper reads. The stream's hold waited for its deadline (the token's life plus the
hold grace, ~20 minutes) and its concurrency slots for their expiry (15 minutes): a
user at one stream was refused 429 all that time, a company whose edge carried many
openings likewise. Now the heartbeat runs from the start of the opening: the sweeper
sees such a stream fall silent and settles it (a failed stream before its first
output token costs nothing), frees its slots and revokes its token
(`tests/test_e2e_edge_crash.py` kills a real edge mid-opening).

Driven in one event loop (`tests/inproc.py`) against a backend that holds its
response until the test lets it go.
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
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from shared.checkpoints import UsageCheckpoint, checkpoint_key
from tests.inproc import Gateway, eventually, gateway_env, opened
from tests.token_claims import claims_of

on_loop = pytest.mark.asyncio(loop_scope="module")

BACKEND = "http://held.test"
CATALOG = {
    "default_model": "held",
    "providers": {"held": {"api_type": "openai_chat", "base_url": f"{BACKEND}/v1"}},
    "models": {
        "held": {
            "provider": "held",
            "upstream_model": "held",
            "context_length": 8192,
            "max_output_tokens": 256,
            "features": ["streaming"],
            "price": {"input_per_mtok": "1.0", "output_per_mtok": "2.0"},
        }
    },
}
CHUNK = {"id": "c", "object": "chat.completion.chunk", "model": "held"}
ANSWER = {
    "id": "c",
    "object": "chat.completion",
    "model": "held",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}


class HeldBackend:
    """An OpenAI-compatible backend that answers only once `go` is set."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.waiting = 0

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        self.waiting += 1
        try:
            await self.go.wait()
        finally:
            self.waiting -= 1
        if not body.get("stream"):
            return JSONResponse(ANSWER)

        async def frames() -> AsyncIterator[bytes]:
            delta = {**CHUNK, "choices": [{"index": 0, "delta": {"content": "hi"}}]}
            yield b"data: " + orjson.dumps(delta) + b"\n\n"
            end = {**CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            yield b"data: " + orjson.dumps(end) + b"\n\ndata: [DONE]\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    tmp = tmp_path_factory.mktemp("checkpoint-while-opening")
    catalog = Path(tmp) / "models.yaml"
    catalog.write_text(yaml.safe_dump(CATALOG))
    async with Gateway(gateway_env(str(tmp), LLMGW_MODELS_FILE=str(catalog))) as gw:
        yield gw


async def checkpoint(gw: Gateway, reservation_id: str) -> UsageCheckpoint | None:
    raw = await gw.store.get(checkpoint_key(reservation_id))
    return UsageCheckpoint.loads(raw) if raw is not None else None


@on_loop
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole-answer"])
async def test_the_edge_checkpoints_a_stream_while_its_backend_has_not_answered(
    gateway: Gateway, stream: bool
) -> None:
    gw, backend = gateway, HeldBackend()
    app = Starlette(routes=[Route("/v1/chat/completions", backend.completions, methods=["POST"])])
    gw.backends.route(BACKEND, app)
    token = await gw.new_user()
    messages = [{"role": "user", "content": "hello"}]
    grant = await gw.init_ok(token, {"model": "held", "messages": messages})
    rid = grant["reservation_id"]
    body = orjson.dumps({"model": "held", "messages": messages, "stream": stream})
    headers = {"Authorization": f"Bearer {grant['stream_token']}"}
    request = asyncio.create_task(gw.post("/v1/chat/completions", body, headers))
    await eventually(lambda: backend.waiting == 1, "the edge is waiting for the backend")

    # The backend has sent nothing yet; the sweeper can already see the stream.
    await eventually(lambda: checkpoint(gw, rid), "a checkpoint while the backend is silent")
    opening = await checkpoint(gw, rid)
    assert opening is not None
    jti = claims_of(grant["stream_token"])["jti"]
    assert (opening.jti, opening.ended, opening.output_tokens) == (jti, False, 0)
    assert opening.input_tokens > 0

    backend.go.set()
    async with opened(await request) as response:
        assert response.status_code == 200
        await response.aread()
    await gw.wait_usage(token, rid)
    final = await checkpoint(gw, rid)
    assert final is not None and final.ended  # the report, not the sweeper, settles it
    assert final.beat > opening.beat
