"""`GET /v1/stream`: the EventSource path, resumable (see `resume.py`).

The first use of a token runs the request stashed at init and numbers its events;
a reconnect with the same token and `Last-Event-ID` follows the stream's log from
the store, on whichever edge it lands; after the stream ended and nothing is left,
it gets 204 so the browser's EventSource stops reconnecting.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import anyio
from starlette.requests import Request
from starlette.responses import Response

from shared.stash import StashedRequest
from shared.tokens import StreamGrant
from stream_edge.admission import (
    bearer,
    claim,
    edge_state,
    fallback_routes,
    route,
    verified_grant,
)
from stream_edge.attempts import Attempt
from stream_edge.errors import BadRequest, Gone, NotFound, Unauthorized
from stream_edge.formats import EventSourceWriter
from stream_edge.jobs import StreamJob
from stream_edge.resume import (
    GAP_CODE,
    Follower,
    ResumeLog,
    company_log_budget,
    done_key,
    events_key,
    gap_key,
    gap_message,
    kept_events,
    live_key,
    parse_last_event_id,
    wait_for_reconnect,
    within_grace,
)
from stream_edge.state import EdgeState
from stream_edge.streaming import Emit, EventStreamResponse, Streamed
from stream_edge.upstream.base import UpstreamEvent

logger = logging.getLogger("llmgw.edge.eventsource")
RETRY_FRAME = b"retry: 1000\n\n"


def _last_event_id(request: Request) -> int | None:
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    try:
        return parse_last_event_id(raw)
    except ValueError:
        raise BadRequest(
            "Last-Event-ID must be an event number", code="invalid_last_event_id"
        ) from None


def _stashed(raw: bytes | None) -> StashedRequest | None:
    """The request stashed at init; None when gone or unreadable (the token is
    claimed by now: the caller still reports and frees the slots)."""
    if raw is None:
        return None
    try:
        return StashedRequest.loads(raw)
    except (ValueError, KeyError, TypeError):
        logger.error("the stashed request is unreadable")
        return None


def _log_ttl(state: EdgeState, grant: StreamGrant) -> float:
    # Resumable for as long as the token may reconnect, plus the grace.
    return max(0, grant.expires_at - time.time()) + state.settings.resume_grace_seconds + 60


async def event_stream(request: Request) -> Response:
    accepted = time.perf_counter()
    state = edge_state(request)
    grant = await verified_grant(state, request.query_params.get("token") or bearer(request))
    target = route(state, grant)
    chain = [target, *fallback_routes(state, grant)]
    after = _last_event_id(request)
    admitted = await claim(state, grant, "stream", fetch=True)
    if admitted.verdict == "reconnect":
        if after is None:
            # Without Last-Event-ID this is not a resume but a second use of the
            # token: whoever else holds the URL gets no replay of the answer.
            state.metrics.token_rejections.labels("used").inc()
            raise Unauthorized("this stream token was already used", code="token_used")
        return await _resume(state, grant, after)
    stashed = _stashed(admitted.fetched)
    messages = stashed.messages if stashed else []
    params = stashed.params if stashed else {}
    # Init checked the stashed request against every model of the chain it signed.
    attempts = [Attempt(r, messages, params, r.max_tokens, r.max_input_tokens) for r in chain]
    job = StreamJob(state, grant, attempts, accepted)
    if stashed is None:
        await job.report("finished")
        raise NotFound("the request for this token is gone", code="request_not_found")
    response = await job.open(stream=True)
    writer = EventSourceWriter(grant.session_id)
    log = ResumeLog(
        state.store,
        grant.jti,
        _log_ttl(state, grant),
        company_id=grant.company_id,
        company_budget_bytes=company_log_budget(state.settings.max_streams_per_company),
    )
    finished = asyncio.Event()
    # The stream's last event (`complete` or `error`) is in the log: the stream has
    # ended, whatever its delivery and the log's closing still take.
    ended = False

    def write(event: UpstreamEvent) -> bytes:
        frame = writer.write(event)
        if frame:
            log.append(frame)
        return frame

    def closing_frame(code: str, message: str) -> bytes | None:
        # A revocation or a shutdown ends the stream with this event: logged too, so
        # followers on any edge see the end the producer's client sees. None once
        # the stream ended by itself: a second last event would follow its first.
        if ended:
            return None
        frame = writer.error(code, message)
        log.append(frame)
        log.seal()
        return frame

    async def produce(emit: Emit) -> None:
        nonlocal ended
        try:
            # Browsers wait 3 s by default before reconnecting; ask for 1 s. Cut off
            # here (the client left, the slow-client watchdog), the backend's answer
            # is closed by the report (`StreamJob.report`).
            await emit(RETRY_FRAME)
            result = await job.pump(response, write, emit)
            if result.status == "completed":
                for frame in writer.tool_call_frames():  # whole calls, before `complete`
                    log.append(frame)
                    await emit(frame)
                billing = job.backend.meter.billing()
                final = writer.complete(
                    job.backend.meter.finish_reason,
                    billing.input_tokens,
                    billing.output_tokens,
                    model=job.backend.model.id,
                )
            else:
                final = writer.error(
                    result.error_code or "upstream_error", result.error_message or ""
                )
            log.append(final)
            ended = True
            await emit(final)
        finally:
            await _close_log(state, grant, log)
            finished.set()

    stream = EventStreamResponse(
        produce,
        job.report,
        headers=[(b"x-request-id", grant.request_id.encode())],
        ping_interval=state.settings.ping_interval,
        slow_client_timeout=state.settings.slow_client_timeout,
        detachable=True,
        linger=lambda: wait_for_reconnect(
            state.store, grant.jti, state.settings.resume_grace_seconds, finished
        ),
    )
    return Streamed(
        state.active,
        stream,
        grant,
        closing_frame,
        live=(live_key(grant.jti), None),
        connections=state.connections,
    )


async def _close_log(state: EdgeState, grant: StreamGrant, log: ResumeLog) -> None:
    """Flush the log, then mark the stream done (in that order: a follower that sees
    `done` reads the log once more and must find the last event there)."""
    with anyio.CancelScope(shield=True):
        try:
            await log.close()
            # The end's time: reconnects are refused once the grace after it is over.
            # On the store's clock: the reconnect may come to an edge whose host's
            # clock is minutes off this one's.
            ended_at = repr(state.store_clock()).encode()
            await state.store.set(done_key(grant.jti), ended_at, _log_ttl(state, grant))
        except Exception as exc:  # the store is down: followers give up when idle
            logger.warning("could not close the resume log: %s", type(exc).__name__)


async def _resume(state: EdgeState, grant: StreamGrant, after: int) -> Response:
    done, gap = await state.store.get_many([done_key(grant.jti), gap_key(grant.jti)])
    kept = kept_events(gap)
    if kept is not None and after >= kept:
        # The events asked for were never kept (resume.py): say so, rather than a 204
        # or an empty follow that would pass for the end of the answer.
        raise Gone(gap_message(kept), code=GAP_CODE)
    if done is not None:
        if not within_grace(done, state.store_clock(), state.settings.resume_grace_seconds):
            return Response(status_code=204)  # ended long ago: EventSource stops here
        # Counted, not read: a flood of reconnects must not each load an event.
        if await state.store.log_length(events_key(grant.jti)) <= after:
            return Response(status_code=204)
    # This connection now serves the stream (one live connection per stream): the one
    # before it on this edge ends at once (live_connections.py), one on another edge
    # at its process's next watch (revocation_watch.py).
    key, connection = live_key(grant.jti), secrets.token_hex(8).encode()
    state.connections.claim(key, connection)
    try:
        await state.store.set(key, connection, _log_ttl(state, grant))
    except BaseException:
        state.connections.forget(key, connection)
        raise
    follower = Follower(
        state.store,
        grant.jti,
        after,
        give_up_after=max(state.settings.idle_timeout, state.settings.first_token_timeout),
    )

    async def nothing_to_report(outcome: str) -> None:
        return None  # the stream's own edge reports its usage

    def closing_frame(code: str, message: str) -> bytes | None:
        # A revocation ends the stream, for this client too. This edge's shutdown does
        # not: the stream runs on at its producer, so the client is let go with no
        # ending and its reconnect (Last-Event-ID: the last event it got) resumes it
        # elsewhere. A `shutting_down` event would end the answer for it, and its id,
        # the stream's next, would make that reconnect skip a real event. Nothing at
        # all once the stream's last event is on its way to this client.
        if follower.ended:
            return None
        return follower.final_frame(code, message) if code == "revoked" else b""

    stream = EventStreamResponse(
        follower.run,
        nothing_to_report,
        headers=[(b"x-request-id", grant.request_id.encode())],
        ping_interval=state.settings.ping_interval,
        slow_client_timeout=state.settings.slow_client_timeout,
        detachable=True,
    )
    # With its grant, the process's watcher ends this connection on a revocation
    # too, with the `error` event the producer's client gets (`Follower.final_frame`).
    return Streamed(
        state.active,
        stream,
        grant,
        closing_frame,
        live=(key, connection),
        connections=state.connections,
    )
