"""Every forged, stale or misused stream token is refused with 401/403 by the edge
before the backend sees a single request (DESIGN §5, §9 "Token errors")."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.tokens import sign_token
from tests.stack import InProcessStack
from tests.token_claims import claims_of


def _real_key(stack: InProcessStack) -> tuple[str, Ed25519PrivateKey]:
    kid, key = stack.control_plane.state.keyring.active()
    return kid, key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


Forge = Callable[[InProcessStack, str], str]


def expired(stack: InProcessStack, token: str) -> str:
    kid, key = _real_key(stack)
    now = int(time.time())
    return sign_token(
        {**claims_of(token), "iat": now - 400, "nbf": now - 400, "exp": now - 60}, key, kid
    )


def not_yet_valid(stack: InProcessStack, token: str) -> str:
    kid, key = _real_key(stack)
    return sign_token({**claims_of(token), "nbf": int(time.time()) + 120}, key, kid)


def wrong_audience(stack: InProcessStack, token: str) -> str:
    kid, key = _real_key(stack)
    return sign_token({**claims_of(token), "aud": "llm-api"}, key, kid)


def wrong_issuer(stack: InProcessStack, token: str) -> str:
    kid, key = _real_key(stack)
    return sign_token({**claims_of(token), "iss": "evil"}, key, kid)


def wrongly_signed(stack: InProcessStack, token: str) -> str:
    kid, _ = _real_key(stack)
    return sign_token(claims_of(token), Ed25519PrivateKey.generate(), kid)


def unknown_kid(stack: InProcessStack, token: str) -> str:
    return sign_token(claims_of(token), Ed25519PrivateKey.generate(), "no-such-kid")


def alg_none(stack: InProcessStack, token: str) -> str:
    kid, _ = _real_key(stack)
    header = _b64(b'{"alg":"none","typ":"JWT","kid":"' + kid.encode() + b'"}')
    payload = token.split(".")[1]
    return f"{header}.{payload}."


def hs256_confusion(stack: InProcessStack, token: str) -> str:
    """Sign with HMAC using the published public key as the secret (CVE-2015-9235 style)."""
    kid, _ = _real_key(stack)
    jwks = stack.client.http.get(f"{stack.client.cp_url}/.well-known/jwks.json").json()
    public_x = next(k["x"] for k in jwks["keys"] if k["kid"] == kid)
    header = _b64(b'{"alg":"HS256","typ":"JWT","kid":"' + kid.encode() + b'"}')
    payload = token.split(".")[1]
    signing_input = f"{header}.{payload}".encode()
    signature = hmac.new(public_x.encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


def tampered_claims(stack: InProcessStack, token: str) -> str:
    header, _, signature = token.split(".")
    payload = _b64(
        jwt.utils.base64url_decode(token.split(".")[1]).replace(b'"max_tokens":', b'"max_tokens":9')
    )
    return f"{header}.{payload}.{signature}"


FORGERIES: list[Forge] = [
    expired, not_yet_valid, wrong_audience, wrong_issuer, wrongly_signed,
    unknown_kid, alg_none, hs256_confusion, tampered_claims,
]  # fmt: skip


@pytest.mark.parametrize("forge", FORGERIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("path", ["stream", "completions"])
def test_forged_tokens_are_401_before_any_backend_call(
    stack: InProcessStack, forge: Forge, path: str
) -> None:
    c = stack.client
    token = c.new_user(c.new_company("5"))
    grant = c.init_ok(token, {"query": "hello"})
    bad = forge(stack, grant["stream_token"])
    before = c.mock_stats()["requests"]
    if path == "stream":
        response = c.http.get(f"{c.edge_url}/v1/stream", params={"token": bad})
    else:
        response = c.http.post(
            f"{c.edge_url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {bad}"},
            json={"messages": [{"role": "user", "content": "hello"}]},
        )
    assert response.status_code == 401, response.text
    assert response.json()["error"]["type"] == "authentication_error"
    assert c.mock_stats()["requests"] == before
    # The genuine token is still unused: the forgery did not burn it.
    with c.http.stream("GET", grant["stream_url"]) as ok:
        assert ok.status_code == 200
        ok.read()


def test_missing_scope_and_other_model_are_403(stack: InProcessStack) -> None:
    c = stack.client
    token = c.new_user(c.new_company("5"))
    grant = c.init_ok(token, {"query": "hello"})
    kid, key = _real_key(stack)
    no_scope = sign_token(
        {**claims_of(grant["stream_token"]), "scopes": ["llm:chat:read"]}, key, kid
    )
    before = c.mock_stats()["requests"]
    response = c.http.get(f"{c.edge_url}/v1/stream", params={"token": no_scope})
    assert response.status_code == 403
    response = c.http.post(
        f"{c.edge_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {grant['stream_token']}"},
        json={"model": "mock-chat", "messages": [{"role": "user", "content": "hello"}]},
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "model_not_allowed"
    assert c.mock_stats()["requests"] == before


def test_a_token_minted_by_a_clock_ahead_of_the_edges_streams(stack: InProcessStack) -> None:
    """An edge host whose clock runs 20 s behind the control plane's (no time sync,
    a VM resumed from a pause): every token init mints is dated 20 s ahead of it.
    With 5 s of leeway on `iat` and `nbf` the edge refused every fresh token
    `not_yet_valid` (401), each leaving its hold taken until the sweeper's deadline.
    DESIGN §5 allows 30 s; the early side takes it (a token dated ahead can only come
    from a clock, never lets one live longer); `exp` keeps 5 s."""
    c = stack.client
    token = c.new_user(c.new_company("5"))
    grant = c.init_ok(token, {"query": "hello"})
    kid, key = _real_key(stack)
    ahead = int(time.time()) + 20
    claims = {**claims_of(grant["stream_token"]), "iat": ahead, "nbf": ahead}
    skewed = sign_token(claims, key, kid)
    with c.http.stream("GET", f"{c.edge_url}/v1/stream", params={"token": skewed}) as r:
        assert r.status_code == 200, r.read()
        assert b"event: complete" in r.read()
