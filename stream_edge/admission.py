"""Everything checked before a stream may start: token, route, limits, single use.

Order matters: nothing that can fail for the client's fault runs after the token is
claimed, so a rejected request never burns its token. Everything that needs the
store — revoked? used before? a free slot? — is one atomic step (`Store.admit`): a
single round trip on the hot path, no window between the checks and the claim, and
a full limit (429) leaves the token unused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
from starlette.requests import Request

from shared.bodies import read_limited
from shared.catalog import ModelSpec, Price, Provider
from shared.input_size import MAX_JSON_CONTAINERS, escapes_nul, json_too_complex
from shared.request_id import current_request_id
from shared.revocations import grant_keys
from shared.route_claim import unseal
from shared.stash import stash_key
from shared.store import Admission, Admitted
from shared.tokens import StreamGrant
from stream_edge.cancellation import despite_cancellation
from stream_edge.errors import (
    BadRequest,
    ClientClosedRequest,
    EdgeError,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
)
from stream_edge.grants import TokenUnauthorized, used_key
from stream_edge.limits import slot_keys
from stream_edge.state import EdgeState

MAX_BODY = 1 << 20
# How long a claim whose reply was lost may wait to take its admission back.
UNADMIT_SECONDS = 5.0

logger = logging.getLogger("llmgw.edge.admission")


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


@dataclass(frozen=True, slots=True)
class Route:
    model: ModelSpec
    provider: Provider
    api_key: str | None  # the company's own key; None: the platform's, if any
    # The company's whole key pool (issue 16.1); empty: the platform's keys.
    api_keys: tuple[str, ...] = ()
    # What this model's input estimate and output may be (the grant's, or its
    # fallback entry's: a fallback may allow less output).
    max_input_tokens: int = 0
    max_tokens: int = 0


def route(state: EdgeState, grant: StreamGrant) -> Route:
    """Where the stream goes: the company's sealed route from the token when it has
    its own key or model, else the packaged catalog (no control-plane lookup either way)."""
    found = _route(
        state, grant, grant.model, grant.sealed_route, grant.max_input_tokens, grant.max_tokens
    )
    if found is None:
        raise NotFound(
            f"model {grant.model!r} is not in this edge's catalog", code="model_not_found"
        )
    return found


def fallback_routes(state: EdgeState, grant: StreamGrant) -> list[Route]:
    """The grant's fallback chain (issue 16.2), as signed at init, in order. An entry
    this edge cannot route (a catalog out of step) is left out, not fatal."""
    routes = []
    for entry in grant.fallbacks:
        found = _route(
            state,
            grant,
            entry.model,
            entry.sealed_route,
            entry.max_input_tokens,
            entry.max_tokens or grant.max_tokens,
        )
        if found is not None:
            routes.append(found)
    return routes


def _route(
    state: EdgeState,
    grant: StreamGrant,
    model_id: str,
    sealed_route: str | None,
    max_input_tokens: int,
    max_tokens: int,
) -> Route | None:
    catalog = state.settings.catalog
    if sealed_route is not None:
        try:
            sealed = unseal(sealed_route, state.route_cipher)
        except ValueError:
            state.metrics.token_rejections.labels("bad_route").inc()
            raise Unauthorized("the token's route is not valid", code="invalid_token") from None
        known = catalog.providers.get(sealed.provider)
        if known is not None and known.api_type == sealed.api_type:
            provider = dataclasses.replace(known, base_url=sealed.base_url.rstrip("/"))
        else:
            provider = Provider(sealed.provider, sealed.api_type, sealed.base_url.rstrip("/"))
        model = ModelSpec(
            id=model_id,
            provider=provider.name,
            upstream_model=sealed.upstream_model,
            # Routes sealed before they carried it: only what the token holds, and
            # no file is sent on them (`requests.fit_chat_body`).
            context_length=sealed.context_length or max_input_tokens + max_tokens + 1,
            max_output_tokens=max_tokens,
            price=Price(Decimal(0), Decimal(0)),  # the control plane prices; the edge meters
            features=sealed.features,
            image_input_tokens=sealed.image_input_tokens,
        )
        return Route(model, provider, sealed.api_key, sealed.keys(), max_input_tokens, max_tokens)
    spec = catalog.model(model_id)
    if spec is None:
        return None
    return Route(spec, catalog.providers[spec.provider], None, (), max_input_tokens, max_tokens)


async def claim(
    state: EdgeState, grant: StreamGrant, path: str, *, fetch: bool = False
) -> Admitted:
    """Single use: verdict `ok` on first use (the caller now runs the stream; the
    stream's concurrency slots, keyed by jti, are taken and released by its report),
    `reconnect` on a reconnect to the same path (nothing taken). A revoked token, a
    token used on another path, a token the store no longer knows (401) and a full
    limit (429) raise.

    A first use needs the request init stashed before it minted the token: a store
    that lost it (restarted empty, a new instance, evicted) lost the token's used
    mark too, and cannot tell a first use from a replay or a reconnect. Refused, such
    a token is not reported either: its stream may be running on an edge, and a
    report under its webhook id would settle the hold before that stream's own
    (which would then be a duplicate, its answer unbilled). An unused one's hold is
    released by the sweeper at its deadline.

    `fetch`: the stashed request comes back in the same round trip on first use.

    The admission carries a nonce of this request's own (random, never the token's):
    a store client that retries the script after losing its reply gets `ok` again
    rather than this request's own use refused. When the call fails or is cancelled
    all the same, the store may have run it: `_take_back` undoes it, so the client
    can retry with its token and its slots are not held until their expiry. So is an
    admission too few Redis replicas acknowledged (LLMGW_REDIS_MIN_REPLICA_ACKS:
    `ReplicaAckMissing`): a failover could lose it, so its stream must not start."""
    now = time.time()
    stashed = stash_key(grant.company_id, grant.jti)
    admission = Admission(
        revocation_keys=grant_keys(grant),
        used_key=used_key(grant.company_id, grant.jti),
        path=path,
        used_ttl_seconds=max(1, grant.expires_at - int(now) + 60),
        slot_keys=slot_keys(grant),
        limits=state.limits.limits,
        member=grant.jti,
        now=now,
        slots_expire_at=now + state.settings.max_stream_seconds,
        fetch_key=stashed if fetch else None,
        issued_key=stashed,
        nonce=secrets.token_urlsafe(16),
    )
    try:
        admitted = await state.store.admit(admission)
    except BaseException:
        await _take_back(state, admission)
        raise
    if admitted.verdict == "revoked":
        state.metrics.token_rejections.labels("revoked").inc()
        raise Unauthorized("this stream's access was revoked", code="revoked")
    if admitted.verdict == "used":
        state.metrics.token_rejections.labels("used").inc()
        raise Unauthorized("this stream token was already used", code="token_used")
    if admitted.verdict == "unknown":
        state.metrics.token_rejections.labels("unknown").inc()
        raise Unauthorized(
            "the gateway's store has no record of this stream token (it lost its data):"
            " it cannot be shown unused; ask for a new one",
            code="token_unknown",
        )
    if admitted.verdict == "full":
        raise state.limits.too_many(admitted.full_index)
    if admitted.verdict == "ok":
        # Not on `reconnect`: that stash is another admission's, still needed by
        # its take-back (a lost reply) and its retry.
        _forget_stash(state, stashed)
    return admitted


# The deletions `_forget_stash` started, kept referenced until they end.
_forgetting: set[asyncio.Task[None]] = set()


def _forget_stash(state: EdgeState, stashed: str) -> None:
    """The admission kept the stash (for a repeat after a lost reply, or for
    `_take_back`); its reply arrived, so neither can happen now: delete it, without
    holding up the stream (a started stream's request must not sit in the store for
    `REPEAT_SECONDS`, up to ``LLMGW_MAX_REQUEST_BYTES`` each). If the store fails,
    the stash's expiry removes it."""
    task = asyncio.create_task(_delete_quietly(state, stashed))
    _forgetting.add(task)
    task.add_done_callback(_forgetting.discard)


