"""A streamed request cancelled while the edge waits for a backend's first token (a
fallback is left: `fallback.await_first_token`) closes that backend's answer.

Three things cancel an opening since today: the client leaving (`StreamJob.open_stream`),
a revocation (`EdgeState.answering`) and the stream's maximum life (`StreamJob.open`).
The wait for the first token closed the backend's answer when it timed out, broke or
failed, not when it was cancelled: the answer was dropped open. Measured before the
fix: the backend kept its request (its connection, under the origin's connection cap
every company's streams share) and then generated the whole answer for nobody, 40
tokens here, for as long as it cared to (DESIGN §9: cancelled within 1 s).

Driven in one event loop (`tests/inproc.py`) against a backend that sends its headers
at once and holds its first token until the test lets it go.
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
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.edge_scenarios import leave
from tests.inproc import Gateway, eventually, gateway_env
from tests.test_edge_metrics_agree import assert_once, snapshot, until_reported

on_loop = pytest.mark.asyncio(loop_scope="module")
MESSAGES = [{"role": "user", "content": "hello"}]

BACKEND = "http://first.test"
MODEL = {
    "provider": "first",
    "context_length": 8192,
    "max_output_tokens": 256,
    "features": ["streaming"],
    "price": {"input_per_mtok": "1.0", "output_per_mtok": "2.0"},
}
CATALOG = {
    "default_model": "slow-first",
    "providers": {"first": {"api_type": "openai_chat", "base_url": f"{BACKEND}/v1"}},
    "models": {
        # The chain's first model waits for its first token: a fallback is left.
        "slow-first": {**MODEL, "upstream_model": "slow", "fallbacks": ["spare"]},
        "spare": {**MODEL, "upstream_model": "spare"},
    },
}
CHUNK = {"id": "c", "object": "chat.completion.chunk", "model": "slow"}
TOKENS = 40


class FirstTokenHeld:
    """Headers at once, then no token until `go`; counts the answers it began, the
    ones closed before their end (`closed`) and the tokens it generated."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.waiting = 0
        self.closed = 0
        self.generated = 0

    async def completions(self, request: Request) -> Response:
        await request.body()

        async def frames() -> AsyncIterator[bytes]:
            self.waiting += 1
            try:
                yield b": opening\n\n"  # no token: the edge keeps waiting
                await self.go.wait()
                for _ in range(TOKENS):
                    delta = {**CHUNK, "choices": [{"index": 0, "delta": {"content": "x "}}]}
                    self.generated += 1
                    yield b"data: " + orjson.dumps(delta) + b"\n\n"
                end = {**CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                yield b"data: " + orjson.dumps(end) + b"\n\ndata: [DONE]\n\n"
            except BaseException:
                self.closed += 1
                raise
            finally:
                self.waiting -= 1

        return StreamingResponse(frames(), media_type="text/event-stream")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    tmp = tmp_path_factory.mktemp("fallback-wait-cancelled")
    catalog = Path(tmp) / "models.yaml"
    catalog.write_text(yaml.safe_dump(CATALOG))
    env = gateway_env(
        str(tmp),
        LLMGW_MODELS_FILE=str(catalog),
        LLMGW_FIRST_TOKEN_TIMEOUT_SECONDS="60",
        LLMGW_UPSTREAM_RETRIES="0",
    )
    async with Gateway(env) as gw:
        yield gw


async def _a_grant_before_a_held_backend(
    gw: Gateway,
) -> tuple[FirstTokenHeld, str, dict[str, Any]]:
    """A new backend holding its first token (routed at `BACKEND`), a new user, and
    the user's grant for `slow-first`: the backend, the user's token, the grant."""
    backend = FirstTokenHeld()
    app = Starlette(routes=[Route("/v1/chat/completions", backend.completions, methods=["POST"])])
    gw.backends.route(BACKEND, app)
    token = await gw.new_user()
    grant = await gw.init_ok(token, {"model": "slow-first", "messages": MESSAGES})
    return backend, token, grant


async def _ask_until_held(
    gw: Gateway, backend: FirstTokenHeld, grant: dict[str, Any]
) -> asyncio.Task[Any]:
    """The client's streamed request, once the edge waits on the backend's first token."""
    body = orjson.dumps({"model": "slow-first", "messages": MESSAGES, "stream": True})
    headers = {"Authorization": f"Bearer {grant['stream_token']}"}
    client = asyncio.create_task(gw.post("/v1/chat/completions", body, headers))
    await eventually(lambda: backend.waiting == 1, "the edge waits for the first token")
    return client


@on_loop
async def test_a_client_leaving_during_the_first_token_wait_closes_the_backend(
    gateway: Gateway,
) -> None:
    gw = gateway
    backend, token, grant = await _a_grant_before_a_held_backend(gw)
    try:
        await leave(await _ask_until_held(gw, backend, grant))
        record = await gw.wait_usage(token, grant["reservation_id"], within=5)
        assert record["status"] == "cancelled"
        # The backend's answer is closed, not left to run on for nobody.
        await eventually(lambda: backend.closed == 1, "the backend's answer closed", within=3)
    finally:
        backend.go.set()  # a request the edge still holds runs to its end
    await eventually(lambda: backend.waiting == 0, "the backend's answer over")
    assert backend.generated == 0


@on_loop
async def test_a_first_token_wait_cancelled_moves_the_edge_metrics_once(
    gateway: Gateway,
) -> None:
    """The client leaving while the chain waits for a first token: one `cancelled`
    stream, the active gauge back where it was, its tokens as its record has them, no
    backend error and no fallback counted (the chain never moved on)."""
    gw = gateway
    backend, token, grant = await _a_grant_before_a_held_backend(gw)
    registry = gw.edge_state().metrics.registry
    before = snapshot(gw)
    fallbacks = registry.get_sample_value(
        "llmgw_edge_fallbacks_total", {"from_model": "slow-first", "to_model": "spare"}
    )
    try:
        await leave(await _ask_until_held(gw, backend, grant))
        moved, record = await until_reported(gw, token, grant, before)
    finally:
        backend.go.set()
    await eventually(lambda: backend.waiting == 0, "the backend's answer over")
    assert record["status"] == "cancelled"
    assert_once(moved, record, errors=0)
    assert (
        registry.get_sample_value(
            "llmgw_edge_fallbacks_total", {"from_model": "slow-first", "to_model": "spare"}
        )
        == fallbacks
    )
