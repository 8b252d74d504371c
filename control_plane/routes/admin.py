"""``/v1/admin/…``: companies, users, API keys, signing keys (credits and the audit
log are in `admin_credits`).

The platform admin may do all of it; an owner may manage its own company's users
and API keys (`policy`). Creates answer 201, deletes 204.
"""

from __future__ import annotations

import logging

from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control_plane import account_admin, accounts, policy, retired_announce, revoking
from control_plane.auth import (
    authenticate,
    caller_and_body,
    caller_and_json,
)
from control_plane.credentials import hash_password
from control_plane.deps import get_deps, path_id
from control_plane.emails import EMAIL_MAX, normalise_email
from control_plane.errors import Conflict, Forbidden, ServiceUnavailable, ValidationFailed
from control_plane.middleware import request_id
from control_plane.pagination import page_request
from control_plane.password_checks import company_owner
from control_plane.policy import Principal
from control_plane.responses import no_content, ok
from control_plane.retired_announce import max_token_life
from control_plane.tables import ROLES, utcnow
from control_plane.validation import (
    credits_amount,
    one_of,
    optional_str,
    parse_json_object,
    required_str,
)
from shared.revocations import api_key_parent, revoke

log = logging.getLogger("control_plane.admin")

PASSWORD_MIN, PASSWORD_MAX = 4, 1024


def _actor(request: Request, principal: Principal) -> account_admin.Actor:
    return account_admin.Actor(principal, request_id(request))


def _check_password(password: object) -> None:
    if not isinstance(password, str) or not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        raise ValidationFailed(
            "password", f"must be a string of {PASSWORD_MIN}-{PASSWORD_MAX} characters"
        )
    if not password.strip():  # login refuses a blank one: the user could never sign in
        raise ValidationFailed("password", "must not be blank")


async def _hashed(request: Request, principal: Principal, password: str) -> str:
    checks = get_deps(request).password_checks
    async with checks.place():  # the same argon2 cost as a login's verify, in the
        # caller's company's turn and share (an owner creating users at will)
        return await checks.run(hash_password, password, owner=company_owner(principal.company_id))


async def create_company(request: Request) -> Response:
    principal, doc = await caller_and_json(request)
    if not policy.can_create_company(principal):
        raise Forbidden("Only a platform admin can create companies.")
    name = required_str(doc, "name", max_len=200).strip()
    credits = doc.get("credits")
    micro = 0 if credits is None else credits_amount(credits, "credits")
    if micro < 0:
        raise ValidationFailed("credits", "must not be negative")
    actor = _actor(request, principal)
    try:
        company = await get_deps(request).db.transaction(
            lambda s: account_admin.create_company(s, actor, name, micro)
        )
    except IntegrityError:
        raise Conflict(f"A company named {name!r} already exists.") from None
    return ok(accounts.company_public(company), 201)


async def list_companies(request: Request) -> Response:
    """Companies, newest first (platform admin)."""
    principal = await authenticate(request)
    req = page_request(request.query_params)
    page = await get_deps(request).db.transaction(
        lambda s: accounts.list_companies(s, principal, req)
    )
    return ok(page.public(accounts.company_public))


async def create_user(request: Request) -> Response:
    principal, doc = await caller_and_json(request)
    company_id = required_str(doc, "company_id", max_len=64)
    email = normalise_email(required_str(doc, "email", max_len=EMAIL_MAX))
    role = one_of(doc.get("role", "member"), "role", ROLES)
    password = doc.get("password")
    password_hash = None
    if password is not None:
        _check_password(password)
        # Refused callers cost no argon2 (the use case checks again, in its transaction).
        if not policy.can_admin_company(principal, company_id):
            raise Forbidden("You cannot add users to this company.")
        if not policy.can_assign_role(principal, role):
            raise Forbidden(f"You cannot create a user with role {role}.")
        password_hash = await _hashed(request, principal, password)
    actor = _actor(request, principal)
    try:
        user = await get_deps(request).db.transaction(
            lambda s: account_admin.create_user(
                s, actor, company_id=company_id, email=email, password_hash=password_hash, role=role
            )
        )
    except IntegrityError:
        raise Conflict("A user with this email already exists.") from None
    return ok(accounts.user_public(user), 201)


async def list_users(request: Request) -> Response:
    """A company's users (at or below the caller's rank), newest first; ``?company_id=``."""
    principal = await authenticate(request)
    query = dict(request.query_params)
    company_id = optional_str(query, "company_id", max_len=64) or principal.company_id
    if company_id is None:
        raise ValidationFailed("company_id", "is required for the platform admin token")
    req = page_request(query)
    page = await get_deps(request).db.transaction(
        lambda s: accounts.list_users(s, principal, company_id, req)
    )
    return ok(page.public(accounts.user_listed))


async def update_user(request: Request) -> Response:
    """Change a user's role within the caller's rank (a password only with one to admin).

    A promotion to platform admin ends the user's password, sign-ins and API keys
    (`accounts.set_role`); ``"password"`` gives it a new one, the platform admin's
    choice."""
    principal, doc = await caller_and_json(request)
    user_id = path_id(request, "user_id")
    unknown = sorted(set(doc) - {"role", "password"})
    if unknown:
        raise ValidationFailed(unknown[0], "is not a field (role, password)")
    role = one_of(doc.get("role"), "role", ROLES)
    password_hash = None
    if doc.get("password") is not None:
        _check_password(doc["password"])
        # Refused before argon2 (the use case checks again, against the user's role).
        if not policy.can_assign_role(principal, "admin"):
            raise Forbidden("Only a platform admin sets a password, with a promotion to admin.")
        if role != "admin":
            raise ValidationFailed("password", "is set only with a promotion to admin")
        password_hash = await _hashed(request, principal, doc["password"])
    actor = _actor(request, principal)
    deps = get_deps(request)
    change = await deps.db.transaction(
        lambda s: account_admin.set_role(s, actor, user_id, role, password_hash)
    )
    if change.voided:
        # The keys a promotion revoked end their stream tokens at the edges as
        # `DELETE /v1/admin/api-keys/{id}` does. The role change is committed either
        # way; a failed publish is made by the republishing pass within seconds
        # (`revocation_republish`: API keys revoked within the revocation TTL).
        ttl = revoking.revocation_ttl(deps.settings)
        company_id = change.user.company_id
        try:
            for row, _ in change.voided:
                await revoke(deps.store, "jti", api_key_parent(row.id), company_id, ttl)
        except Exception:
            log.exception("could not publish the revocation of a promoted user's keys")
    return ok(accounts.user_public(change.user))


