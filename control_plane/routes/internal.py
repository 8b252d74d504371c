"""Internal endpoints the stream edge calls for its API-key callers (issue 16.5).

Not public API and not in ``/openapi.json``: each call must be signed by an edge
with ``LLMGW_EDGE_SERVICE_SECRET`` (`shared.service_calls`), once (its id is a
nonce), and carries the caller's key as its SHA-256 (``key_hash``), never the key.
An unsigned call is 401 ``invalid_signature`` before the body is parsed or the key
looked up. The key is looked up next, by the hash the edge also sends in a header
(``KEY_HASH_HEADER``), before the body is parsed: an unknown or revoked key
(``Bearer sk_<anything>`` at the edge, with a body of up to 1 MiB) costs one indexed
read, not a parse. The header is not signed, so the signed body's ``key_hash`` must
equal it. The nonce is recorded once the key is found live, before anything is
held: a call for an unknown key leaves no key in the store, and its replay is
refused like the call itself.

The init is the public one (`chat.serve_init` → `init_chat`): the key's scopes,
revocation, the init rates, TPM, pending-init caps, budgets and the hold all apply
exactly as at ``POST /v1/chat/init``; only how the caller is named differs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control_plane import db_shares
from control_plane.auth import api_key_principal, api_key_row
from control_plane.deps import MAX_BODY_BYTES, Deps, get_deps, read_body
from control_plane.errors import InvalidSignature, Unauthenticated, ValidationFailed
from control_plane.policy import Principal
from control_plane.responses import ok
from control_plane.routes.account import models_data
from control_plane.routes.chat import serve_init
from control_plane.validation import parse_json_object
from shared.service_calls import (
    INIT_PATH,
    KEY_HASH_HEADER,
    MODELS_PATH,
    NONCE_TTL_SECONDS,
    nonce_key,
    verify_call,
)
from shared.webhooks import BadSignature

_KEY_HASH = re.compile(r"[0-9a-f]{64}")
# The edge's own body limit plus the wrapping: what an edge can legitimately send.
MAX_CALL_BYTES = 2 * MAX_BODY_BYTES


@dataclass(frozen=True, slots=True)
class EdgeCall:
    call_id: str
    key_hash: str
    doc: dict[str, Any]
    # Found before the body was parsed (the edge named the key in its header).
    principal: Principal | None = None


async def edge_call(request: Request, deps: Deps) -> EdgeCall:
    """The signed call, or 401 (nothing of an unsigned body is parsed). A key named
    in the header is looked up before the body is parsed: unknown or revoked, 401
    at the cost of one indexed read. Its nonce is claimed by `key_principal`."""
    body = await read_body(request, MAX_CALL_BYTES)
    secrets = [s.reveal() for s in deps.settings.edge_service_secrets]
    try:
        call_id = verify_call(secrets, body, dict(request.headers))
    except BadSignature:
        raise InvalidSignature("This endpoint is for the stream edge only.") from None
    named = request.headers.get(KEY_HASH_HEADER)
    principal = None
    if named is not None:  # an edge of an earlier release names it only in the body
        if not _KEY_HASH.fullmatch(named):
            raise InvalidSignature("This call's key hash header is not a SHA-256.")
        principal = await live_key(deps, named)
    doc = parse_json_object(body)
    key_hash = doc.get("key_hash")
    if not isinstance(key_hash, str) or not _KEY_HASH.fullmatch(key_hash):
        raise ValidationFailed("key_hash", "must be the key's SHA-256 in hex")
    if named is not None and key_hash != named:
        # Only the body is signed: the header must name the same key.
        raise InvalidSignature("This call's key hash header does not match its body.")
    return EdgeCall(call_id, key_hash, doc, principal)


async def live_key(deps: Deps, key_hash: str) -> Principal:
    """The caller of the live key with this hash; 401 if it is unknown or revoked.
    The call's later database work counts against its company's share, as a
    bearer's does (`auth.authenticate`, `db_shares`)."""
    principal = await deps.db.lookup(lambda on: api_key_row(on, key_hash), api_key_principal)
    if principal is None:
        raise Unauthenticated("The API key is unknown or revoked.")
    db_shares.acting_for(principal.company_id)
    return principal


async def key_principal(deps: Deps, call: EdgeCall) -> Principal:
    """The live key's caller, then the call's nonce (a replay is refused even within
    the signature's window). Only then: anonymous `sk_<random>` calls at the edge
    would otherwise each leave a nonce in the store for 10 minutes, and replaying a
    call for a key that is not live gets nothing anyway."""
    principal = call.principal
    if principal is None:
        principal = await live_key(deps, call.key_hash)
    if not await deps.store.set_if_absent(nonce_key(call.call_id), b"1", NONCE_TTL_SECONDS):
        raise InvalidSignature("This call was already made once.")
    return principal


async def edge_chat_init(request: Request) -> Response:
    """Init for an edge's API-key caller (internal)."""
    deps = get_deps(request)
    call = await edge_call(request, deps)

    async def arrived(_: Request) -> tuple[Principal, dict[str, Any]]:
        # The edge's call is read whole (`edge_call`); `serve_init` asks for its
        # caller before it parses the init or holds.
        return await key_principal(deps, call), call.doc

    def body(doc: dict[str, Any]) -> dict[str, Any]:
        init = doc.get("request")
        if not isinstance(init, dict):
            raise ValidationFailed("request", "must be an object")
        return init

    return await serve_init(request, arrived, body)


async def edge_models(request: Request) -> Response:
    """The model catalog of an edge's API-key caller (internal)."""
    deps = get_deps(request)
    call = await edge_call(request, deps)
    principal = await key_principal(deps, call)
    return ok(await models_data(deps, principal, None))


routes: list[BaseRoute] = [
    Route(INIT_PATH, edge_chat_init, methods=["POST"], include_in_schema=False),
    Route(MODELS_PATH, edge_models, methods=["POST"], include_in_schema=False),
]
