"""Everything checked before a stream may start: token, route, limits, single use.

Order matters: nothing that can fail for the client's fault runs after the token is
claimed, so a rejected request never burns its token; a limit (429) is checked
before the claim for the same reason.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

from shared.catalog import ModelSpec, Provider
from shared.request_id import current_request_id
from shared.tokens import StreamGrant
from stream_edge.errors import BadRequest, EdgeError, NotFound, Unauthorized
from stream_edge.grants import TokenUnauthorized
from stream_edge.state import EdgeState

MAX_BODY = 1 << 20


def edge_state(request: Request) -> EdgeState:
    state: EdgeState = request.app.state.edge
    return state


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


async def verified_grant(state: EdgeState, token: str | None) -> StreamGrant:
    if not token:
        state.metrics.token_rejections.labels("missing").inc()
        raise Unauthorized("a stream token is required", code="missing_token")
    try:
        grant = await state.grants.verify(token)
    except TokenUnauthorized as exc:
        state.metrics.token_rejections.labels(exc.reason).inc()
        raise
    except EdgeError as exc:
        state.metrics.token_rejections.labels(exc.code).inc()
        raise
    # From here on the stream's log lines carry the id minted at init, which the
    # webhook and the upstream request (X-Request-Id) carry too.
    current_request_id.set(grant.request_id)
    return grant


def route(state: EdgeState, grant: StreamGrant) -> tuple[ModelSpec, Provider]:
    model = state.settings.catalog.model(grant.model)
    if model is None:
        raise NotFound(
            f"model {grant.model!r} is not in this edge's catalog", code="model_not_found"
        )
    return model, state.settings.catalog.providers[model.provider]


async def claim(state: EdgeState, grant: StreamGrant, path: str) -> str | None:
    """Single use: None on first use (the caller now runs the stream); the path on a
    reconnect to the same path; 401 for a token used on another path.

    A first use takes the stream's concurrency slots (keyed by jti), released by the
    stream's report; a reconnect takes none."""
    first = await state.grants.used_by(grant)
    if first is None:
        await state.limits.acquire(grant)
        # Losing a race with a simultaneous first use of the same token (rare) lands
        # below as a reconnect; the shared slot goes with the winner's report.
        first = await state.grants.claim(grant, path)
    if first is not None and first != path:
        state.metrics.token_rejections.labels("used").inc()
        raise Unauthorized("this stream token was already used", code="token_used")
    return first


async def read_json(request: Request) -> Any:
    body = await request.body()
    if len(body) > MAX_BODY:
        raise BadRequest("the request body is too large", code="body_too_large")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("the request body is not valid JSON", code="invalid_json") from None
