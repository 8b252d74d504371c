"""Who is calling: ``Authorization: Bearer <x>`` → `Principal`, or 401.

`x` is one of
* ``LLMGW_ADMIN_TOKEN`` (constant-time compare) → the platform admin, no company;
* an API key ``sk_…`` → looked up by SHA-256, refused once revoked;
* an access token from ``/v1/auth/login``: an EdDSA JWT with audience ``llm-api``,
  verified with our own keys (the edge refuses it: its audience is ``llm-stream``);
* when configured, a trusted external app's JWT (`external_auth`), whose user and
  company are provisioned on first sight.

A revoked user, or any user of a revoked company, is refused (403 ``revoked``); a
token its user signed out (`logout`) is refused with 401 ``signed_out``.

A request with a body names its caller once the whole body has arrived
(`caller_and_json`), so what it does is decided by who the caller is then.
"""

from __future__ import annotations

import hmac
import time
import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any

import orjson
import psycopg
from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.orm import Session
from starlette.requests import Request

from control_plane import admin_writes, db_shares, hot_statements, logout, policy, raw_pg
from control_plane.credentials import hash_api_key, looks_like_api_key
from control_plane.deps import Deps, get_deps, read_body
from control_plane.errors import Revoked, SignedOut, Unauthenticated
from control_plane.external_auth import ExternalIdentity, looks_like_ours, provision_with_retry
from control_plane.policy import Principal, scopes_for_role
from control_plane.tables import ApiKey, Company, User, utcnow
from control_plane.validation import parse_json_object
from shared import jws_fast
from shared.tokens import (
    API_AUDIENCE,
    EARLY_LEEWAY_SECONDS,
    ISSUER,
    LEEWAY_SECONDS,
    REQUIRED_CLAIMS,
    TokenRejected,
    parse_token,
    sign_token,
)

ACCESS_TOKEN_TTL_SECONDS = 3600
# An access token's claim: its user's `sign_in_epoch` when it was issued; a token
# from an epoch the user has left is refused (absent: 0, as tokens issued before it).
SIGN_IN_EPOCH_CLAIM = "sep"
LAST_USED_RESOLUTION = timedelta(minutes=1)  # don't write on every request


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        raise Unauthenticated()
    return value


def user_principal(
    user: User, via: str, scopes: tuple[str, ...] | None = None, api_key_id: str | None = None
) -> Principal:
    role_scopes = scopes_for_role(user.role)
    granted = role_scopes if scopes is None else tuple(s for s in role_scopes if s in scopes)
    return Principal(
        user_id=user.id,
        company_id=user.company_id,
        role=user.role,
        scopes=frozenset(granted),
        via=via,
        api_key_id=api_key_id,
    )


def external_principal(user: User, identity: ExternalIdentity) -> Principal:
    return replace(
        user_principal(user, "external_jwt", identity.scopes),
        token_id=identity.token_id,
        token_expires_at=identity.expires_at,
    )


def admin_token_principal() -> Principal:
    """The platform admin: every scope (it mints keys of any scope), but no user, so
    it can never chat or read a user's data."""
    return Principal(
        user_id=None,
        company_id=None,
        role="admin",
        scopes=frozenset(scopes_for_role("admin")),
        via="admin_token",
    )


def ensure_not_revoked(user: User, company: Company | None) -> None:
    """A revoked (disabled) user, or any user of a revoked company, is refused
    everywhere with 403 ``revoked``: its access tokens and API keys stop working."""
    if user.disabled_at is not None:
        raise Revoked("This user has been revoked.")
    if company is None or company.disabled_at is not None:
        raise Revoked("This user's company has been revoked.")


_KEYS, _USERS, _COMPANIES = (
    hot_statements.table_of(ApiKey),
    hot_statements.table_of(User),
    hot_statements.table_of(Company),
)
# Every request with an API key runs these: prebuilt Core, one row of plain values,
# no ORM entities (issue 14.3). Nothing is cached: a revoked key, user or company is
# refused on the very next request.
_LOOKUP_KEY = (
    select(
        _KEYS.c.id,
        _KEYS.c.scopes,
        _KEYS.c.revoked_at,
        _KEYS.c.last_used_at,
        _USERS.c.id.label("user_id"),
        _USERS.c.company_id,
        _USERS.c.role,
        _USERS.c.disabled_at.label("user_disabled_at"),
        _COMPANIES.c.disabled_at.label("company_disabled_at"),
    )
    .join(_USERS, _USERS.c.id == _KEYS.c.user_id)
    .join(_COMPANIES, _COMPANIES.c.id == _USERS.c.company_id)
    .where(_KEYS.c.key_hash == bindparam("p_hash"))
)
_RAW_LOOKUP_KEY = raw_pg.RawStatement(_LOOKUP_KEY)
_TOUCH_KEY = (
    update(_KEYS)
    .where(_KEYS.c.id == bindparam("p_id"))
    .where(or_(_KEYS.c.last_used_at.is_(None), _KEYS.c.last_used_at < bindparam("p_stale_before")))
    .values(last_used_at=bindparam("p_now"))
)
_RAW_TOUCH_KEY = raw_pg.RawStatement(_TOUCH_KEY)


