"""``POST /v1/chat/init`` and the chat sessions."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control_plane import chat_sessions, policy, revoking
from control_plane.auth import authenticate, caller_and_body
from control_plane.chat_init import init_chat
from control_plane.chat_request import parse_init_request
from control_plane.deps import Deps, get_deps
from control_plane.errors import AppError, Forbidden, ServiceUnavailable
from control_plane.middleware import request_id
from control_plane.pagination import decode_seq_cursor, encode_seq_cursor, page_request
from control_plane.policy import Principal
from control_plane.rate_limits import check_init_rate
from control_plane.responses import no_content, ok
from control_plane.stream_revocations import mark_revoked
from control_plane.tables import utcnow
from control_plane.validation import page_limit, parse_json_object
from shared.revocations import revoke
from shared.stash import stash_key

log = logging.getLogger("control_plane.chat")

Body = TypeVar("Body")


async def chat_init(request: Request) -> Response:
    return await serve_init(request, caller_and_body, parse_json_object)


async def serve_init(
    request: Request,
    arrive: Callable[[Request], Awaitable[tuple[Principal, Body]]],
    parse: Callable[[Body], dict[str, Any]],
) -> Response:
    """Init for the caller `arrive` names (the public route's bearer:
    `auth.caller_and_body`; an edge's API-key caller: routes/internal.py) once the
    whole body has arrived (a key revoked while its request held its body back
    must not take a hold), then scope, then `init_chat` (which counts the init
    rate). The body is `parse`d only once the caller may init."""
    deps = get_deps(request)
    outcome = "error"
    try:
        principal, body = await arrive(request)
        if not policy.can_chat(principal):
            raise Forbidden("This needs a user with the llm:chat:send scope.")
        assert principal.user_id is not None and principal.company_id is not None
        try:
            req = parse_init_request(parse(body))
        except AppError:
            # A refused body still counts as an init, and over the rate its answer
            # is the 429: `init_chat` counts the others with the rest of its store
            # work, in one round trip (`init_gate`).
            await check_init_rate(
                deps.store,
                user_id=principal.user_id,
                company_id=principal.company_id,
                per_user=deps.settings.init_rate_per_user,
                per_company=deps.settings.init_rate_per_company,
                now=deps.clock(),
            )
            raise
        data = await init_chat(deps, principal, req, request_id(request))
        outcome = "ok"
        return ok(data, 201)
    except AppError as exc:
        outcome = exc.code
        raise
    finally:
        deps.metrics.chat_inits.labels(outcome=outcome).inc()


async def list_sessions(request: Request) -> Response:
    """Sessions, most recently active first; a walk (``cursor``) lasts at most an hour.

    Its pages keep the order sessions had when it began (`chat_sessions.list_sessions`);
    a cursor older than that is 422 ``cursor``: start again from the first page."""
    principal = await authenticate(request)
    if not policy.can_read_own_data(principal):
        raise Forbidden("This needs a user with the llm:chat:read scope.")
    req = page_request(request.query_params)
    page = await get_deps(request).db.transaction(
        lambda s: chat_sessions.list_sessions(s, principal, req, utcnow())
    )
    return ok(page.public(chat_sessions.session_public))


async def get_session(request: Request) -> Response:
    """One session and a page of its messages in conversation order (DESIGN §11:
    ``?limit=`` default 50, max 200; ``?cursor=`` a previous ``next_cursor``)."""
    principal = await authenticate(request)
    session_id = str(request.path_params["session_id"])
    limit = page_limit(request.query_params.get("limit"))
    after = decode_seq_cursor(request.query_params.get("cursor"))
    chat, messages, last_seq = await get_deps(request).db.transaction(
        lambda s: chat_sessions.read_session(s, principal, session_id, limit, after)
    )
    doc = chat_sessions.session_public(chat, messages)
    doc["next_cursor"] = None if last_seq is None else encode_seq_cursor(last_seq)
    return ok(doc)


async def delete_session(request: Request) -> Response:
    """Delete a session and its messages; its turns' stream tokens stop working."""
    principal = await authenticate(request)
    session_id = str(request.path_params["session_id"])
    deps = get_deps(request)
    # A stream that ended within the resume grace still replays from its URL; the
    # minute covers the edge's clock (which stamps the end) against ours.
    since = utcnow() - timedelta(seconds=deps.settings.resume_grace_seconds + 60)
    # Told before the deletion, so a store failure leaves the session for a retry
    # (a retry after it would find nothing to delete, and its streams running).
    first = await deps.db.transaction(
        lambda s: chat_sessions.streams_to_end(s, principal, session_id, since)
    )
    try:
        await _end_streams(deps, first.company_id, first.jtis)
    except Exception:
        log.exception("could not end a chat session's streams")
        raise ServiceUnavailable(
            "The edges could not be told to end the session's streams; nothing was deleted: retry."
        ) from None
    # Revoked at the edges now, whatever the deletion does: recorded for the
    # republishing pass on their own, before the deletion holds the session's row.
    # In the deletion's transaction, a turn settling meanwhile (its reservation's
    # row held, its reply waiting on the session's) made a deadlock PostgreSQL broke
    # by failing the deletion (503).
    if first.jtis:
        await deps.db.transaction(lambda s: mark_revoked(s, first.company_id, first.jtis, utcnow()))
    erased = await deps.db.transaction(
        lambda s: chat_sessions.remove_session(s, principal, session_id, since, first.jtis)
    )
    try:  # a turn begun between the two transactions
        await _end_streams(deps, erased.company_id, erased.jtis - first.jtis)
    except Exception:
        log.exception("could not end a deleted chat session's latest stream")
    return no_content()


async def _end_streams(deps: Deps, company_id: str, jtis: Iterable[str]) -> None:
    """Each stream token of a deleted session's turns is revoked at the edges, as
    `POST /v1/admin/revocations {"jti"}` would (an unused one refused, a running
    stream ended `revoked` and billed so, a resume refused), and the request stashed
    for it (the session's history) leaves the store. Otherwise the deletion reached
    none of them: the stream ran on, its URL and a just-ended one's replayed the
    answer, and an unused token streamed the deleted history."""
    ttl = revoking.revocation_ttl(deps.settings)
    for jti in sorted(jtis):
        await revoke(deps.store, "jti", jti, company_id, ttl)
        await deps.store.delete(stash_key(company_id, jti))


routes: list[BaseRoute] = [
    Route("/v1/chat/init", chat_init, methods=["POST"]),
    Route("/v1/sessions", list_sessions, methods=["GET"]),
    Route("/v1/sessions/{session_id}", get_session, methods=["GET"]),
    Route("/v1/sessions/{session_id}", delete_session, methods=["DELETE"]),
]
