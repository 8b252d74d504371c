"""Callers with a gateway API key (``sk_…``) instead of a stream token (issue 16.5).

Server code written for the OpenAI SDK has one long-lived key and makes one call.
For such a caller the edge does the init itself: one signed internal call to the
control plane (`shared.service_calls`: the key's SHA-256 in a body signed with
``LLMGW_EDGE_SERVICE_SECRET``, never the key) returns a stream token, which the edge
verifies like any other. From there the request is served by the stream-token path
unchanged: same grant checks, limits, claim, relay, usage report and settlement.

Nothing is cached: every call is an init, so a revoked key, user or company is
refused by the control plane at once, and budgets, init rates and TPM apply as for a
public init. A hold whose stream then does not start (the body does not fit the
grant, the stream limit is full: 429) is given back at once by a `failed` usage
report with no tokens (`abandon`), not left to the sweeper. So is one whose
request is cancelled (the caller gone, the server's shutdown) while the control
plane inits for it: the control plane holds whatever happens to the request, so
its answer is still awaited (`despite_cancellation`) and a token it minted
abandoned; a refusal held nothing and is dropped.

The pure part — translating OpenAI's body into an init request (`init_request`),
mapping a refusal to an OpenAI-shaped error (`refusal`), the models list
(`openai_models`) — is tested with tables; `ControlPlaneLink` is the I/O.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import jwt
import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shared.request_id import current_request_id
from shared.sampling import SAMPLING_PARAMS
from shared.service_calls import (
    INIT_PATH,
    KEY_HASH_HEADER,
    MODELS_PATH,
    is_api_key,
    key_digest,
    signed_headers,
)
from shared.store import SlotRelease
from shared.tokens import StreamGrant
from stream_edge.admission import bearer, edge_state, verified_grant
from stream_edge.cancellation import despite_cancellation
from stream_edge.errors import BadRequest, EdgeError, InitRefused, ServiceUnavailable, Unauthorized
from stream_edge.http1 import Http1Client
from stream_edge.limits import slot_keys
from stream_edge.meter import Meter
from stream_edge.requests import chat_object
from stream_edge.settings import EdgeSettings
from stream_edge.state import EdgeState
from stream_edge.transport import Transport, TransportError
from stream_edge.usage_report import usage_event

log = logging.getLogger("llmgw.edge.keys")

# What an init takes from OpenAI's chat body; the rest (stream, stream_options) is
# the edge's business. `max_completion_tokens` is OpenAI's newer name for max_tokens.
INIT_FIELDS = (
    "model",
    "messages",
    *SAMPLING_PARAMS,
    "tools",
    "tool_choice",
    "parallel_tool_calls",
)


def normalised(body: Any) -> dict[str, Any]:
    """OpenAI's body with its explicit nulls and empty `tools` dropped (both mean
    "not set"), so that the init and the edge size exactly the same parameters: the
    hold's input estimate is the grant's `max_input_tokens`, which the edge checks."""
    body = chat_object(body)
    return {k: v for k, v in body.items() if v is not None and not (k == "tools" and v == [])}


def init_request(body: dict[str, Any]) -> dict[str, Any]:
    """The init body for a normalised OpenAI body. What the edge alone checks later
    (`stream`, `stream_options`, `max_tokens`' type) is checked here first, so a body
    the edge would refuse never takes a hold."""
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("'stream' must be a boolean", code="invalid_stream")
    if not isinstance(body.get("stream_options", {}), dict):
        raise BadRequest("'stream_options' must be an object", code="invalid_stream_options")
    request = {k: body[k] for k in INIT_FIELDS if k in body}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest("'max_tokens' must be a positive integer", code="invalid_max_tokens")
        request["max_tokens"] = max_tokens
    return request


_TYPES = {
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    429: "rate_limit_error",
}


def refusal(status: int, body: bytes, retry_after: str | None) -> EdgeError:
    """The control plane's answer to a refused init as the edge's error: a 4xx keeps
    its status, code and message (402, 403, 404, 413, 429 with its Retry-After…); a
    failure of the control plane itself, or of the edge's own signature, is 503."""
    try:
        doc = orjson.loads(body)
        message = str(doc["message"])
        code = str(doc["error"]["code"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message, code = "", ""
    if code == "invalid_signature" or not 400 <= status < 500 or not code:
        # Not the caller's fault: this edge's service secret is wrong, or the control
        # plane is failing. Logged for the operator; the caller may retry.
        log.error("the control plane refused the edge's call: %s %s", status, code or "?")
        return ServiceUnavailable(
            "the gateway could not start this request; retry shortly",
            code="control_plane_unavailable",
        )
    retry = int(retry_after) if retry_after and retry_after.isdigit() else None
    return InitRefused(
        status, _TYPES.get(status, "invalid_request_error"), message, code, retry_after=retry
    )


def openai_models(data: dict[str, Any]) -> dict[str, Any]:
    """The control plane's `/v1/models` data in OpenAI's list shape."""
    return {
        "object": "list",
        "data": [
            {"id": m["id"], "object": "model", "created": 0, "owned_by": m["provider"]}
            for m in data.get("models", [])
        ],
    }


class ControlPlaneLink:
    """Signed calls to the control plane's internal endpoints: one pooled lean
    client (a short connect; an init may queue behind the database for a while)."""

    def __init__(
        self, client: Transport, base_url: str, secret: str, *, owns_client: bool = True
    ) -> None:
        self._client = client
        self._base_url = base_url
        self._secret = secret
        self._owns_client = owns_client

    @classmethod
    def of(cls, settings: EdgeSettings, client: Transport | None = None) -> ControlPlaneLink | None:
        """`client`: a transport its caller owns (tests: an in-process one); else the
        link opens and closes its own pooled lean client."""
        if not settings.edge_service_secrets:
            return None
        secret = settings.edge_service_secrets[0].reveal()
        if client is not None:
            return cls(client, settings.control_plane_url, secret, owns_client=False)
        client = Http1Client(connect_timeout=5.0, read_timeout=30.0)
        return cls(client, settings.control_plane_url, secret)

    async def call(self, path: str, key: str, extra: dict[str, Any]) -> dict[str, Any]:
        """POST `extra` plus the key's hash; the envelope's `data`, or the refusal."""
        digest = key_digest(key)
        body = orjson.dumps({"key_hash": digest, **extra})
        headers = signed_headers(self._secret, body)
        # Named again outside the body: an unknown key is refused before it is parsed.
        headers[KEY_HASH_HEADER] = digest
        request_id = current_request_id.get()
        if request_id:  # the init's request id, and so the stream's, is the caller's
            headers["x-request-id"] = request_id
        try:
            response = await self._client.send("POST", self._base_url + path, headers, body)
            try:
                answer = await response.aread()
            finally:
                await response.aclose()
        except (TransportError, OSError) as exc:
            log.warning("control plane unreachable: %s", type(exc).__name__)
            raise ServiceUnavailable(
                "the gateway could not start this request; retry shortly",
                code="control_plane_unavailable",
            ) from None
        if response.status_code not in (200, 201):
            raise refusal(response.status_code, answer, response.headers.get("retry-after"))
        data: dict[str, Any] = orjson.loads(answer)["data"]
        return data

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def link(state: EdgeState) -> ControlPlaneLink:
    """The way to the control plane; 401 `api_keys_disabled` when this edge has none
    (checked before a key caller's body is even read)."""
    if state.control_plane is None:
        raise Unauthorized(
            "API keys are not accepted by this edge; use a stream token from /v1/chat/init",
            code="api_keys_disabled",
        )
    return state.control_plane


async def grant_for_key(state: EdgeState, key: str, body: dict[str, Any]) -> StreamGrant:
    """Init for the key's caller; the stream token, verified as any other. A hold
    taken for a request cancelled meanwhile goes back at once (`abandon`)."""
    request = init_request(body)  # a body the edge would refuse is refused first
    # Its own task: once sent, the init may hold whatever happens to this request.
    init = asyncio.ensure_future(link(state).call(INIT_PATH, key, {"request": request}))
    try:
        data = await asyncio.shield(init)
    except asyncio.CancelledError:
        await despite_cancellation(_abandon_when_answered(state, init))
        raise
    token = str(data["stream_token"])
    try:
        return await verified_grant(state, token)
    except (EdgeError, asyncio.CancelledError):
        # Our own control plane's token does not verify here (a key rotation racing,
        # a misconfigured JWKS URL), or the request was cancelled while it was
        # checked (a JWKS refresh): the hold goes back now.
        await despite_cancellation(abandon(state, unverified_grant(token)))
        raise


def unverified_grant(token: str) -> StreamGrant:
    """The grant our own control plane just minted, read without its signature: only
    to name the hold `abandon` gives back."""
    return StreamGrant.from_claims(jwt.decode(token, options={"verify_signature": False}))


async def _abandon_when_answered(state: EdgeState, init: asyncio.Future[dict[str, Any]]) -> None:
    """The init's answer for a request already cancelled: a token is a hold, given
    back; a refusal or a failed call took none this edge can name. Counted as a
    report owed, so that a shutdown's last outbox flush waits for it (bounded)."""
    state.reports_owed += 1
    try:
        try:
            data = await init
        except Exception:  # refused, unreachable, or no answer: nothing to give back
            return
        await abandon(state, unverified_grant(str(data["stream_token"])))
    finally:
        state.reports_owed -= 1


async def abandon(state: EdgeState, grant: StreamGrant) -> None:
    """Give back the hold of a grant whose stream will not start: a `failed` report
    with no tokens, which settles it charging nothing (DESIGN §9 "What is billed"),
    through the outbox like every report (durable, retried)."""
    spec = state.settings.catalog.model(grant.model)
    provider = spec.provider if spec is not None else "custom"
    # Nothing was asked of a backend: a meter that counted nothing, no transcript.
    nothing = Meter(input_estimate=0, keep_transcript=False)
    # Ended on the store's clock, as every report (`usage_report.usage_event`).
    event = usage_event(grant, provider, nothing, "failed", ended=state.store_clock())
    # Slots are taken only by a successful claim, after which nothing abandons; a
    # release of slots never taken is a no-op, so it is passed for safety.
    release = SlotRelease(slot_keys(grant), grant.jti)
    try:
        await state.outbox.enqueue(event, release)
    except Exception as exc:  # the store is down: the spool keeps it
        log.warning("enqueueing an abandoned hold failed (%s)", type(exc).__name__)
        await state.outbox.keep(event, release)


async def list_models(request: Request) -> Response:
    """`GET /v1/models`: OpenAI's list. An API key: its company's catalog (asked of
    the control plane each time); a stream token: the one model it grants."""
    state = edge_state(request)
    token = bearer(request)
    if is_api_key(token):
        assert token is not None
        data = await link(state).call(MODELS_PATH, token, {})
        return JSONResponse(openai_models(data))
    grant = await verified_grant(state, token)
    spec = state.settings.catalog.model(grant.model)
    listed = [{"id": grant.model, "provider": spec.provider if spec else "custom"}]
    return JSONResponse(openai_models({"models": listed}))
