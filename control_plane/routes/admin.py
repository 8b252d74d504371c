"""``/v1/admin/…``: companies, users, API keys, signing keys (credits and the audit
log are in `admin_credits`).

The platform admin may do all of it; an owner may manage its own company's users
and API keys (`policy`). Creates answer 201, deletes 204.
"""

from __future__ import annotations

import asyncio

from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control_plane import accounts, policy
from control_plane.auth import authenticate
from control_plane.credentials import hash_password
from control_plane.deps import get_deps, read_json
from control_plane.errors import Conflict, Forbidden, ValidationFailed
from control_plane.middleware import request_id
from control_plane.responses import no_content, ok
from control_plane.signing_keys import create_signing_key
from control_plane.tables import ROLES
from control_plane.validation import credits_amount, one_of, required_str

PASSWORD_MIN, PASSWORD_MAX = 4, 1024


async def create_company(request: Request) -> Response:
    principal = await authenticate(request)
    if not policy.can_create_company(principal):
        raise Forbidden("Only a platform admin can create companies.")
    doc = await read_json(request)
    name = required_str(doc, "name", max_len=200).strip()
    credits = doc.get("credits")
    micro = 0 if credits is None else credits_amount(credits, "credits")
    if micro < 0:
        raise ValidationFailed("credits", "must not be negative")
    rid = request_id(request)
    try:
        company = await get_deps(request).db.transaction(
            lambda s: accounts.create_company(s, principal, name, micro, rid)
        )
    except IntegrityError:
        raise Conflict(f"A company named {name!r} already exists.") from None
    return ok(accounts.company_public(company), 201)


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
    Route("/v1/admin/users", create_user, methods=["POST"]),
    Route("/v1/admin/api-keys", create_api_key, methods=["POST"]),
    Route("/v1/admin/api-keys/{key_id}", revoke_api_key, methods=["DELETE"]),
    Route("/v1/admin/signing-keys/rotate", rotate_signing_key, methods=["POST"]),
]
