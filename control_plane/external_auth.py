"""Trusting an existing app's users: its JWTs are accepted as bearer tokens
(DESIGN §4 ``LLMGW_AUTH_JWT_SECRET`` / ``LLMGW_AUTH_JWKS_URL``).

* ``LLMGW_AUTH_JWT_SECRET``: HS256 with that shared secret, and nothing else.
* ``LLMGW_AUTH_JWKS_URL``: RS256, ES256 or EdDSA with a key from that JWKS, chosen by
  the token's ``kid``. The set is fetched and cached as the edge caches ours
  (`shared.jwks`): refreshed after 5 minutes, one async fetch at a time, at most one
  attempt per 5 s whatever the kids, the last good set kept while the provider is
  slow or silent. Made-up tokens cannot queue fetches in the thread pool that hashes
  passwords, nor make real users' known keys expire. HS256 is never accepted with a
  JWKS (the public-key-as-HMAC-secret confusion), ``none`` never at all; the
  algorithm list is pinned per source before any key is touched (RFC 8725 §3.1).
* ``LLMGW_AUTH_JWT_AUDIENCE`` and ``LLMGW_AUTH_JWT_ISSUER`` must be set (the
  control plane refuses to start without them), and every token must carry both:
  a token the provider minted for another of its services (``aud:
  "billing-service"``) or another issuer's token never signs anyone in here.

Claims: ``sub`` (the user), ``company_id``, ``role`` (``member`` | ``owner``;
``admin`` is capped at ``owner``: another app can never make a platform admin),
optional ``scopes`` (narrowed to the role's), optional ``email`` (used only with
``email_verified: true``: an address the provider did not verify must not claim
that address here for good) and ``company_name``; ``exp`` is required. On first
sight the company (0 credits) and the user (no password: it can only come back
through its app) are created; later the role follows the token, unless it was
issued (``iat``; without one, ``exp``) before the token that set the current role: an
old token replayed after a demotion does not climb back. A user provisioned in one
company presenting another company's token is refused.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import policy
from control_plane.accounts import EXTERNAL_EMAIL_DOMAIN, find_user_by_email
from control_plane.emails import normalise_email
from control_plane.errors import Unauthenticated, ValidationFailed
from control_plane.logout import is_signed_out
from control_plane.settings import ControlPlaneSettings
from control_plane.tables import Company, User, new_id, utcnow
from control_plane.validation import NUL
from shared.jwks import JWKSCache, KeysUnavailable
from shared.settings import ConfigError
from shared.tokens import API_AUDIENCE, ISSUER

JWKS_ALGORITHMS = ("RS256", "ES256", "EdDSA")
SECRET_ALGORITHM = "HS256"
LEEWAY_SECONDS = 30
JWKS_CACHE_SECONDS = 300
JWKS_REFETCH_SECONDS = 5.0
ID_MAX = 200


@dataclass(frozen=True, slots=True)
class ExternalIdentity:
    sub: str
    company_id: str
    role: str
    scopes: tuple[str, ...] | None
    email: str | None = None
    company_name: str | None = None
    # The token's revocable id (`external_token_id`) and expiry: what a sign-out revokes.
    token_id: str | None = None
    expires_at: int | None = None
    # The token's place in its app's order (`iat`, clamped at 0; without one, its
    # `exp`): which of two tokens states the user's current role (`provision`).
    issued_at: int | None = None


def external_token_id(sub: str, jti: str) -> str:
    """An external JWT's revocable id: its `sub` and `jti` hashed, so that whatever
    the other app puts there is a bounded value that never equals one of our own
    jtis (hex uuids) nor another user's: a sign-out ends its own user's token only."""
    digest = hashlib.sha256(f"{len(sub)}:{sub}:{jti}".encode()).hexdigest()
    return f"ext:{digest}"


def is_text(value: str) -> bool:
    """Pure: whether a claim's string can be hashed and stored. Not with NUL, which
    PostgreSQL text cannot hold, nor with a lone surrogate (JSON's ``"\\ud800"``
    escape decodes to one), which has no UTF-8: either failed the statement or the
    hash, a 500 on every request with the token."""
    if NUL in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _claim_str(claims: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = claims.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > ID_MAX or not is_text(value):
        raise Unauthenticated(f"The token's {name!r} claim is missing or invalid.")
    return value


def identity_from_claims(claims: dict[str, Any]) -> ExternalIdentity:
    """Pure: verified claims → who, in which company, with which role and scopes."""
    sub = _claim_str(claims, "sub", required=True)
    company_id = _claim_str(claims, "company_id", required=True)
    role = claims.get("role")
    if not isinstance(role, str) or role not in policy.ROLE_SCOPES:  # a list is unhashable
        raise Unauthenticated("The token's 'role' claim must be member or owner.")
    if role == "admin":
        role = "owner"  # never a platform admin from another app's token
    raw_scopes = claims.get("scopes", claims.get("scope"))
    scopes: tuple[str, ...] | None = None
    if isinstance(raw_scopes, str):
        scopes = tuple(raw_scopes.split())  # OAuth 2 `scope` is space-separated
    elif isinstance(raw_scopes, list) and all(isinstance(s, str) for s in raw_scopes):
        scopes = tuple(raw_scopes)
    elif raw_scopes is not None:
        raise Unauthenticated("The token's 'scopes' claim must be a list of strings.")
    assert sub is not None and company_id is not None
    for name in ("exp", "nbf", "iat"):
        # NumericDate is a JSON number (RFC 7519 §2), as our own verifier reads it
        # (`shared.jws_fast`); pyjwt takes a digit string too, and a token whose
        # `exp` is one had no expiry here, so its sign-out was refused.
        value = claims.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise Unauthenticated(f"The token's {name!r} claim is not a number.")
    jti, exp, iat = claims.get("jti"), claims.get("exp"), claims.get("iat")
    if isinstance(jti, str) and not is_text(jti):
        raise Unauthenticated("The token's 'jti' claim is invalid.")
    return ExternalIdentity(
        sub=sub,
        company_id=company_id,
        role=str(role),
        scopes=scopes,
        email=(
            _claim_str(claims, "email", required=False)
            if claims.get("email_verified") is True
            else None
        ),
        company_name=_claim_str(claims, "company_name", required=False),
        # Optional (RFC 7519 §4.1.7): a token without one can only expire.
        token_id=external_token_id(sub, jti) if isinstance(jti, str) and jti else None,
        expires_at=int(exp) if isinstance(exp, int | float) else None,
        issued_at=_order_of(iat, exp),
    )


def _order_of(iat: object, exp: object) -> int | None:
    """Pure: a token's place in its app's order, for its role (`takes_role`): when it
    was issued (`iat`: not in the future, pyjwt checks it with leeway; a negative one
    fits no column), else its expiry. `iat` is optional (RFC 7519; pyjwt leaves it out
    unless asked), and without an order the role followed whichever token came last:
    a demoted owner replaying an older, unexpired owner token was an owner again, its
    API keys with it. An app that sends no `iat` issues a later token with a later
    `exp` for the same life, and `exp` is required."""
    for moment in (iat, exp):
        if isinstance(moment, int | float) and not isinstance(moment, bool):
            return max(0, int(moment))
    return None


def looks_like_ours(token: str) -> bool:
    """Our own access tokens (iss llm-gateway, aud llm-api) go to our verifier."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return False
    return claims.get("iss") == ISSUER and claims.get("aud") == API_AUDIENCE


