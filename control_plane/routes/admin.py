"""``/v1/admin/…``: companies, credit grants, users, API keys, signing keys.

The platform admin may do all of it; an owner may manage its own company's users
and API keys (`policy`). Creates answer 201, deletes 204.
"""

from __future__ import annotations

import asyncio
import re

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control_plane import accounts, policy
from control_plane.auth import authenticate
from control_plane.credentials import hash_password
from control_plane.deps import get_deps, read_json
from control_plane.errors import Conflict, Forbidden, ValidationFailed
from control_plane.ledger import grant
from control_plane.middleware import request_id
from control_plane.responses import no_content, ok
from control_plane.routes.billing import entry_public
from control_plane.signing_keys import create_signing_key
from control_plane.tables import ROLES
from control_plane.validation import one_of, optional_str, required_str
from shared.pricing import parse_credits

PASSWORD_MIN, PASSWORD_MAX = 4, 1024
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")  # printable ASCII, no spaces


def _credits(value: object, name: str, *, allow_negative: bool) -> int:
    try:
        micro = parse_credits(value)
    except ValueError as exc:
        raise ValidationFailed(name, str(exc)) from None
    if micro < 0 and not allow_negative:
        raise ValidationFailed(name, "must not be negative")
    return micro


async def create_company(request: Request) -> Response:
    principal = await authenticate(request)
    if not policy.can_create_company(principal):
        raise Forbidden("Only a platform admin can create companies.")
    doc = await read_json(request)
    name = required_str(doc, "name", max_len=200).strip()
    credits = doc.get("credits")
    micro = 0 if credits is None else _credits(credits, "credits", allow_negative=False)
    rid = request_id(request)
    try:
        company = await get_deps(request).db.transaction(
            lambda s: accounts.create_company(s, principal, name, micro, rid)
        )
    except IntegrityError:
        raise Conflict(f"A company named {name!r} already exists.") from None
    return ok(accounts.company_public(company), 201)


async def grant_credits(request: Request) -> Response:
    principal = await authenticate(request)
    company_id = str(request.path_params["company_id"])
    if not policy.can_grant_credits(principal, company_id):
        raise Forbidden("Only a platform admin can grant credits.")
    doc = await read_json(request)
    amount = doc.get("amount")
    if amount is None:
        raise ValidationFailed("amount", "is required")
    micro = _credits(amount, "amount", allow_negative=True)
    if micro == 0:
        raise ValidationFailed("amount", "must not be zero")
    reason = optional_str(doc, "reason", max_len=500)
    key = request.headers.get("idempotency-key")
    if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
        raise ValidationFailed("Idempotency-Key", "must be 1-200 printable ASCII characters")
    rid = request_id(request)
    actor = accounts.actor_of(principal)

    def run(session: Session) -> tuple[dict[str, object], bool]:
        entry, created = grant(
            session,
            company_id,
            micro,
            reason=reason,
            actor=actor,
            request_id=rid,
            idempotency_key=key,
        )
        return {**entry_public(entry), "company_id": company_id}, created

    db = get_deps(request).db
    try:
        data, created = await db.transaction(run)
    except IntegrityError:
        if key is None:
            raise
        data, created = await db.transaction(run)  # a concurrent twin won: replay it
    return ok(data, 201, meta={"replayed": not created})


async def create_user(request: Request) -> Response:
    principal = await authenticate(request)
    doc = await read_json(request)
    company_id = required_str(doc, "company_id", max_len=64)
    email = accounts.normalise_email(required_str(doc, "email", max_len=320))
    role = one_of(doc.get("role", "member"), "role", ROLES)
    password = doc.get("password")
    password_hash = None
    if password is not None:
        if not isinstance(password, str) or not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
            raise ValidationFailed(
                "password", f"must be a string of {PASSWORD_MIN}-{PASSWORD_MAX} characters"
            )
        if not policy.can_admin_company(principal, company_id):
            raise Forbidden("You cannot add users to this company.")
        password_hash = await asyncio.to_thread(hash_password, password)
    try:
        user = await get_deps(request).db.transaction(
            lambda s: accounts.create_user(
                s,
                principal,
                company_id=company_id,
                email=email,
                password_hash=password_hash,
                role=role,
            )
        )
    except IntegrityError:
        raise Conflict("A user with this email already exists.") from None
    return ok(accounts.user_public(user), 201)


async def create_api_key(request: Request) -> Response:
    principal = await authenticate(request)
    doc = await read_json(request)
    user_id = required_str(doc, "user_id", max_len=64)
    scopes = doc.get("scopes")
    created = await get_deps(request).db.transaction(
        lambda s: accounts.create_api_key(s, principal, user_id, scopes)
    )
    return ok(created.public(), 201)


async def revoke_api_key(request: Request) -> Response:
    principal = await authenticate(request)
    key_id = str(request.path_params["key_id"])
    await get_deps(request).db.transaction(lambda s: accounts.revoke_api_key(s, principal, key_id))
    return no_content()


async def rotate_signing_key(request: Request) -> Response:
    principal = await authenticate(request)
    if not policy.can_rotate_signing_keys(principal):
        raise Forbidden("Only a platform admin can rotate signing keys.")
    deps = get_deps(request)
    fernet = deps.fernet
    kid, _ = await deps.db.transaction(lambda s: create_signing_key(s, fernet))
    await deps.refresh_keys()
    return ok({"kid": kid}, 201)


routes: list[BaseRoute] = [
    Route("/v1/admin/companies", create_company, methods=["POST"]),
    Route("/v1/admin/companies/{company_id}/credits", grant_credits, methods=["POST"]),
    Route("/v1/admin/users", create_user, methods=["POST"]),
    Route("/v1/admin/api-keys", create_api_key, methods=["POST"]),
    Route("/v1/admin/api-keys/{key_id}", revoke_api_key, methods=["DELETE"]),
    Route("/v1/admin/signing-keys/rotate", rotate_signing_key, methods=["POST"]),
]
