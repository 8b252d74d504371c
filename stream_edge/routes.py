"""`POST /v1/chat/completions` (OpenAI-compatible) and the operational endpoints."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shared.metrics import exposition
from shared.service_calls import is_api_key
from shared.tokens import StreamGrant
from stream_edge import key_callers
from stream_edge.admission import (
    Route,
    bearer,
    claim,
    edge_state,
    fallback_routes,
    read_json,
    route,
    verified_grant,
)
from stream_edge.attempts import Attempt
from stream_edge.cancellation import despite_cancellation
from stream_edge.errors import (
    EdgeError,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
    error_response,
)
from stream_edge.formats import OpenAIChunkWriter, completion_object
from stream_edge.jobs import StreamJob
from stream_edge.requests import ChatBody, ChatRequest, fit_chat_body, read_chat_body
from stream_edge.state import EdgeState
from stream_edge.streaming import Emit, EventStreamResponse, Streamed
from stream_edge.upstream.base import Usage

logger = logging.getLogger("llmgw.edge")


async def chat_completions(request: Request) -> Response:
    accepted = time.perf_counter()
    state = edge_state(request)
    token = bearer(request)
    if not is_api_key(token):
        grant = await verified_grant(state, token)
        job, chat = await admit(state, grant, lambda: read_json(request), accepted)
        return await serve(state, grant, job, chat, request)
    # A gateway API key (issue 16.5): the control plane inits for it, then the
    # request goes the stream-token way; a hold whose stream never starts goes back.
    assert token is not None
    key_callers.link(state)  # an edge without API keys refuses before reading the body
    body = key_callers.normalised(await read_json(request))
    grant = await key_callers.grant_for_key(state, token, body)
    try:
        job, chat = await admit(state, grant, lambda: _given(body), accepted)
    except Exception:  # refused (4xx), or the store failed: nothing started
        await key_callers.abandon(state, grant)
        raise
    except asyncio.CancelledError:
        # The server's shutdown cancelled the request before its stream existed (no
        # job, so no report owed: `admit` has no await after the claim). Its hold, and
        # any slots a claim whose reply was lost took, go back now, not at the
        # sweeper's deadline, whatever cancels it again: the cancellation is the
        # reason to abandon.
        await despite_cancellation(key_callers.abandon(state, grant))
        raise
    return await serve(state, grant, job, chat, request)


async def _given(body: Any) -> Any:
    return body


async def admit(
    state: EdgeState, grant: StreamGrant, read: Callable[[], Awaitable[Any]], accepted: float
) -> tuple[StreamJob, ChatRequest]:
    """Everything before the stream: the grant's checks, the body against it (and
    against each fallback of its chain), the claim (single use, limits). A refusal
    here has started nothing."""
    if grant.agent is not None:
        # The agent's system prompt and tools were fixed at init and stashed; a body
        # posted here would replace them. Refused before the token is used.
        raise Forbidden(
            f"this token runs agent {grant.agent!r}: stream it from its stream_url",
            code="agent_stream_only",
        )
    target = route(state, grant)
    # Checked and measured once; each model of the chain only prices the measure.
    body = read_chat_body(await read(), grant)
    chat = fit_chat_body(body, grant, target.model, target.provider.api_type)
    attempts = [_attempt(target, chat), *_fallbacks(state, grant, body)]
    if (await claim(state, grant, "completions")).verdict != "ok":
        # A POST cannot resume: a second request with the token is a second use.
        state.metrics.token_rejections.labels("used").inc()
        raise Unauthorized("this stream token was already used", code="token_used")
    return StreamJob(state, grant, attempts, accepted), chat


async def serve(
    state: EdgeState, grant: StreamGrant, job: StreamJob, chat: ChatRequest, request: Request
) -> Response:
    if not chat.stream:
        completion = await job.whole_answer(request.receive)
        if completion is None:
            return _stopped(job, grant)
        await job.report("finished")
        # What served: the grant's model, or the fallback the chain moved to.
        model = job.backend.model
        billing = job.backend.meter.billing()
        usage = completion.usage or Usage(billing.input_tokens, billing.output_tokens)
        return JSONResponse(
            completion_object(
                model.id, completion.text, completion.finish_reason, usage, completion.tool_calls
            ),
            headers={"X-Request-Id": grant.request_id},
        )
    response = await job.open_stream(request.receive)
    if response is None:
        return _stopped(job, grant)
    # What serves: the grant's model, or the fallback the chain moved to.
    model, provider = job.backend.model, job.backend.provider
    writer = OpenAIChunkWriter(
        model.id,
        include_usage=chat.include_usage,
        passthrough=provider.api_type == "openai_chat" and model.upstream_model == model.id,
    )

    ended = False  # the last chunk (`[DONE]` or an error) is on its way

    async def produce(emit: Emit) -> None:
        nonlocal ended
        result = await job.pump(response, writer.write, emit)
        if result.status == "completed":
            final = writer.done()
        else:
            final = writer.error(result.error_code or "upstream_error", result.error_message or "")
        ended = True
        await emit(final)

    def closing_frame(code: str, message: str) -> bytes | None:
        # A revocation or shutdown after the last chunk changes nothing: no error
        # chunk after `[DONE]`, and the stream's own outcome is reported.
        return None if ended else OpenAIChunkWriter.error(code, message)

    stream = EventStreamResponse(
        produce,
        job.report,
        headers=[(b"x-request-id", grant.request_id.encode())],
        ping_interval=state.settings.ping_interval,
        slow_client_timeout=state.settings.slow_client_timeout,
    )
    return Streamed(state.active, stream, grant, closing_frame)


def _stopped(job: StreamJob, grant: StreamGrant) -> Response:
    """The answer for a request stopped before it was served (reported already)."""
    if job.stopped_by == "revoked":
        raise Unauthorized("this stream's access was revoked", code="revoked")
    # The client left (`cancelled`): the server drops this answer.
    return Response(status_code=499, headers={"X-Request-Id": grant.request_id})


def _attempt(target: Route, chat: ChatRequest) -> Attempt:
    return Attempt(target, chat.messages, chat.params, chat.max_tokens, chat.input_estimate)


def _fallbacks(state: EdgeState, grant: StreamGrant, body: ChatBody) -> list[Attempt]:
    """The grant's fallbacks that can take this body: each model checks it with its own
    features and input estimate against its own signed `max_input_tokens`; one that
    cannot is left out of the chain (the first model already accepted the body)."""
    attempts = []
    for fallback in fallback_routes(state, grant):
        limited = dataclasses.replace(
            grant, max_input_tokens=fallback.max_input_tokens, max_tokens=fallback.max_tokens
        )
        try:
            chat = fit_chat_body(body, limited, fallback.model, fallback.provider.api_type)
        except EdgeError:
            continue
        attempts.append(_attempt(fallback, chat))
    return attempts


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state = edge_state(request)
    failing = []
    if state.draining:
        failing.append("draining")
    # A store whose clock this edge has never read (`TIME` refused: an ACL, a renamed
    # command) is not a usable one: the times it writes there would stay its host's,
    # and its outbox's deliverer waits for a reading (`app.deliver_on_store_clock`).
    if not await state.store.ping() or not request.app.state.store_clock.has_reading:
        failing.append("store")
    if failing:
        return JSONResponse({"status": "unavailable", "failing": failing}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    state = edge_state(request)
    return Response(exposition(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def store_unavailable(request: Request, exc: Exception) -> Response:
    logger.warning("store unavailable: %s", type(exc).__name__)
    return error_response(
        ServiceUnavailable(
            "the gateway's store is unavailable; retry shortly", code="store_unavailable"
        )
    )


async def replicas_behind(request: Request, exc: Exception) -> Response:
    """An admission too few Redis replicas acknowledged (LLMGW_REDIS_MIN_REPLICA_ACKS):
    taken back before this answer (`admission.claim`), so the same token may retry.
    Counted as a token refusal: a replica lagging or gone shows in Prometheus as
    streams refused, not only in the log."""
    logger.warning("store replicas behind: %s", exc)
    edge_state(request).metrics.token_rejections.labels("replicas_behind").inc()
    return error_response(
        ServiceUnavailable(
            "the gateway's store could not copy this stream's admission to its replicas"
            " in time; nothing was started: retry shortly with the same token",
            code="store_unavailable",
        )
    )


async def internal_error(request: Request, exc: Exception) -> Response:
    """The last resort (Starlette's ServerErrorMiddleware): an OpenAI-shaped 500, never
    a plain-text one. Streams report and free their slots before it comes to this."""
    logger.error("unhandled %s", type(exc).__name__)
    return error_response(EdgeError("the edge failed to handle this request"))


async def not_found(request: Request, exc: Exception) -> Response:
    return error_response(NotFound("no such path", code="not_found"))


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    allow = (getattr(exc, "headers", None) or {}).get("Allow", "")
    message = f"{request.method} is not allowed on this path"
    return error_response(MethodNotAllowed(message, allow=allow))
