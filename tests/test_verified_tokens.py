"""An access token's signature is checked once per token and key
(`control_plane.verified_tokens`); its claims, its key in the keyring and its
user's row are read on every request."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control_plane.deps import Deps
from control_plane.signing_keys import KeyRingSnapshot
from control_plane.verified_tokens import VerifiedSignatures
from shared import jws_fast
from shared.tokens import (
    API_AUDIENCE,
    ISSUER,
    LEEWAY_SECONDS,
    REQUIRED_CLAIMS,
    TokenRejected,
    parse_token,
    sign_token,
)
from tests.test_control_plane import CP, PASSWORD, data_of, error_of, start_cp


def _token(key: Ed25519PrivateKey, kid: str = "k1", ttl: int = 3600) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": API_AUDIENCE,
        "sub": "user-1",
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
    }
    return sign_token(claims, key, kid)


def _forged(token: str) -> str:
    """The same header and claims under another (canonical) signature."""
    head, body, signature = token.split(".")
    first = "B" if signature[0] == "A" else "A"
    return f"{head}.{body}.{first}{signature[1:]}"


@pytest.fixture
def signature_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tokens whose signature `jws_fast.check_signature` really checked."""
    checked: list[str] = []
    real = jws_fast.check_signature

    def counting(parsed: jws_fast.ParsedToken, key: Any) -> None:
        checked.append(parsed.signing_input.decode())
        real(parsed, key)

    monkeypatch.setattr(jws_fast, "check_signature", counting)
    return checked


def test_a_token_is_checked_once_per_key_object(signature_checks: list[str]) -> None:
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    memo = VerifiedSignatures()
    token = _token(key)
    for _ in range(3):
        memo.check(token, parse_token(token), public)
    assert len(signature_checks) == 1 and len(memo) == 1
    # A reloaded keyring hands out a new object for the same key: checked again, once.
    reloaded = Ed25519PrivateKey.from_private_bytes(key.private_bytes_raw()).public_key()
    memo.check(token, parse_token(token), reloaded)
    memo.check(token, parse_token(token), reloaded)
    assert len(signature_checks) == 2


def test_a_failed_token_is_refused_every_time_and_never_remembered() -> None:
    key = Ed25519PrivateKey.generate()
    memo = VerifiedSignatures()
    good = _token(key)
    memo.check(good, parse_token(good), key.public_key())
    forged = _forged(good)  # a remembered token's claims under another signature
    for _ in range(2):
        with pytest.raises(TokenRejected) as caught:
            memo.check(forged, parse_token(forged), key.public_key())
        assert caught.value.reason == "bad_signature"
    assert len(memo) == 1


def test_a_remembered_token_is_checked_against_another_key() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    memo = VerifiedSignatures()
    token = _token(key)
    memo.check(token, parse_token(token), key.public_key())
    # Its kid now names another key (rotated under the same name): refused.
    with pytest.raises(TokenRejected):
        memo.check(token, parse_token(token), other.public_key())


def test_the_oldest_token_goes_first_when_full(signature_checks: list[str]) -> None:
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    memo = VerifiedSignatures(capacity=2)
    first, second, third = (_token(key) for _ in range(3))
    for token in (first, second, third):
        memo.check(token, parse_token(token), public)
    assert len(memo) == 2 and len(signature_checks) == 3
    memo.check(third, parse_token(third), public)
    memo.check(second, parse_token(second), public)
    assert len(signature_checks) == 3
    memo.check(first, parse_token(first), public)  # evicted: checked again
    assert len(signature_checks) == 4 and len(memo) == 2
    with pytest.raises(ValueError):
        VerifiedSignatures(capacity=0)


def test_the_claims_are_still_read_on_every_use() -> None:
    key = Ed25519PrivateKey.generate()
    memo = VerifiedSignatures()
    token = _token(key, ttl=60)
    parsed = parse_token(token)
    memo.check(token, parsed, key.public_key())
    check = {"audience": API_AUDIENCE, "issuer": ISSUER, "require": REQUIRED_CLAIMS}
    assert jws_fast.check_claims(parsed, leeway=LEEWAY_SECONDS, **check)["sub"] == "user-1"
    later = time.time() + 60 + LEEWAY_SECONDS + 1
    with pytest.raises(TokenRejected) as caught:
        jws_fast.check_claims(parsed, leeway=LEEWAY_SECONDS, now=later, **check)
    assert caught.value.reason == "expired"


# --- through the app ------------------------------------------------------------------


@pytest.fixture
def cp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CP]:
    with start_cp(request, tmp_path, "postgres") as handle:
        yield handle


def _deps(cp: CP) -> Deps:
    deps = cp.app.state.deps
    assert isinstance(deps, Deps)
    return deps


def _signed_in(cp: CP) -> tuple[dict[str, Any], Any]:
    """A new company's owner signed in with its password: the login's answer, and a
    client sending its access token (already used once: the token is remembered)."""
    user = cp.user(cp.company())
    login = data_of(
        cp.client().post("/v1/auth/login", json={"email": user["email"], "password": PASSWORD})
    )
    client = cp.client(login["access_token"])
    assert client.get("/v1/me").status_code == 200
    return login, client


def test_a_remembered_access_token_is_refused_once_its_user_is_revoked(cp: CP) -> None:
    company_id = cp.company()
    owner = cp.user(company_id)
    member = cp.user(company_id, role="member")
    owner_client = cp.client(cp.api_key(owner["id"]))
    login = data_of(
        cp.client().post("/v1/auth/login", json={"email": member["email"], "password": PASSWORD})
    )
    client = cp.client(login["access_token"])
    assert data_of(client.post("/v1/chat/init", json={"query": "hi"}), 201)
    assert data_of(client.get("/v1/me"))["user"]["id"] == member["id"]
    assert len(_deps(cp).verified_signatures) == 1
    revoked = owner_client.post("/v1/admin/revocations", json={"user_id": member["id"]})
    assert revoked.status_code == 201, revoked.text
    error_of(client.post("/v1/chat/init", json={"query": "hi"}), 403, "revoked")
    error_of(client.get("/v1/me"), 403, "revoked")
    # Its forged twin (same claims, another signature) was never accepted.
    error_of(cp.client(_forged(login["access_token"])).get("/v1/me"), 401, "unauthenticated")


def test_a_remembered_access_token_is_refused_once_its_kid_names_another_key(cp: CP) -> None:
    _, client = _signed_in(cp)
    keyring = _deps(cp).keyring
    kid, active = keyring.active()
    # The keyring reloaded with another key under the token's kid.
    other = Ed25519PrivateKey.generate()
    keyring.replace(KeyRingSnapshot(kid, active, {kid: other.public_key()}))
    error_of(client.get("/v1/me"), 401, "unauthenticated")
    keyring.replace(KeyRingSnapshot(kid, active, {kid: active.public_key()}))
    assert client.get("/v1/me").status_code == 200


def test_a_remembered_access_token_is_refused_once_it_expires(
    cp: CP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memo spares only the signature: a remembered token past its `exp` (plus the
    leeway) is refused on its next use, through the app."""
    login, client = _signed_in(cp)
    assert len(_deps(cp).verified_signatures) == 1  # remembered
    expires = orjson.loads(parse_token(login["access_token"]).payload)["exp"]
    later = expires + LEEWAY_SECONDS + 1
    monkeypatch.setattr(jws_fast.time, "time", lambda: later)
    error_of(client.get("/v1/me"), 401, "unauthenticated")
