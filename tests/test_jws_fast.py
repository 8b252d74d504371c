"""The edge's hand-written stream-token verifier agrees with pyjwt, token by token:
every token one accepts the other accepts, every token one refuses the other refuses
(with the same reason where pyjwt names one)."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared import jws_fast, tokens

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(now: int, **changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "iss": tokens.ISSUER, "aud": tokens.STREAM_AUDIENCE, "sub": "u", "jti": "j",
        "iat": now, "nbf": now, "exp": now + 60,
    }  # fmt: skip
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def signed(payload: dict[str, object], key: Ed25519PrivateKey = KEY, **headers: object) -> str:
    return jwt.encode(payload, key, algorithm="EdDSA", headers={"kid": "k1", **headers})


def hand_made(header: dict[str, object], payload: bytes, key: Ed25519PrivateKey = KEY) -> str:
    signing_input = f"{b64(orjson.dumps(header))}.{b64(payload)}"
    return f"{signing_input}.{b64(key.sign(signing_input.encode()))}"


HEADER = {"alg": "EdDSA", "typ": "JWT", "kid": "k1"}

CASES: dict[str, Callable[[int], str]] = {
    "valid": lambda now: signed(claims(now)),
    "audience in a list": lambda now: signed(claims(now, aud=["x", tokens.STREAM_AUDIENCE])),
    "expired": lambda now: signed(claims(now, exp=now - 60)),
    "expired within leeway": lambda now: signed(claims(now, exp=now - 2)),
    "not yet valid": lambda now: signed(claims(now, nbf=now + 60)),
    "issued in the future": lambda now: signed(claims(now, iat=now + 60)),
    "wrong audience": lambda now: signed(claims(now, aud="llm-api")),
    "audience list without ours": lambda now: signed(claims(now, aud=["a", "b"])),
    "audience not a string": lambda now: signed(claims(now, aud=7)),
    "wrong issuer": lambda now: signed(claims(now, iss="else")),
    "other key": lambda now: signed(claims(now), OTHER),
    "missing jti": lambda now: signed(claims(now, jti=None)),
    "missing exp": lambda now: signed(claims(now, exp=None)),
    "exp not a number": lambda now: signed(claims(now, exp="soon")),
    "alg none": lambda now: jwt.encode(claims(now), None, algorithm="none", headers={"kid": "k1"}),
    "hs256 with the public key": lambda now: jwt.encode(
        claims(now), b"x" * 32, algorithm="HS256", headers={"kid": "k1"}
    ),
    "tampered payload": lambda now: ".".join(
        (lambda p: [p[0], b64(orjson.dumps(claims(now, sub="admin"))), p[2]])(
            signed(claims(now)).split(".")
        )
    ),
    "critical header": lambda now: hand_made({**HEADER, "crit": ["x"], "x": 1}, b"{}"),
    "payload not an object": lambda now: hand_made(HEADER, b"[1]"),
    "payload not json": lambda now: hand_made(HEADER, b"nope"),
    "bad base64 character": lambda now: signed(claims(now)).replace(".", ".*", 1),
    "padded segment": lambda now: (lambda p: f"{p[0]}==.{p[1]}.{p[2]}")(
        signed(claims(now)).split(".")
    ),
    "four segments": lambda now: signed(claims(now)) + ".e30",
    "two segments": lambda now: signed(claims(now)).rsplit(".", 1)[0],
    "not a token": lambda now: "hello",
}

PYJWT_REASONS = {
    jwt.ExpiredSignatureError: "expired",
    jwt.ImmatureSignatureError: "not_yet_valid",
    jwt.InvalidAudienceError: "bad_audience",
    jwt.InvalidIssuerError: "bad_issuer",
    jwt.InvalidSignatureError: "bad_signature",
}


def pyjwt_verdict(token: str) -> str:
    try:
        jwt.decode(
            token,
            KEY.public_key(),
            algorithms=["EdDSA"],
            audience=tokens.STREAM_AUDIENCE,
            issuer=tokens.ISSUER,
            leeway=tokens.LEEWAY_SECONDS,
            options={"require": list(tokens.REQUIRED_CLAIMS)},
        )
    except jwt.PyJWTError as exc:
        return next((r for kind, r in PYJWT_REASONS.items() if isinstance(exc, kind)), "refused")
    return "ok"


def fast_verdict(token: str) -> str:
    try:
        parsed = jws_fast.parse(token, "EdDSA")
        jws_fast.verify(
            parsed,
            KEY.public_key(),
            audience=tokens.STREAM_AUDIENCE,
            issuer=tokens.ISSUER,
            leeway=tokens.LEEWAY_SECONDS,
            require=tokens.REQUIRED_CLAIMS,
        )
    except jws_fast.TokenRejected as exc:
        return exc.reason
    return "ok"


@pytest.mark.parametrize("case", list(CASES))
def test_same_verdict_as_pyjwt(case: str) -> None:
    token = CASES[case](int(time.time()))
    ours, theirs = fast_verdict(token), pyjwt_verdict(token)
    if theirs in ("ok", *PYJWT_REASONS.values()):
        assert ours == theirs
    else:  # pyjwt's other refusals (malformed, missing claims, bad alg) have no reason
        assert ours != "ok"
