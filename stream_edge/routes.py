"""The edge's HTTP handlers: thin shells around grants, jobs and the relay."""

from __future__ import annotations

import time
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from shared.catalog import ModelSpec, Provider
from shared.stash import StashedRequest, stash_key
from shared.tokens import StreamGrant
from stream_edge.errors import BadRequest, EdgeError, NotFound, Unauthorized, error_response
from stream_edge.formats import EventSourceWriter, OpenAIChunkWriter, completion_object
from stream_edge.grants import TokenUnauthorized
from stream_edge.jobs import StreamJob, done_key
from stream_edge.requests import parse_chat_request
from stream_edge.state import EdgeState
from stream_edge.streaming import Emit, EventStreamResponse
from stream_edge.upstream.base import Usage

MAX_BODY = 1 << 20
DONE_TTL = 3600


def _state(request: Request) -> EdgeState:
    state: EdgeState = request.app.state.edge
    return state


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


async def _grant(state: EdgeState, token: str | None) -> StreamGrant:
    if not token:
        state.metrics.token_rejections.labels("missing").inc()
        raise Unauthorized("a stream token is required", code="missing_token")
    try:
        return await state.grants.verify(token)
    except TokenUnauthorized as exc:
        state.metrics.token_rejections.labels(exc.reason).inc()
        raise
    except EdgeError as exc:
        state.metrics.token_rejections.labels(exc.code).inc()
        raise


def _route(state: EdgeState, grant: StreamGrant) -> tuple[ModelSpec, Provider]:
    model = state.settings.catalog.model(grant.model)
    if model is None:
        raise NotFound(
            f"model {grant.model!r} is not in this edge's catalog", code="model_not_found"
        )
    return model, state.settings.catalog.providers[model.provider]


async def _claim(state: EdgeState, grant: StreamGrant, path: str) -> str | None:
    first = await state.grants.claim(grant, path)
    if first is not None and first != path:
        state.metrics.token_rejections.labels("used").inc()
        raise Unauthorized("this stream token was already used", code="token_used")
    return first


async def _read_json(request: Request) -> Any:
    body = await request.body()
    if len(body) > MAX_BODY:
        raise BadRequest("the request body is too large", code="body_too_large")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("the request body is not valid JSON", code="invalid_json") from None


async def chat_completions(request: Request) -> Response:
    accepted = time.perf_counter()
    state = _state(request)
    grant = await _grant(state, _bearer(request))
    chat = parse_chat_request(await _read_json(request), grant)
    model, provider = _route(state, grant)
    if await _claim(state, grant, "completions") is not None:
        state.metrics.token_rejections.labels("used").inc()
        raise Unauthorized("this stream token was already used", code="token_used")
    job = StreamJob(
        state, grant, model, provider, chat.messages, chat.params,
        chat.max_tokens, chat.input_estimate, accepted,
    )  # fmt: skip
    response = await job.open(stream=chat.stream)
    request_id = [(b"x-request-id", grant.request_id.encode())]
    if not chat.stream:
        completion = await job.read_completion(response)
        await job.report(client_gone=False)
        usage = completion.usage or _estimated_usage(job)
        return JSONResponse(
            completion_object(model.id, completion.text, completion.finish_reason, usage),
            headers={"X-Request-Id": grant.request_id},
        )
    writer = OpenAIChunkWriter(
        model.id,
        include_usage=chat.include_usage,
        passthrough=provider.api_type == "openai_chat" and model.upstream_model == model.id,
    )

    async def produce(emit: Emit) -> None:
        result = await job.pump(response, writer.write, emit)
        if result.status == "completed":
            await emit(writer.done())
        else:
            await emit(
                writer.error(result.error_code or "upstream_error", result.error_message or "")
            )

    return _Streamed(EventStreamResponse(produce, job.report, headers=request_id))


def _estimated_usage(job: StreamJob) -> Usage:
    billing = job.meter.billing()
    return Usage(billing.input_tokens, billing.output_tokens)


async def event_stream(request: Request) -> Response:
    accepted = time.perf_counter()
    state = _state(request)
    grant = await _grant(state, request.query_params.get("token") or _bearer(request))
    model, provider = _route(state, grant)
    if await _claim(state, grant, "stream") is not None:
        # A reconnect with the same token: after `complete` there is nothing left.
        if await state.store.get(done_key(grant.jti)) is not None:
            return Response(status_code=204)
        raise Unauthorized("this stream is already being served", code="token_used")
    raw = await state.store.get(stash_key(grant.jti))
    stashed = StashedRequest.loads(raw) if raw is not None else None
    job = StreamJob(
        state, grant, model, provider,
        stashed.messages if stashed else [], stashed.params if stashed else {},
        grant.max_tokens, grant.max_input_tokens, accepted,
    )  # fmt: skip
    if stashed is None:
        await job.report(client_gone=False)
        raise NotFound("the request for this token is gone", code="request_not_found")
    response = await job.open(stream=True)
    writer = EventSourceWriter(grant.session_id)

    async def produce(emit: Emit) -> None:
        result = await job.pump(response, writer.write, emit)
        if result.status == "completed":
            billing = job.meter.billing()
            await state.store.set(done_key(grant.jti), b"1", DONE_TTL)
            await emit(
                writer.complete(
                    job.meter.finish_reason, billing.input_tokens, billing.output_tokens
                )
            )
        else:
            await emit(
                writer.error(result.error_code or "upstream_error", result.error_message or "")
            )

    return _Streamed(
        EventStreamResponse(
            produce, job.report, headers=[(b"x-request-id", grant.request_id.encode())]
        )
    )


class _Streamed(Response):
    """Adapts our ASGI event-stream responder to Starlette's Response return type."""

    def __init__(self, inner: EventStreamResponse) -> None:
        self._inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._inner(scope, receive, send)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state = _state(request)
    failing = []
    if state.draining:
        failing.append("draining")
    if not await state.store.ping():
        failing.append("store")
    if failing:
        return JSONResponse({"status": "unavailable", "failing": failing}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    state = _state(request)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def not_found(request: Request, exc: Exception) -> Response:
    return error_response(NotFound("no such path", code="not_found"))