async def _delete_quietly(state: EdgeState, key: str) -> None:
    try:
        await state.store.delete(key)
    except Exception as exc:
        logger.warning("could not delete a started stream's stash (%s)", type(exc).__name__)


async def _take_back(state: EdgeState, admission: Admission) -> None:
    """Best effort, bounded, and run to its end whatever cancels the request (a
    cancelled request is the likeliest to have lost its reply): removes only a used
    mark carrying this request's nonce, so it cannot reopen a token another request
    used. If the store cannot be reached, the token stays used and its slots expire
    with the stream's maximum life."""
    await despite_cancellation(_unadmit(state, admission))


async def _unadmit(state: EdgeState, admission: Admission) -> None:
    try:
        async with asyncio.timeout(UNADMIT_SECONDS):
            if await state.store.unadmit(admission):
                logger.info("a failed claim was taken back (reply lost, or replicas behind)")
    except Exception as exc:  # the store down or slow (TimeoutError) too
        logger.warning("could not take back a failed claim (%s)", type(exc).__name__)


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The raw body, refusing more than `limit` bytes (413) without buffering them."""
    return await read_limited(
        request, limit, PayloadTooLarge, lambda: ClientClosedRequest("the client left mid-body")
    )


async def read_json(request: Request) -> Any:
    body = await read_body(request)
    # Before the parse (it builds an object per array and object): counted on the bytes.
    if json_too_complex(body):
        raise BadRequest(
            f"the request body has more than {MAX_JSON_CONTAINERS} arrays and objects",
            code="json_too_complex",
        )
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("the request body is not valid JSON", code="invalid_json") from None
    # Refused like the control plane's input (DESIGN §11), before the token is claimed
    # or the backend called: a NUL would go upstream and into the transcript.
    if escapes_nul(body):
        raise BadRequest(
            "the request contains a NUL character (\\u0000), which is not accepted",
            code="invalid_characters",
        )
    return doc