async def create_api_key(request: Request) -> Response:
    principal, doc = await caller_and_json(request)
    user_id = required_str(doc, "user_id", max_len=64)
    scopes = doc.get("scopes")
    actor = _actor(request, principal)
    created = await get_deps(request).db.transaction(
        lambda s: account_admin.create_api_key(s, actor, user_id, scopes)
    )
    return ok(created.public(), 201)


async def list_api_keys(request: Request) -> Response:
    """API keys (prefix, scopes, last use), newest first; ``?user_id=`` or ``?company_id=``."""
    principal = await authenticate(request)
    query = dict(request.query_params)
    user_id = optional_str(query, "user_id", max_len=64)
    company_id = optional_str(query, "company_id", max_len=64)
    req = page_request(query)
    page = await get_deps(request).db.transaction(
        lambda s: accounts.list_api_keys(
            s, principal, user_id=user_id, company_id=company_id, req=req
        )
    )
    return ok(page.public(accounts.api_key_public))


async def revoke_api_key(request: Request) -> Response:
    principal = await authenticate(request)
    key_id = path_id(request, "key_id")
    actor = _actor(request, principal)
    deps = get_deps(request)
    company_id, jtis = await deps.db.transaction(
        lambda s: account_admin.revoke_api_key(s, actor, key_id)
    )
    # The stream tokens the key minted outlived it: a leaked key's thief started
    # them, and resumed them, after the revocation. Each names the key as its parent
    # (`api_key_parent`), revoked at the edges as `POST /v1/admin/revocations
    # {"jti"}` would (refused, or ended `revoked`): that reaches a token whose hold
    # commits after the look-up below, too. The look-up's own ids cover tokens
    # minted before their parent was signed in. Published on every call (a repeat is
    # a no-op in the database), so a retry after a store failure completes it.
    ttl = revoking.revocation_ttl(deps.settings)
    try:
        await revoke(deps.store, "jti", api_key_parent(key_id), company_id, ttl)
        for jti in jtis:
            await revoke(deps.store, "jti", jti, company_id, ttl)
    except Exception:
        log.exception("could not publish an API key's stream tokens' revocation")
        raise ServiceUnavailable(
            "The key is revoked but the edges could not be told to end its streams; retry."
        ) from None
    return no_content()


async def rotate_signing_key(request: Request) -> Response:
    principal, body = await caller_and_body(request)
    if not policy.can_rotate_signing_keys(principal):
        raise Forbidden("Only a platform admin can rotate signing keys.")
    doc = parse_json_object(body) if body.strip() else {}  # a bare POST, as before
    retire_others = doc.get("retire_others", False)
    if not isinstance(retire_others, bool):
        raise ValidationFailed("retire_others", "must be a boolean")
    deps = get_deps(request)
    fernet = deps.fernet
    # Keys superseded longer ago than the longest token life (access tokens, plus
    # leeway) signed only expired tokens: they leave the JWKS now.
    max_life = max_token_life(deps.settings)
    actor = _actor(request, principal)
    now = utcnow()
    kid, retired = await deps.db.transaction(
        lambda s: account_admin.rotate_signing_key(
            s, actor, fernet, now, max_life, retire_others=retire_others
        )
    )
    await deps.refresh_keys()
    # Every instance and edge stops trusting the retired keys within about a second
    # (`shared.revocations.RETIRED_SIGNING_KEYS`), instead of at its next read of the
    # keys (up to 5 minutes at an edge). Should the store lose that (down now, a
    # failover, a restart), every control plane's republishing pass tells them again
    # from the database within 5 s of the store answering (`retired_announce`).
    try:
        await retired_announce.announce(deps.db, deps.store, max_life)
    except Exception:
        log.exception("could not announce the retired signing keys")
        raise ServiceUnavailable(
            f"A new key ({kid}) signs now and the others are retired here, but the edges "
            "and other instances could not be told yet: every control plane tells them "
            "within 5 seconds of the store answering again (no need to rotate again)."
        ) from None
    return ok({"kid": kid, "retired": retired}, 201)


routes: list[BaseRoute] = [
    Route("/v1/admin/companies", create_company, methods=["POST"]),
    Route("/v1/admin/companies", list_companies, methods=["GET"]),
    Route("/v1/admin/users", create_user, methods=["POST"]),
    Route("/v1/admin/users", list_users, methods=["GET"]),
    Route("/v1/admin/users/{user_id}", update_user, methods=["PATCH"]),
    Route("/v1/admin/api-keys", create_api_key, methods=["POST"]),
    Route("/v1/admin/api-keys", list_api_keys, methods=["GET"]),
    Route("/v1/admin/api-keys/{key_id}", revoke_api_key, methods=["DELETE"]),
    Route("/v1/admin/signing-keys/rotate", rotate_signing_key, methods=["POST"]),
]
