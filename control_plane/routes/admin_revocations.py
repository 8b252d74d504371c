"""``/v1/admin/revocations``: revoke a user, a company or one stream token (`revoking`)."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control_plane import account_admin, policy, revoking
from control_plane.auth import authenticate, caller_and_json
from control_plane.deps import get_deps, path_id
from control_plane.errors import ServiceUnavailable
from control_plane.middleware import request_id
from control_plane.pagination import page_request
from control_plane.responses import no_content, ok
from control_plane.revocation_republish import withdraw
from control_plane.validation import optional_str
from shared.revocations import revoke

log = logging.getLogger("control_plane.revocations")


async def create_revocation(request: Request) -> Response:
    """Revoke a user, a company or one stream token (jti)."""
    principal, doc = await caller_and_json(request)
    target = revoking.parse_target(doc)
    reason = optional_str(doc, "reason", max_len=500)
    deps = get_deps(request)
    ttl = revoking.revocation_ttl(deps.settings)
    actor = account_admin.Actor(principal, request_id(request))
    row = await deps.db.transaction(
        lambda s: account_admin.create_revocation(s, actor, target, reason, ttl)
    )
    assert row.company_id is not None  # a revocation is always of a company's subject
    try:
        await revoke(deps.store, target.kind, target.value, row.company_id, ttl)
    except Exception:
        # The record and the disabled flag are committed (new inits are refused);
        # only the edges' signal is missing. Repeating the request is safe.
        log.exception("could not publish revocation %s to the store", row.id)
        raise ServiceUnavailable(
            "The revocation is recorded but the edges could not be told; retry."
        ) from None
    return ok(revoking.revocation_public(row), 201)


async def lift_revocation(request: Request) -> Response:
    """Lift a revocation: re-enable the user or company, forget the token (unless
    another revocation of the same target is still in force)."""
    principal = await authenticate(request)
    revocation_id = path_id(request, "revocation_id")
    deps = get_deps(request)
    actor = account_admin.Actor(principal, request_id(request))
    lifted = await deps.db.transaction(
        lambda s: account_admin.lift_revocation(s, actor, revocation_id)
    )
    row = lifted.row
    assert row.company_id is not None  # lift_revocation refuses one without
    if lifted.still_revoked:  # another revocation of the target keeps the edges' key
        return no_content()
    try:
        await withdraw(deps.db, deps.store, [row], revoking.revocation_ttl(deps.settings))
    except Exception:
        log.exception("could not remove revocation %s from the store", row.id)
        raise ServiceUnavailable("The store or the database is unavailable; retry.") from None
    return no_content()


async def list_revocations(request: Request) -> Response:
    """Revocations, newest first (platform admin: all or one company; owner: its own)."""
    principal = await authenticate(request)
    company_id = optional_str(dict(request.query_params), "company_id", max_len=64)
    if company_id is None and not policy.is_platform_admin(principal):
        company_id = principal.company_id
    req = page_request(request.query_params)
    page = await get_deps(request).db.transaction(
        lambda s: revoking.list_revocations(s, principal, company_id, req)
    )
    return ok(page.public(revoking.revocation_public))


routes: list[BaseRoute] = [
    Route("/v1/admin/revocations", create_revocation, methods=["POST"]),
    Route("/v1/admin/revocations", list_revocations, methods=["GET"]),
    Route("/v1/admin/revocations/{revocation_id}", lift_revocation, methods=["DELETE"]),
]