def api_key_row(on: Session | psycopg.Connection[Any], key_hash: str) -> Any | None:
    """The row of the API key with this SHA-256 (`hash_api_key`; an edge sends the
    hash, issue 16.5), with its user's and company's: one read, no effects, so
    `Database.lookup` may send it again on a fresh connection."""
    return _RAW_LOOKUP_KEY.first_on(on, {"p_hash": key_hash})


def api_key_principal(on: Session | psycopg.Connection[Any], row: Any | None) -> Principal | None:
    """The principal of an API key's row (`api_key_row`); None when unknown or
    revoked. Records `last_used_at` (at most once per `LAST_USED_RESOLUTION`: no
    write at all on most requests). `on` a session, or a connection of
    `Database.lookup`: the lookup and the conditional touch stand alone, so a later
    failing transaction (an init refused) leaves `last_used_at` recorded either way."""
    if row is None or row.revoked_at is not None:
        return None
    if row.user_disabled_at is not None:
        raise Revoked("This user has been revoked.")
    if row.company_disabled_at is not None:
        raise Revoked("This user's company has been revoked.")
    now = utcnow()
    stale_before = now - LAST_USED_RESOLUTION
    last_used = row.last_used_at
    if last_used is None or last_used < stale_before:
        touch = {"p_id": row.id, "p_stale_before": stale_before, "p_now": now}
        if isinstance(on, Session):
            on.execute(_TOUCH_KEY, touch)
        else:
            _RAW_TOUCH_KEY.first_on(on, touch)
    granted = set(str(s) for s in orjson.loads(row.scopes))
    return Principal(
        user_id=row.user_id,
        company_id=row.company_id,
        role=row.role,
        scopes=frozenset(s for s in scopes_for_role(row.role) if s in granted),
        via="api_key",
        api_key_id=row.id,
    )


def issue_access_token(deps: Deps, user_id: str, sign_in_epoch: int = 0) -> str:
    """An access token for `user_id`, in its user's current `sign_in_epoch`."""
    kid, key = deps.keyring.active()
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": API_AUDIENCE,
        "sub": user_id,
        "iat": now,
        "nbf": now,
        "exp": now + ACCESS_TOKEN_TTL_SECONDS,
        "jti": uuid.uuid4().hex,
        SIGN_IN_EPOCH_CLAIM: sign_in_epoch,
    }
    return sign_token(claims, key, kid)


# An access token's user and company, and whether the token was signed out, as
# plain values (one prebuilt SELECT, no ORM entities): read on every request, so
# revoking either, or signing the token out, takes effect at once.
_LOOKUP_USER = (
    select(
        _USERS.c.id,
        _USERS.c.company_id,
        _USERS.c.role,
        _USERS.c.disabled_at,
        _USERS.c.sign_in_epoch,
        _COMPANIES.c.id.label("company_found"),
        _COMPANIES.c.disabled_at.label("company_disabled_at"),
        logout.SIGNED_OUT.label("signed_out"),
    )
    .outerjoin(_COMPANIES, _COMPANIES.c.id == _USERS.c.company_id)
    .where(_USERS.c.id == bindparam("p_id"))
)
_RAW_LOOKUP_USER = raw_pg.RawStatement(_LOOKUP_USER)


def access_token_row(on: Session | psycopg.Connection[Any], user_id: str, jti: str) -> Any | None:
    """An access token's user's row with its company's, and whether the token `jti`
    was signed out: one read, no effects."""
    return _RAW_LOOKUP_USER.first_on(on, {"p_id": user_id, **logout.signed_out_params(jti)})


def access_token_principal(
    row: Any | None,
    jti: str,
    expires_at: int,
    *,
    signed_out_ok: bool = False,
    sign_in_epoch: int = 0,
) -> Principal:
    """The principal of an access token's user (`access_token_row`); 401 when the
    user no longer exists, the token was signed out (unless `signed_out_ok`: a
    repeated sign-out) or issued in a `sign_in_epoch` its user has left (every
    sign-in of the user ended at once: `accounts.set_role`), 403 ``revoked`` as
    `ensure_not_revoked`."""
    if row is None:
        raise Unauthenticated("The access token's user no longer exists.")
    if row.sign_in_epoch != sign_in_epoch:
        raise SignedOut("This sign-in has ended (the user's role changed): sign in again.")
    if row.signed_out and not signed_out_ok:
        raise SignedOut()
    if row.disabled_at is not None:
        raise Revoked("This user has been revoked.")
    if row.company_found is None or row.company_disabled_at is not None:
        raise Revoked("This user's company has been revoked.")
    return Principal(
        user_id=row.id,
        company_id=row.company_id,
        role=row.role,
        scopes=frozenset(scopes_for_role(row.role)),
        via="access_token",
        token_id=jti,
        token_expires_at=expires_at,
    )


