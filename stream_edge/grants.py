"""Stream grants: verify a token with public keys only (admission.py claims its single use)."""

from __future__ import annotations

from shared.hash_tags import company_tag
from shared.tokens import (
    SCOPE_SEND,
    StreamGrant,
    TokenRejected,
    parse_token,
    verify_parsed_stream_token,
)
from stream_edge.errors import Forbidden, ServiceUnavailable, Unauthorized
from stream_edge.jwks import JWKSCache, KeysUnavailable


def used_key(company_id: str, jti: str) -> str:
    return f"jti:{company_tag(company_id)}:{jti}"


class GrantVerifier:
    def __init__(self, jwks: JWKSCache) -> None:
        self._jwks = jwks

    def retire(self, kids: frozenset[str]) -> None:
        """Refuse the tokens `kids` signed from now on (`revocation_watch`)."""
        self._jwks.retire(kids)

    async def verify(self, token: str) -> StreamGrant:
        """Check signature, alg, aud, iss, time window and scope; raise Unauthorized/Forbidden.

        Raises `TokenRejected` subclasses mapped to 401, and `Forbidden` for scope."""
        try:
            parsed = parse_token(token)
            kid = parsed.kid
            assert kid is not None  # parse_token refuses a token without one
            try:
                key = await self._jwks.key(kid)
            except KeysUnavailable as exc:
                raise ServiceUnavailable(str(exc), code="keys_unavailable") from exc
            if key is None:
                raise TokenRejected("unknown_kid", "the token's signing key is unknown")
            grant = verify_parsed_stream_token(parsed, key)
        except TokenRejected as exc:
            raise TokenUnauthorized(exc.reason, exc.message) from exc
        if SCOPE_SEND not in grant.scopes:
            raise Forbidden("the token does not grant llm:chat:send", code="insufficient_scope")
        return grant


class TokenUnauthorized(Unauthorized):
    """401 with the bounded rejection reason kept for the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
