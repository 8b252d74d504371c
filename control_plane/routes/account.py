"""Login, logout, who am I, and the model catalog."""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control_plane import login_limits, logout, profile, revoking
from control_plane.accounts import find_user_signing_in
from control_plane.auth import (
    ACCESS_TOKEN_TTL_SECONDS,
    authenticate,
    caller_and_body,
    issue_access_token,
)
from control_plane.company_llm import CompanyCatalog
from control_plane.credentials import verify_password
from control_plane.deps import Deps, get_deps, read_json
from control_plane.emails import EMAIL_MAX, canonical_email
from control_plane.errors import (
    Forbidden,
    InvalidCredentials,
    LoginsBusy,
    ServiceUnavailable,
    ValidationFailed,
)
from control_plane.password_checks import BUSY_RETRY_AFTER_S, login_owner
from control_plane.policy import Principal
from control_plane.responses import ok
from control_plane.validation import optional_str, parse_json_object, required_str
from shared.catalog import Catalog
from shared.pricing import format_credits
from shared.revocations import revoke

log = logging.getLogger("control_plane.logout")

PASSWORD_MAX = 1024


async def login(request: Request) -> Response:
    deps = get_deps(request)
    doc = await read_json(request)
    typed = required_str(doc, "email", max_len=EMAIL_MAX)
    # Every spelling of one address is one account and one count (`emails`).
    email = canonical_email(typed)
    password = required_str(doc, "password", max_len=PASSWORD_MAX)
    checks = deps.password_checks
    host = request.client.host if request.client else None
    # Refused before the counters: a flood costs the store nothing, and a host at its
    # share of the checks takes no place for its lookups. The share is the client's
    # address: an account's existence must not change it, nor an owner's choice of
    # its members' email domains (`login_owner`).
    owner = login_owner(host)
    if checks.refuses(owner):
        raise LoginsBusy(BUSY_RETRY_AFTER_S)
    # Counted before the argon2 verify: a refused guess costs no hashing CPU.
    attempt = await login_limits.claim_attempt(
        deps.store,
        email=email,
        address=login_limits.client_bucket(host),
        site=login_limits.site_bucket(host),
        limit=deps.settings.login_failures_per_15min,
        now=deps.clock(),
        per_minute=deps.settings.login_rate_per_account,
    )
    try:
        async with checks.place():
            user = await deps.db.transaction(lambda s: find_user_signing_in(s, typed))
            # An unknown email is verified too (against a dummy hash): same answer, same
            # time, same place in the queue. Skipping argon2 for it answered ~50x
            # faster, telling who has an account.
            password_hash = user.password_hash if user is not None else None
            # In its address's turn and share of the checks.
            verified = await checks.run(verify_password, password_hash, password, owner=owner)
    except Exception:
        # Nothing was checked (every place taken, or the lookup failed: 503s): the
        # attempt counts as no failure and no sign-in, or a user retrying through a
        # database blip is locked out once it is back. A cancelled login stays
        # counted: its check may run on, and a guesser must not get it for free.
        await login_limits.withdraw(deps.store, attempt)
        raise
    if user is None or not verified:
        # Only sign-ins count as logins of the account: a wrong password (or an
        # unknown email) is the failure limit's, so the two meet the same limits.
        await login_limits.not_a_login(deps.store, attempt)
        raise InvalidCredentials()
    await login_limits.forgive(deps.store, attempt)
    await deps.db.transaction(lambda s: profile.check_not_revoked(s, user))
    await deps.fresh_keyring()
    token = issue_access_token(deps, user.id, user.sign_in_epoch)
    return ok(
        {"access_token": token, "token_type": "bearer", "expires_in": ACCESS_TOKEN_TTL_SECONDS}
    )


async def sign_out(request: Request) -> Response:
    """Sign out: end the access token sent, and the stream tokens it minted.

    Idempotent: a repeat with the same token answers the same (`logout`)."""
    principal, body = await caller_and_body(request, signed_out_ok=True)
    # No parameter names a token: only the one presented can be ended.
    if body.strip() and parse_json_object(body):
        raise ValidationFailed("body", "logout takes no fields: it ends the token it is sent with")
    company_id, token_id, expires_at = logout.session_of(principal)
    deps = get_deps(request)
    stream_life = revoking.revocation_ttl(deps.settings)
    ttl = logout.revocation_seconds(expires_at, deps.wall_clock(), stream_life)
    await deps.db.transaction(
        lambda s: logout.record_logout(s, principal, company_id, token_id, ttl)
    )
    try:
        # Published on every call, so a retry after a store failure completes it. The
        # edges need it only as long as a stream token minted before it can live (the
        # row refuses new mints): the token's own life could pass Redis's longest
        # expiry (a "never expires" external JWT), and its key would outlive it.
        await revoke(deps.store, "jti", token_id, company_id, stream_life)
    except Exception:
        # The record is committed: the control plane refuses the token already; only
        # the edges (its stream tokens) are not told yet. Repeating is safe.
        log.exception("could not publish a sign-out to the store")
        raise ServiceUnavailable(
            "The sign-out is recorded but the edges could not be told; retry."
        ) from None
    return ok({"signed_out": True})


async def me(request: Request) -> Response:
    principal = await authenticate(request)
    if principal.user_id is None:
        raise Forbidden("The platform admin token has no user.")
    user_id, api_key_id = principal.user_id, principal.api_key_id
    found = await get_deps(request).db.transaction(lambda s: profile.me(s, user_id, api_key_id))
    if found is None:
        raise InvalidCredentials("Your user no longer exists.")
    user, company, budgets = found
    available = company.balance_micro - company.held_micro
    return ok(
        {
            "user": {"id": user.id, "email": user.email, "role": user.role},
            "company": {"id": company.id, "name": company.name},
            "credits": {
                "balance": format_credits(company.balance_micro),
                "held": format_credits(company.held_micro),
                "available": format_credits(available),
            },
            "budgets": [
                {
                    k: b[k]
                    for k in ("id", "scope", "amount", "spent", "held", "available", "resets_at")
                }
                for b in budgets
            ],
        }
    )


async def models(request: Request) -> Response:
    """The company's model catalog: the packaged one merged with its overrides."""
    principal = await authenticate(request)
    provider = optional_str(dict(request.query_params), "provider", max_len=100)
    return ok(await models_data(get_deps(request), principal, provider))


async def models_data(deps: Deps, principal: Principal, provider: str | None) -> dict[str, Any]:
    """`/v1/models`'s data for `principal` (also the edge's, issue 16.5)."""
    catalog = deps.settings.catalog
    view: Catalog | CompanyCatalog = catalog
    if principal.company_id is not None:
        company_id = principal.company_id
        found = await deps.db.transaction(lambda s: profile.company_models(s, catalog, company_id))
        if found is not None:
            view = found
    listed = [
        spec.public()
        for spec in view.models.values()
        if provider is None or spec.provider == provider
    ]
    return {"models": listed, "default_model": view.default_model}


routes: list[BaseRoute] = [
    Route("/v1/auth/login", login, methods=["POST"]),
    Route("/v1/auth/logout", sign_out, methods=["POST"]),
    Route("/v1/me", me, methods=["GET"]),
    Route("/v1/models", models, methods=["GET"]),
]
