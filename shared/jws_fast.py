"""Verify the edge's stream tokens (compact JWS, EdDSA) in one pass; sign them too.

Written by hand, not with pyjwt, because pyjwt costs the hot path: it validates
every base64url character in a Python generator, and reading the `kid` first makes
it decode the whole token twice. On this project's 2-core bench machine that was
about 1 ms of edge CPU per stream (`make bench`, docs/performance.md), more than the
signature check itself. Here one C-speed regex validates each segment, the token is
split and decoded once, and the signature is checked with `cryptography` directly.

The rules are pyjwt's (2.15), tested side by side with it in tests/test_jws_fast.py
(named cases, plus a differential hypothesis run over thousands of mutated tokens):
segments must be canonical base64url (no padding, unused bits zero);
the algorithm is pinned before any key is used (so `alg: none` and the HS256-with-
the-public-key confusion fail on the header alone); unknown critical headers and
unencoded payloads are refused; `exp`, `nbf`, `iat` are numbers checked with the
leeway; `aud` may be a string or a list; `iss` must match exactly.

`sign` is the other side, for the control plane's init (issue 14.3): the header
pyjwt writes (its keys sorted), the claims as compact JSON, one Ed25519 signature;
pyjwt's `encode` costs ~0.1 ms more per token in its JSON encoder and checks. Its
tokens verify with pyjwt and decode to the same claims (tests/test_jws_fast.py).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
# A segment of 4n+2 (4n+3) characters ends in one whose low 4 (2) bits encode
# nothing. Decoders ignore them, so one signature would have up to 16 spellings;
# only the canonical one, with those bits zero, is a token (GHSA-hxm8-2xgr-2p9m,
# refused by pyjwt since 2.15). These are the characters allowed last.
_CANONICAL_LAST = {
    2: frozenset("AQgw"),  # alphabet index % 16 == 0
    3: frozenset("AEIMQUYcgkosw048"),  # alphabet index % 4 == 0
}


class TokenRejected(Exception):
    """A token failed verification. `reason` is a bounded metric label; the message
    is fit for clients."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class ParsedToken:
    """A token split and decoded, signature not yet checked."""

    header: dict[str, Any]
    payload: bytes
    signing_input: bytes
    signature: bytes

    @property
    def kid(self) -> str | None:
        kid = self.header.get("kid")
        return kid if isinstance(kid, str) and kid else None


def _decode_segment(segment: str) -> bytes:
    rest = len(segment) % 4
    if rest == 1 or _SEGMENT.fullmatch(segment) is None:
        raise TokenRejected("malformed", "the token is not a valid JWT")
    if rest and segment[-1] not in _CANONICAL_LAST[rest]:
        raise TokenRejected("malformed", "the token is not a valid JWT")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise TokenRejected("malformed", "the token is not a valid JWT") from None


def parse(token: str, algorithm: str) -> ParsedToken:
    """Split and decode `token`; refuse it unless its header pins `algorithm`."""
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenRejected("malformed", "the token is not a valid JWT")
    header_segment, payload_segment, signature_segment = parts
    try:
        header = orjson.loads(_decode_segment(header_segment))
    except orjson.JSONDecodeError:
        raise TokenRejected("malformed", "the token is not a valid JWT") from None
    if not isinstance(header, dict):
        raise TokenRejected("malformed", "the token is not a valid JWT")
    if header.get("alg") != algorithm:
        raise TokenRejected("bad_algorithm", "the token's algorithm is not allowed")
    if "crit" in header or header.get("b64", True) is not True:
        raise TokenRejected("malformed", "the token uses header parameters we do not support")
    return ParsedToken(
        header,
        _decode_segment(payload_segment),
        f"{header_segment}.{payload_segment}".encode("ascii"),
        _decode_segment(signature_segment),
    )


def verify(
    parsed: ParsedToken,
    key: Ed25519PublicKey,
    *,
    audience: str,
    issuer: str,
    leeway: int,
    require: tuple[str, ...],
    now: float | None = None,
    early_leeway: int | None = None,
) -> dict[str, Any]:
    """Check the signature, then the registered claims; return the claims."""
    check_signature(parsed, key)
    return check_claims(
        parsed,
        audience=audience,
        issuer=issuer,
        leeway=leeway,
        require=require,
        now=now,
        early_leeway=early_leeway,
    )


def check_signature(parsed: ParsedToken, key: Ed25519PublicKey) -> None:
    """`verify`'s first half: the Ed25519 signature over the token's first two
    segments."""
    try:
        key.verify(parsed.signature, parsed.signing_input)
    except InvalidSignature:
        raise TokenRejected("bad_signature", "the token's signature does not verify") from None


def check_claims(
    parsed: ParsedToken,
    *,
    audience: str,
    issuer: str,
    leeway: int,
    require: tuple[str, ...],
    now: float | None = None,
    early_leeway: int | None = None,
) -> dict[str, Any]:
    """`verify`'s second half: the registered claims, read at `now`; the claims.
    `early_leeway` (default `leeway`): how far ahead of `now` `iat` and `nbf` may be."""
    try:
        claims = orjson.loads(parsed.payload)
    except orjson.JSONDecodeError:
        raise TokenRejected("malformed", "the token is not valid") from None
    if not isinstance(claims, dict):
        raise TokenRejected("malformed", "the token is not valid")
    for name in require:
        if name not in claims:
            raise TokenRejected("malformed", "the token lacks a required claim")
    # pyjwt's order (iat, nbf, exp, iss, aud, sub, jti), so that a token wrong in
    # several ways is refused for the same reason by both.
    moment = time.time() if now is None else now
    exp, nbf, iat = (_numeric(claims, name) for name in ("exp", "nbf", "iat"))
    ahead = moment + (leeway if early_leeway is None else early_leeway)
    if (iat is not None and iat > ahead) or (nbf is not None and nbf > ahead):
        raise TokenRejected("not_yet_valid", "the token is not valid yet")
    if exp is not None and exp <= moment - leeway:
        raise TokenRejected("expired", "the token has expired")
    if claims.get("iss") != issuer:
        raise TokenRejected("bad_issuer", "the token was not issued by this gateway")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud
    if not isinstance(audiences, list) or audience not in audiences:
        raise TokenRejected("bad_audience", "the token is not meant for this service")
    for name in ("sub", "jti"):
        if name in claims and not isinstance(claims[name], str):
            raise TokenRejected("malformed", f"the token's {name!r} claim is not a string")
    return claims


def _numeric(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenRejected("malformed", f"the token's {name!r} claim is not a number")
    return float(value)


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def sign(claims: dict[str, Any], key: Ed25519PrivateKey, kid: str, algorithm: str = "EdDSA") -> str:
    """A compact JWS of `claims`, signed by `key` and naming `kid`.

    The claims must be JSON values (ints for the time claims, as `stream_claims`
    builds them); orjson refuses anything else rather than guessing."""
    header = orjson.dumps({"alg": algorithm, "kid": kid, "typ": "JWT"})
    signing_input = _b64(header) + b"." + _b64(orjson.dumps(claims))
    return (signing_input + b"." + _b64(key.sign(signing_input))).decode("ascii")