def signing_keys(document: object) -> dict[str, jwt.PyJWK]:
    """Pure: a JWKS document's signing keys by kid, as `jwt.PyJWKClient` picks them
    (``use`` ``sig`` or absent, a ``kid``); unusable entries skipped, a document with
    none raises (the fetch failed: the last good set stays)."""
    if not isinstance(document, dict):
        raise ValueError("not a JWKS document")
    return {
        key.key_id: key
        for key in jwt.PyJWKSet.from_dict(document).keys
        if key.key_id and key.public_key_use in ("sig", None)
    }


class ExternalVerifier:
    """Verifies an existing app's JWTs; one per control-plane app."""

    def __init__(
        self,
        settings: ControlPlaneSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if settings.auth_jwt_audience is None or settings.auth_jwt_issuer is None:
            # `ControlPlaneSettings.from_env` already refuses this; settings built otherwise too.
            missing = "AUDIENCE" if settings.auth_jwt_audience is None else "ISSUER"
            raise ConfigError(
                f"LLMGW_AUTH_JWT_{missing} is required when external auth is configured"
            )
        self._audience: str = settings.auth_jwt_audience
        self._issuer: str = settings.auth_jwt_issuer
        self._secret = settings.auth_jwt_secret
        self._client: httpx.AsyncClient | None = None
        self._jwks: JWKSCache[jwt.PyJWK] | None = None
        if settings.auth_jwks_url:
            # Redirects followed as `jwt.PyJWKClient` (urllib) did before: a provider
            # may move its keys behind one. The cache times each fetch out (5 s).
            self._client = httpx.AsyncClient(follow_redirects=True)
            self._jwks = JWKSCache(
                self._client,
                settings.auth_jwks_url,
                signing_keys,
                max_age_seconds=JWKS_CACHE_SECONDS,
                min_refetch_seconds=JWKS_REFETCH_SECONDS,
                clock=clock,
                source="the identity provider",
            )

    @classmethod
    def from_settings(cls, settings: ControlPlaneSettings) -> ExternalVerifier | None:
        if settings.auth_jwt_secret is None and settings.auth_jwks_url is None:
            return None
        return cls(settings)

    async def aclose(self) -> None:
        """The lifespan's end: a refresh still running, then the client."""
        if self._jwks is not None:
            await self._jwks.aclose()
        if self._client is not None:
            await self._client.aclose()

    async def _key(self, token: str, alg: Any) -> Any:
        if alg == SECRET_ALGORITHM and self._secret is not None:
            return self._secret.reveal()
        if alg in JWKS_ALGORITHMS and self._jwks is not None:
            kid = jwt.get_unverified_header(token).get("kid")
            try:
                # A kid-less token names no key: nothing to fetch for it.
                signing_key = await self._jwks.key(kid) if isinstance(kid, str) else None
            except KeysUnavailable:
                # The fetch's error stays in our log: it may name the provider's hosts.
                raise Unauthenticated("The token's signing keys are not available.") from None
            if signing_key is None:
                raise Unauthenticated("The token was signed by an unknown key.")
            if signing_key.algorithm_name not in (None, alg):
                raise Unauthenticated("The token's algorithm does not match its key.")
            return signing_key.key
        raise Unauthenticated("The token's algorithm is not accepted.")

    async def verify(self, token: str) -> ExternalIdentity:
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            raise Unauthenticated("The bearer token is not a valid JWT.") from None
        key = await self._key(token, alg)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[str(alg)],
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "sub", "aud", "iss"], "verify_aud": True},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("The token has expired.") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"The token is not valid: {exc}.") from None
        return identity_from_claims(claims)