async def _access_token_principal(deps: Deps, token: str, signed_out_ok: bool) -> Principal:
    try:
        # One pass (`shared.jws_fast`, as the edge verifies stream tokens): pyjwt
        # decodes the token twice and checks base64 in a Python loop.
        parsed = parse_token(token)
        kid = parsed.kid
        assert kid is not None  # parse_token refuses a token without one
        keyring = await deps.fresh_keyring()
        public_key = keyring.public_key(kid)
        if public_key is None:
            keyring = await deps.fresh_keyring(unknown_kid=True)
            public_key = keyring.public_key(kid)
        if public_key is None:
            raise Unauthenticated("The access token was signed by an unknown key.")
        # The signature once per token and key (`verified_tokens`); the claims and
        # the user's row below on every request.
        deps.verified_signatures.check(token, parsed, public_key)
        claims = jws_fast.check_claims(
            parsed,
            audience=API_AUDIENCE,
            issuer=ISSUER,
            leeway=LEEWAY_SECONDS,
            early_leeway=EARLY_LEEWAY_SECONDS,  # minted by a sibling whose clock is ahead
            require=REQUIRED_CLAIMS,
        )
    except TokenRejected as exc:
        raise Unauthenticated(f"The access token is not valid: {exc.message}.") from None
    user_id, jti, expires_at = str(claims["sub"]), str(claims["jti"]), int(claims["exp"])
    epoch = claims.get(SIGN_IN_EPOCH_CLAIM, 0)
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise Unauthenticated("The access token is not valid: its sign-in epoch is malformed.")
    # The read is the checkout's ping (`Database.lookup`).
    return await deps.db.lookup(
        lambda on: access_token_row(on, user_id, jti),
        lambda _on, row: access_token_principal(
            row, jti, expires_at, signed_out_ok=signed_out_ok, sign_in_epoch=epoch
        ),
    )


async def authenticate(request: Request, *, signed_out_ok: bool = False) -> Principal:
    """The caller. `signed_out_ok`: a token its user signed out still names its
    caller (only for ``POST /v1/auth/logout`` itself, whose repeat is a no-op).
    The request's later database calls count against the caller's company's share
    of the threads (`db_shares`). An admin write counts against its company's
    per-minute rate here, before its handler reads or writes anything
    (`admin_writes`)."""
    principal = await _caller(request, signed_out_ok)
    db_shares.acting_for(principal.company_id)
    await _count_admin_write(request, principal)
    return principal


async def _count_admin_write(request: Request, principal: Principal) -> None:
    """Every handler names its caller here, so no admin route can forget the rate;
    the platform admin is not counted (`admin_writes`), nor a caller without the
    admin scope: every admin write of its is refused, writing nothing, and counted
    it would spend its owners' writes (a rogue member keeping them from revoking it)."""
    company_id = principal.company_id
    scope = request.scope  # not `request.url`: every request of every route comes here
    if (
        not admin_writes.is_admin_write(scope["method"], scope["path"])
        or company_id is None
        or not policy.has_admin_scope(principal)
        or policy.is_platform_admin(principal)
    ):
        return
    deps = get_deps(request)
    await admin_writes.check_admin_write_rate(
        deps.store,
        company_id=company_id,
        per_minute=deps.settings.admin_write_rate_per_company,
        now=deps.clock(),
    )


async def _caller(request: Request, signed_out_ok: bool) -> Principal:
    deps = get_deps(request)
    token = bearer_token(request)
    admin_token = deps.settings.admin_token
    if admin_token is not None and hmac.compare_digest(
        token.encode("utf-8"), admin_token.reveal().encode("utf-8")
    ):
        return admin_token_principal()
    if looks_like_api_key(token):
        key_hash = hash_api_key(token)
        principal = await deps.db.lookup(lambda on: api_key_row(on, key_hash), api_key_principal)
        if principal is None:
            raise Unauthenticated("The API key is unknown or revoked.")
        return principal
    if deps.external is not None and not looks_like_ours(token):
        identity = await deps.external.verify(token)
        user, company, signed_out = await provision_with_retry(deps.db, identity)
        if signed_out and not signed_out_ok:
            raise SignedOut()
        ensure_not_revoked(user, company)
        return external_principal(user, identity)
    return await _access_token_principal(deps, token, signed_out_ok)


async def caller_and_body(
    request: Request, *, signed_out_ok: bool = False
) -> tuple[Principal, bytes]:
    """The caller of a request that carries a body, authenticated once the whole body
    has arrived; the body as bytes, not parsed yet.

    Authenticated from its headers alone, a request may hold its body back for the
    server's body deadline (`llm_gateway.http_guard`: over a minute for 1 MiB, two
    with a chunked body) and was then acted on with the role, scopes and standing its
    caller had when the headers came: an owner revoked or demoted meanwhile still
    created owners and minted owner keys, a key revoked meanwhile still took a hold
    and got a stream token. Read first, the body is bounded as any body is and costs
    no parse until the caller is known; between this lookup and the use case's
    transaction the client has nothing left to send."""
    body = await read_body(request)
    return await authenticate(request, signed_out_ok=signed_out_ok), body


async def caller_and_json(request: Request) -> tuple[Principal, dict[str, Any]]:
    """`caller_and_body`, the body parsed as a JSON object for the caller only."""
    principal, body = await caller_and_body(request)
    return principal, parse_json_object(body)
