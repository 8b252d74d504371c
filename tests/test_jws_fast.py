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
from hypothesis import given, settings
from hypothesis import strategies as st

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


# --- Non-canonical segments (issue 11.15) and a differential run ------------------

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def flip_unused_bits(segment: str, bits: int) -> str:
    """The same bytes, spelt differently: set some of the last character's unused
    low bits (a 64-byte signature is 86 characters, whose last one carries 4)."""
    spare = {2: 4, 3: 2}[len(segment) % 4]
    last = ALPHABET.index(segment[-1])
    mutated = last | (bits % (2**spare) or 1)
    return segment[:-1] + ALPHABET[mutated]


@pytest.mark.parametrize("bits", range(1, 16))
def test_a_signature_with_its_unused_bits_set_is_refused(bits: int) -> None:
    """GHSA-hxm8-2xgr-2p9m: base64 decoders ignore the unused bits, so one signature
    has up to 16 spellings; pyjwt >= 2.15 refuses all but the canonical one."""
    token = signed(claims(int(time.time())))
    head, body, signature = token.split(".")
    mutated = f"{head}.{body}.{flip_unused_bits(signature, bits)}"
    assert mutated != token
    assert pyjwt_verdict(mutated) == "refused"
    assert fast_verdict(mutated) == "malformed"


@pytest.mark.parametrize("segment", [0, 1])
def test_header_and_payload_must_be_canonical_too(segment: int) -> None:
    now = int(time.time())
    for payload in (claims(now), claims(now, sub="ab"), claims(now, sub="abc")):
        parts = signed(payload).split(".")
        if len(parts[segment]) % 4 in (2, 3):
            parts[segment] = flip_unused_bits(parts[segment], 1)
            mutated = ".".join(parts)
            assert pyjwt_verdict(mutated) == "refused"
            assert fast_verdict(mutated) == "malformed"


OFFSETS = st.sampled_from([None, -7200, -60, -2, 0, 2, 60, 7200])


@st.composite
def tokens_and_mutations(draw: st.DrawFn) -> str:
    now = int(time.time())
    exp, nbf, iat = (draw(OFFSETS) for _ in range(3))
    payload = claims(
        now,
        exp=None if exp is None else now + exp,
        nbf=None if nbf is None else now + nbf,
        iat=None if iat is None else now + iat,
        aud=draw(st.sampled_from([tokens.STREAM_AUDIENCE, "else", ["a", tokens.STREAM_AUDIENCE]])),
        iss=draw(st.sampled_from([tokens.ISSUER, "else"])),
        # text of any length varies every segment's length mod 4; a number is refused
        sub=draw(st.one_of(st.text(max_size=5), st.integers(0, 9))),
    )
    token = signed(payload, draw(st.sampled_from([KEY, KEY, OTHER])))
    parts = token.split(".")
    kind = draw(st.sampled_from(["none", "bits", "char", "drop", "add", "pad", "swap"]))
    i = draw(st.integers(0, 2))
    segment = parts[i]
    if kind == "bits" and len(segment) % 4 in (2, 3):
        parts[i] = flip_unused_bits(segment, draw(st.integers(1, 15)))
    elif kind == "char" and segment:
        at = draw(st.integers(0, len(segment) - 1))
        char = draw(st.sampled_from([*ALPHABET, "=", "+", "/", "*", " "]))
        parts[i] = segment[:at] + char + segment[at + 1 :]
    elif kind == "drop" and segment:
        at = draw(st.integers(0, len(segment) - 1))
        parts[i] = segment[:at] + segment[at + 1 :]
    elif kind == "add":
        parts[i] = segment + draw(st.sampled_from(ALPHABET))
    elif kind == "pad":
        parts[i] = segment + "=" * draw(st.integers(1, 3))
    elif kind == "swap":
        j = draw(st.integers(0, 2))
        parts[i], parts[j] = parts[j], parts[i]
    return ".".join(parts)


@settings(max_examples=2000, deadline=None, derandomize=True)
@given(tokens_and_mutations())
def test_differential_same_verdict_as_pyjwt(token: str) -> None:
    """Thousands of good and mutated tokens: jws_fast and pyjwt agree. The one
    deliberate difference: compact JWS has no padding (RFC 7515 §2), so a segment
    ending in '=' is refused here even where pyjwt tolerates it."""
    ours, theirs = fast_verdict(token), pyjwt_verdict(token)
    if "=" in token:
        assert ours != "ok"
    elif theirs in ("ok", *PYJWT_REASONS.values()):
        assert ours == theirs
    else:
        assert ours != "ok"


# --- the signing side (`jws_fast.sign`, used by `tokens.sign_token`) ---


def stream_token_claims(now: int) -> dict[str, object]:
    claims = tokens.stream_claims(
        user_id="u1", company_id="c1", role="member", scopes=list(tokens.ALL_SCOPES),
        session_id="s1", model="mock-fast", max_tokens=256, max_input_tokens=12,
        reservation_id="r1", request_id="req1", now=now, ttl_seconds=60, jti="j1",
    )  # fmt: skip
    claims[tokens.FALLBACKS_CLAIM] = [tokens.FallbackGrant("mock-slow", 12, "sealed", 128).claim()]
    return claims


def test_a_signed_stream_token_is_the_one_pyjwt_makes() -> None:
    # Ed25519 signatures are deterministic: same header, same claims, same bytes.
    payload = stream_token_claims(int(time.time()))
    ours = jws_fast.sign(payload, KEY, "k1")
    assert ours == signed(payload)
    verified = jwt.decode(
        ours, KEY.public_key(), algorithms=["EdDSA"], audience=tokens.STREAM_AUDIENCE,
        issuer=tokens.ISSUER,
    )  # fmt: skip
    assert verified == payload
    assert jwt.get_unverified_header(ours) == {"alg": "EdDSA", "kid": "k1", "typ": "JWT"}


def test_sign_token_verifies_at_the_edge_and_with_pyjwt() -> None:
    now = int(time.time())
    token = tokens.sign_token(stream_token_claims(now), KEY, "k1")
    assert fast_verdict(token) == pyjwt_verdict(token) == "ok"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(extra=st.dictionaries(st.text(max_size=6), json_values, max_size=4))
def test_differential_signed_claims_decode_the_same_with_pyjwt(extra: dict[str, object]) -> None:
    payload = {**extra, **claims(int(time.time()))}
    decoded = jwt.decode(
        jws_fast.sign(payload, KEY, "k1"), KEY.public_key(), algorithms=["EdDSA"],
        audience=tokens.STREAM_AUDIENCE, issuer=tokens.ISSUER,
    )  # fmt: skip
    assert decoded == payload