def _unique_company_name(session: Session, wanted: str) -> str:
    name = wanted[:180]
    if session.scalars(select(Company).where(col(Company.name) == name)).first() is None:
        return name
    return f"{name}-{new_id()[:8]}"


def _email_for(session: Session, ident: ExternalIdentity) -> str:
    """The new user's address: its verified email, else one derived from its `sub`
    in the reserved domain; either only while no user has it (an existing account is
    never taken over, and a taken address must not fail the sign-in for good: one
    stored before the domain was reserved gets a suffix)."""
    if ident.email is not None:
        try:
            email = normalise_email(ident.email)
        except ValidationFailed:
            email = None
        if email is not None and find_user_by_email(session, email) is None:
            return email
    digest = hashlib.sha256(ident.sub.encode("utf-8")).hexdigest()[:32]
    email = f"{digest}@{EXTERNAL_EMAIL_DOMAIN}"
    if find_user_by_email(session, email) is None:
        return email
    return f"{digest}-{new_id()[:12]}@{EXTERNAL_EMAIL_DOMAIN}"


def provision(session: Session, ident: ExternalIdentity) -> tuple[User, Company]:
    """The user and company of an external identity, created on first sight."""
    company = session.scalars(
        select(Company).where(col(Company.external_id) == ident.company_id)
    ).first()
    if company is None:
        now = utcnow()
        company = Company(
            id=new_id(),
            name=_unique_company_name(session, ident.company_name or ident.company_id),
            balance_micro=0,
            held_micro=0,
            default_model=None,
            created_at=now,
            external_id=ident.company_id,
        )
        session.add(company)
        session.flush()
    user = session.scalars(select(User).where(col(User.external_id) == ident.sub)).first()
    if user is None:
        user = User(
            id=new_id(),
            company_id=company.id,
            email=_email_for(session, ident),
            password_hash=None,
            role=ident.role,
            created_at=utcnow(),
            external_id=ident.sub,
            external_role_iat=ident.issued_at,
        )
        session.add(user)
        session.flush()
    elif user.company_id != company.id:
        raise Unauthenticated("This user belongs to another company.")
    elif takes_role(user.external_role_iat, ident.issued_at) and (
        user.role != ident.role or newer(ident.issued_at, user.external_role_iat)
    ):
        _take_role(session, user, ident)
    return user, company


