"""Stream token claims (RFC 7519 JWT, EdDSA): building, signing, verifying.

The control plane builds and signs; the edge verifies with public keys only. The
verifier pins the algorithm before touching the key so `alg: none` and the
HS256-with-the-public-key confusion attack fail on the header alone.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared import jws_fast
from shared.jws_fast import TokenRejected as TokenRejected  # re-exported for callers

ISSUER = "llm-gateway"
STREAM_AUDIENCE = "llm-stream"
API_AUDIENCE = "llm-api"  # control-plane access tokens; never valid at the edge
ALGORITHM = "EdDSA"
LEEWAY_SECONDS = 5  # DESIGN §5 allows at most 30
# How far ahead of the verifier's clock `iat` and `nbf` may be: DESIGN's whole 30 s.
# A token dated ahead comes from a clock ahead (the minting host's), never lives any
# longer for it; with 5 s, an edge 5 s behind the control plane refused every fresh
# token (its hold taken until the sweeper's deadline). `exp` keeps `LEEWAY_SECONDS`.
EARLY_LEEWAY_SECONDS = 30
REQUIRED_CLAIMS = ("exp", "nbf", "iat", "aud", "iss", "sub", "jti")
SCOPE_SEND = "llm:chat:send"
SCOPE_READ = "llm:chat:read"
SCOPE_DELETE = "llm:chat:delete"
ALL_SCOPES = (SCOPE_SEND, SCOPE_READ, SCOPE_DELETE)

# Set when init applied an agent (issue 15.4): the token then runs only the request
# stashed at init, never a body sent to the edge (which could drop the agent's prompt).
AGENT_CLAIM = "agent"

# The fallback chain fixed at init (issue 16.2), signed with the rest: a list of
# `{"model", "max_input_tokens", "max_tokens", "upr"?}` — each model's own input
# estimate and output cap (at most the grant's), and its sealed route when the
# company brings the key. The client can neither reorder it nor
# add a cheaper model; the edge tries them in order before the first byte.
FALLBACKS_CLAIM = "fallbacks"

# The largest stream token the control plane mints: its sealed routes within
# `route_claim.SEALED_ROUTES_MAX_BYTES` (init refuses more), the other claims under
# 4 KiB, the whole in base64url. Every edge takes a header block that holds it and a
# browser's other headers (`settings.MIN_HEADER_BYTES`).
STREAM_TOKEN_MAX_BYTES = 48 * 1024

# The revocable id of the signed-in token that minted this stream token (the access
# token's jti, or a trusted external JWT's, `control_plane.external_auth.token_id`);
# absent for API keys. The edge treats a revocation of it as one of the token itself,
# so ``POST /v1/auth/logout`` also ends the streams the session opened.
PARENT_CLAIM = "parent_jti"


@dataclass(frozen=True, slots=True)
class FallbackGrant:
    model: str
    max_input_tokens: int
    sealed_route: str | None = None
    max_tokens: int = 0  # 0: the grant's

    def claim(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "model": self.model,
            "max_input_tokens": self.max_input_tokens,
            "max_tokens": self.max_tokens,
        }
        if self.sealed_route is not None:
            doc["upr"] = self.sealed_route
        return doc


def _fallbacks(raw: Any) -> tuple[FallbackGrant, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise TypeError("fallbacks")
    return tuple(
        FallbackGrant(
            model=str(item["model"]),
            max_input_tokens=int(item["max_input_tokens"]),
            sealed_route=str(item["upr"]) if item.get("upr") else None,
            max_tokens=int(item.get("max_tokens") or 0),
        )
        for item in raw
    )


STREAM_CLAIMS = (
    "iss", "aud", "sub", "company_id", "role", "scopes", "jti", "iat", "nbf", "exp",
    "session_id", "model", "max_tokens", "max_input_tokens", "reservation_id", "request_id",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class StreamGrant:
    """The verified claims of a stream token."""

    jti: str
    user_id: str
    company_id: str
    role: str
    scopes: tuple[str, ...]
    session_id: str
    model: str
    max_tokens: int
    max_input_tokens: int
    reservation_id: str
    request_id: str
    issued_at: int
    expires_at: int
    # The company's own upstream route, sealed for the edge (shared/route_claim.py).
    sealed_route: str | None = None
    agent: str | None = None  # `AGENT_CLAIM`
    fallbacks: tuple[FallbackGrant, ...] = ()  # `FALLBACKS_CLAIM`
    parent_jti: str | None = None  # `PARENT_CLAIM`
    # The key that signed it (the header's `kid`; "" when read unverified): a stream
    # runs only while that key is not retired (`shared.revocations.retired_signing_keys`).
    kid: str = ""

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any], kid: str = "") -> StreamGrant:
        try:
            scopes = claims["scopes"]
            if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
                raise TypeError("scopes")
            return cls(
                jti=str(claims["jti"]),
                user_id=str(claims["sub"]),
                company_id=str(claims["company_id"]),
                role=str(claims["role"]),
                scopes=tuple(scopes),
                session_id=str(claims["session_id"]),
                model=str(claims["model"]),
                max_tokens=int(claims["max_tokens"]),
                max_input_tokens=int(claims["max_input_tokens"]),
                reservation_id=str(claims["reservation_id"]),
                request_id=str(claims["request_id"]),
                issued_at=int(claims["iat"]),
                expires_at=int(claims["exp"]),
                sealed_route=str(claims["upr"]) if claims.get("upr") else None,
                agent=str(claims[AGENT_CLAIM]) if claims.get(AGENT_CLAIM) else None,
                fallbacks=_fallbacks(claims.get(FALLBACKS_CLAIM)),
                parent_jti=str(claims[PARENT_CLAIM]) if claims.get(PARENT_CLAIM) else None,
                kid=kid,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TokenRejected("malformed", "the token's claims are malformed") from exc


def stream_claims(
    *,
    user_id: str,
    company_id: str,
    role: str,
    scopes: list[str],
    session_id: str,
    model: str,
    max_tokens: int,
    max_input_tokens: int,
    reservation_id: str,
    request_id: str,
    now: int,
    ttl_seconds: int,
    jti: str | None = None,
) -> dict[str, Any]:
    return {
        "iss": ISSUER,
        "aud": STREAM_AUDIENCE,
        "sub": user_id,
        "company_id": company_id,
        "role": role,
        "scopes": scopes,
        "jti": jti or uuid.uuid4().hex,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
        "session_id": session_id,
        "model": model,
        "max_tokens": max_tokens,
        "max_input_tokens": max_input_tokens,
        "reservation_id": reservation_id,
        "request_id": request_id,
    }


def sign_token(claims: Mapping[str, Any], private_key: Ed25519PrivateKey, kid: str) -> str:
    # One pass (`jws_fast.sign`); the same token pyjwt would make, claim for claim.
    return jws_fast.sign(dict(claims), private_key, kid, ALGORITHM)


def public_jwk(public_key: Ed25519PublicKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = jwt.algorithms.OKPAlgorithm.to_jwk(public_key, as_dict=True)
    jwk.update({"kid": kid, "use": "sig", "alg": ALGORITHM})
    return jwk


def parse_token(token: str) -> jws_fast.ParsedToken:
    """Split and decode a token, refusing any algorithm but ours on the header alone."""
    parsed = jws_fast.parse(token, ALGORITHM)
    if parsed.kid is None:
        raise TokenRejected("unknown_kid", "the token names no signing key")
    return parsed


def verify_parsed_stream_token(
    parsed: jws_fast.ParsedToken, public_key: Ed25519PublicKey
) -> StreamGrant:
    """The edge's hot path: `parsed` comes from `parse_token` (which found the kid)."""
    claims = jws_fast.verify(
        parsed,
        public_key,
        audience=STREAM_AUDIENCE,
        issuer=ISSUER,
        leeway=LEEWAY_SECONDS,
        early_leeway=EARLY_LEEWAY_SECONDS,
        require=REQUIRED_CLAIMS,
    )
    return StreamGrant.from_claims(claims, parsed.kid or "")


def verify_stream_token(token: str, public_key: Ed25519PublicKey) -> StreamGrant:
    return verify_parsed_stream_token(parse_token(token), public_key)
