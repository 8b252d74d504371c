"""Stream grants: verify a token (public keys only) and claim its single use."""

from __future__ import annotations

import time

from shared.store import Store
from shared.tokens import (
    SCOPE_SEND,
    StreamGrant,
    TokenRejected,
    unverified_kid,
    verify_stream_token,
)
from stream_edge.errors import Forbidden, ServiceUnavailable, Unauthorized
from stream_edge.jwks import JWKSCache, KeysUnavailable


def used_key(jti: str) -> str:
    return f"jti:{jti}"


class GrantVerifier:
    def __init__(self, jwks: JWKSCache, store: Store) -> None:
        self._jwks = jwks
        self._store = store

    async def verify(self, token: str) -> StreamGrant:
        """Check signature, alg, aud, iss, time window and scope; raise Unauthorized/Forbidden.

        Raises `TokenRejected` subclasses mapped to 401, and `Forbidden` for scope."""
        try:
            kid = unverified_kid(token)
            try:
                key = await self._jwks.key(kid)
            except KeysUnavailable as exc:
                raise ServiceUnavailable(str(exc), code="keys_unavailable") from exc
            if key is None:
                raise TokenRejected("unknown_kid", "the token's signing key is unknown")
            grant = verify_stream_token(token, key)
        except TokenRejected as exc:
            raise TokenUnauthorized(exc.reason, exc.message) from exc
        if SCOPE_SEND not in grant.scopes:
            raise Forbidden("the token does not grant llm:chat:send", code="insufficient_scope")
        return grant

    async def used_by(self, grant: StreamGrant) -> str | None:
        """The path that already used this token, if any (a cheap pre-check)."""
        first = await self._store.get(used_key(grant.jti))
        return first.decode() if first is not None else None

    async def claim(self, grant: StreamGrant, path: str) -> str | None:
        """Mark the token used by `path`. Returns None on first use, else the path that
        used it first (a reconnect on the same path is a resume, not a second use)."""
        ttl = max(1, grant.expires_at - int(time.time()) + 60)
        key = used_key(grant.jti)
        if await self._store.set_if_absent(key, path.encode(), ttl):
            return None
        first = await self._store.get(key)
        return first.decode() if first is not None else path


class TokenUnauthorized(Unauthorized):
    """401 with the bounded rejection reason kept for the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