def newer(issued_at: int | None, role_iat: int | None) -> bool:
    """Pure: whether a token issued at `issued_at` is newer than the app's last word
    on the role (`role_iat`)."""
    return issued_at is not None and (role_iat is None or issued_at > role_iat)


def _take_role(session: Session, user: User, ident: ExternalIdentity) -> None:
    """The token's role, and its `iat` as the app's last word, even when the role does
    not change: kept at the first token's, a token older than the latest but newer
    than that first one (a promotion the app made, then undid) took the role back.
    One conditional statement: of two tokens at once, the older cannot commit over
    the newer (a read, then a write, let it)."""
    statement = update(User).where(col(User.id) == user.id)
    values: dict[str, Any] = {"role": ident.role}
    if ident.issued_at is not None:
        statement = statement.where(
            or_(
                col(User.external_role_iat).is_(None),
                col(User.external_role_iat) <= ident.issued_at,
            )
        )
        values["external_role_iat"] = ident.issued_at
    session.execute(statement.values(**values))
    session.refresh(user)


def takes_role(role_iat: int | None, issued_at: int | None) -> bool:
    """Pure: whether a token issued at `issued_at` sets the role of a user whose
    role was last set by a token issued at `role_iat`. A token issued before that
    one is older than the app's latest word on the role: a demoted owner replaying
    a token from before its demotion (unexpired) would otherwise be an owner again
    in our rows, and its API keys with it, long after that token expired. Without
    an `iat` on either side there is no order: the token's role is taken."""
    return role_iat is None or issued_at is None or issued_at >= role_iat


def _provision_checked(session: Session, ident: ExternalIdentity) -> tuple[User, Company, bool]:
    user, company = provision(session, ident)
    signed_out = ident.token_id is not None and is_signed_out(session, ident.token_id)
    return user, company, signed_out


async def provision_with_retry(db: Any, ident: ExternalIdentity) -> tuple[User, Company, bool]:
    """The identity's user and company, and whether its token was signed out (read
    in the same transaction). Two first requests of a new user race on the unique
    external ids: the loser's transaction rolls back and the retry finds the
    winner's rows."""
    try:
        result: tuple[User, Company, bool] = await db.transaction(
            lambda s: _provision_checked(s, ident)
        )
    except IntegrityError:
        result = await db.transaction(lambda s: _provision_checked(s, ident))
    return result
