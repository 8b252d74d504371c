"""The HTTP shell around the pure script: routes, pacing, counters.

``create_app()`` builds a fresh Starlette app per call; all mutable state (the
request counters) lives on ``app.state.mock``, never in module globals, so tests and
the embedded ``dev`` runner can hold several independent mocks in one process.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, fields

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mock_llm.errors import MockAPIError
from mock_llm.frames import DONE_FRAME, ChunkWriter, completion_object
from mock_llm.request import ChatRequest, parse_chat_request
from mock_llm.script import (
    MODEL_DEFAULTS,
    Completion,
    MockBehaviour,
    plan_completion,
    resolve_behaviour,
)

# A fixed timestamp keeps /v1/models byte-for-byte stable across restarts.
_MODELS_CREATED = 1_700_000_000
# What OpenAI sends on streams; X-Accel-Buffering stops nginx-style proxies buffering.
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class MockStats:
    """Chat completion counters, read by gateway tests through ``GET /_mock/stats``.

    ``active`` is a gauge of responses in progress; the others only grow until reset.
    An accepted request ends as exactly one of completed, cancelled (client left) or
    failed (``fail`` or ``drop_after``); one rejected as invalid counts in ``requests``
    only.
    """

    requests: int = 0
    active: int = 0
    cancelled: int = 0
    completed: int = 0
    failed: int = 0

    def reset(self) -> None:
        # ``active`` is live state, not history: zeroing it would go negative as
        # in-flight streams finish.
        self.requests = self.cancelled = self.completed = self.failed = 0

    def record(self, outcome: str) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)

    def snapshot(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class StreamDropped(RuntimeError):
    """Raised mid-stream on purpose (``drop_after``) so the server cuts the connection."""


@dataclass
class _Run:
    outcome: str = "cancelled"  # stays so unless the generator reaches its end or fails


class _TrackedStream(StreamingResponse):
    """A stream that settles the counters however it ends, client disconnect included.

    Starlette cancels the sending task when the client disconnects; the generator may
    then be parked at a ``yield`` and would only be finalised by the garbage collector,
    so it is closed here explicitly and the outcome recorded at once.
    """

    def __init__(self, frames: AsyncGenerator[bytes, None], run: _Run, stats: MockStats) -> None:
        super().__init__(frames, media_type="text/event-stream", headers=_STREAM_HEADERS)
        self._frames = frames
        self._run = run
        self._stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._stats.active += 1
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._frames.aclose()
            self._stats.active -= 1
            self._stats.record(self._run.outcome)


async def _pause(seconds: float) -> None:
    if seconds > 0:  # a zero sleep would still yield to the loop once per token
        await asyncio.sleep(seconds)


async def _frames(
    chat: ChatRequest, completion: Completion, behaviour: MockBehaviour, run: _Run
) -> AsyncGenerator[bytes, None]:
    writer = ChunkWriter(chat.model, completion, chat.include_usage)
    yield writer.role()
    for index, token in enumerate(completion.tokens):
        if behaviour.drop_after is not None and index >= behaviour.drop_after:
            run.outcome = "failed"
            raise StreamDropped(f"mock: dropping the stream after {index} tokens (drop_after)")
        await _pause(behaviour.first_token_delay_s if index == 0 else behaviour.token_delay_s)
        yield writer.content(token)
    yield writer.finish()
    usage = writer.usage()
    if usage is not None:
        yield usage
    yield DONE_FRAME
    run.outcome = "completed"


def _json(payload: object, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


class MockServer:
    """The app's state and its route handlers."""

    def __init__(self, models: Mapping[str, MockBehaviour], api_key: str | None) -> None:
        self.models = dict(models)
        self.api_key = api_key
        self.stats = MockStats()

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        expected = f"Bearer {self.api_key}".encode()
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):  # constant time: no key probing
            raise MockAPIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def chat_completions(self, request: Request) -> Response:
        # Counted before any check: gateway tests assert the backend saw nothing at all.
        self.stats.requests += 1
        self._authorize(request)
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            raise MockAPIError(
                400, "the request body is not valid JSON", code="invalid_json"
            ) from None
        chat = parse_chat_request(body)
        default = self.models.get(chat.model)
        if default is None:
            raise MockAPIError(
                404, f"The model `{chat.model}` does not exist.", code="model_not_found"
            )
        behaviour = resolve_behaviour(default, chat.messages, request.headers)
        if behaviour.fail_status is not None:
            self.stats.failed += 1
            status = behaviour.fail_status
            raise MockAPIError(status, f"mock: failing with {status} as asked", code="mock_failure")
        completion = plan_completion(chat.messages, behaviour, chat.max_tokens)
        if chat.stream:
            run = _Run()
            return _TrackedStream(_frames(chat, completion, behaviour, run), run, self.stats)
        return await self._complete(chat, completion, behaviour)

    async def _complete(
        self, chat: ChatRequest, completion: Completion, behaviour: MockBehaviour
    ) -> Response:
        # A non-streaming answer takes as long as the stream would: timeouts stay honest.
        self.stats.active += 1
        outcome = "cancelled"
        try:
            steps = len(completion.tokens)
            if steps:
                await _pause(behaviour.first_token_delay_s + (steps - 1) * behaviour.token_delay_s)
            outcome = "completed"
        finally:
            self.stats.active -= 1
            self.stats.record(outcome)
        return _json(completion_object(chat.model, completion))

    async def list_models(self, request: Request) -> Response:
        self._authorize(request)
        data = [
            {"id": name, "object": "model", "created": _MODELS_CREATED, "owned_by": "mock"}
            for name in self.models
        ]
        return _json({"object": "list", "data": data})

    async def get_stats(self, request: Request) -> Response:
        return _json(self.stats.snapshot())

    async def reset_stats(self, request: Request) -> Response:
        self.stats.reset()
        return _json(self.stats.snapshot())

    async def healthz(self, request: Request) -> Response:
        return _json({"status": "ok"})


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MockAPIError)
    return _json(exc.body(), exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    # Unknown paths and wrong methods also answer in OpenAI's shape, for its clients.
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    response = _json(MockAPIError(exc.status_code, exc.detail, code=code).body(), exc.status_code)
    response.headers.update(exc.headers or {})  # e.g. ``Allow`` on a 405
    return response


def create_app(
    api_key: str | None = None, models: Mapping[str, MockBehaviour] | None = None
) -> Starlette:
    """A fresh mock backend; ``api_key`` turns on Bearer auth for ``/v1/*``."""
    server = MockServer(MODEL_DEFAULTS if models is None else models, api_key)
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
            Route("/v1/models", server.list_models, methods=["GET"]),
            Route("/_mock/stats", server.get_stats, methods=["GET"]),
            Route("/_mock/reset", server.reset_stats, methods=["POST"]),
            Route("/healthz", server.healthz, methods=["GET"]),
        ],
        exception_handlers={MockAPIError: _api_error, HTTPException: _http_error},
    )
    app.state.mock = server
    return app
