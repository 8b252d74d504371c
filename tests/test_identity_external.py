"""Trusted external JWTs: HS256 with a shared secret, RS256/ES256/EdDSA from a JWKS
served by a tiny test server; users and companies provisioned on first sight."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from sqlalchemy import create_engine
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from control_plane.app import create_app
from control_plane.errors import Unauthenticated
from control_plane.external_auth import JWKS_CACHE_SECONDS, ExternalVerifier, identity_from_claims
from control_plane.settings import ControlPlaneSettings
from control_plane.tables import User, new_id, utcnow
from shared.store_memory import MemoryStore
from tests.harness import ServerGroup, bind_free_socket, url_of
from tests.stack import ADMIN_TOKEN, base_env
from tests.test_control_plane import CP, data_of, error_of, start_cp

SECRET = "an-existing-apps-hs256-secret-of-32-bytes+"
AUDIENCE = "llm-gateway-users"
ISSUER = "https://idp.example/"


def _keys() -> dict[str, Any]:
    return {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }


def _jwk(alg: str, key: Any) -> dict[str, Any]:
    public = key.public_key()
    algorithm = {
        "RS256": jwt.algorithms.RSAAlgorithm,
        "ES256": jwt.algorithms.ECAlgorithm,
        "EdDSA": jwt.algorithms.OKPAlgorithm,
    }[alg]
    doc: dict[str, Any] = algorithm.to_jwk(public, as_dict=True)  # type: ignore[attr-defined]
    doc.update({"kid": f"kid-{alg}", "alg": alg, "use": "sig"})
    return doc


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return _keys()


@pytest.fixture(scope="module")
def jwks_url(keys: dict[str, Any]) -> Iterator[str]:
    document = {"keys": [_jwk(alg, key) for alg, key in keys.items()]}

    async def jwks(request: Request) -> JSONResponse:
        return JSONResponse(document)

    app = Starlette(routes=[Route("/.well-known/jwks.json", jwks)])
    sock = bind_free_socket()
    with ServerGroup([(app, sock)]):
        yield f"{url_of(sock)}/.well-known/jwks.json"


@pytest.fixture(params=["sqlite", "postgres"])
def cp(request: pytest.FixtureRequest, tmp_path: Path, jwks_url: str) -> Iterator[CP]:
    extra = {
        "LLMGW_AUTH_JWT_SECRET": SECRET,
        "LLMGW_AUTH_JWKS_URL": jwks_url,
        "LLMGW_AUTH_JWT_AUDIENCE": AUDIENCE,
        "LLMGW_AUTH_JWT_ISSUER": ISSUER,
    }
    with start_cp(request, tmp_path, request.param, extra) as handle:
        yield handle


def _claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": f"ext-user-{uuid.uuid4().hex[:8]}",
        "company_id": f"ext-co-{uuid.uuid4().hex[:8]}",
        "role": "member",
        "aud": AUDIENCE,
        "iss": ISSUER,
        "iat": now,
        "exp": now + 300,
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _token(keys: dict[str, Any], alg: str, **changes: Any) -> str:
    if alg == "HS256":
        return jwt.encode(_claims(**changes), SECRET, algorithm="HS256")
    return jwt.encode(_claims(**changes), keys[alg], algorithm=alg, headers={"kid": f"kid-{alg}"})


@pytest.mark.parametrize("alg", ["HS256", "RS256", "ES256", "EdDSA"])
def test_each_algorithm_provisions_on_first_sight(cp: CP, keys: dict[str, Any], alg: str) -> None:
    claims = _claims(
        email="Ext.Person@Example.com", email_verified=True, company_name="Acme " + alg
    )
    token = _token(keys, alg, **claims)
    me = data_of(cp.client(token).get("/v1/me"))
    assert me["user"]["role"] == "member" and me["user"]["email"] == "ext.person@example.com"
    assert me["company"]["name"] == "Acme " + alg
    assert me["credits"] == {"balance": "0.000000", "held": "0.000000", "available": "0.000000"}
    # Second sight: the same user and company, not new ones; the role follows the token.
    again = data_of(cp.client(_token(keys, alg, **{**claims, "role": "owner"})).get("/v1/me"))
    assert again["user"]["id"] == me["user"]["id"] and again["company"] == me["company"]
    assert again["user"]["role"] == "owner"
    # A new company has no credits: init is refused with 402, not an error.
    error_of(
        cp.client(token).post("/v1/chat/init", json={"query": "hi"}), 402, "insufficient_credits"
    )
    # Credits granted to the provisioned company make it work.
    data_of(
        cp.admin.post(
            f"/v1/admin/companies/{me['company']['id']}/credits",
            json={"amount": "1", "reason": "welcome"},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        ),
        201,
    )
    data_of(cp.client(token).post("/v1/chat/init", json={"query": "hi"}), 201)


def test_bad_tokens_are_refused(cp: CP, keys: dict[str, Any]) -> None:
    now = int(time.time())
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = {
        "wrong secret": jwt.encode(_claims(), "another-secret-that-is-32-bytes-long!", "HS256"),
        "wrong key": jwt.encode(_claims(), other_rsa, "RS256", headers={"kid": "kid-RS256"}),
        "expired": _token(keys, "ES256", iat=now - 600, exp=now - 120),
        "expired hs256": _token(keys, "HS256", iat=now - 600, exp=now - 120),
        "no exp": _token(keys, "HS256", exp=None),
        "wrong audience": _token(keys, "EdDSA", aud="someone-else"),
        # A token the same identity provider minted for another of its services.
        "another service's token": _token(keys, "HS256", aud="billing-service"),
        "audience list without ours": _token(keys, "RS256", aud=["billing-service", "x"]),
        "no audience": _token(keys, "HS256", aud=None),
        "foreign issuer": _token(keys, "HS256", iss="https://evil.example/"),
        "no issuer": _token(keys, "ES256", iss=None),
        "unknown kid": jwt.encode(_claims(), keys["RS256"], "RS256", headers={"kid": "nope"}),
        "alg none": jwt.encode(_claims(), None, algorithm="none"),
        "RS384 not allowed": jwt.encode(
            _claims(), keys["RS256"], "RS384", headers={"kid": "kid-RS256"}
        ),
        "no company": _token(keys, "HS256", company_id=None),
        "bad role": _token(keys, "HS256", role="superuser"),
        "garbage": "not.a.jwt",
    }
    for name, token in cases.items():
        r = cp.client(token).get("/v1/me")
        assert r.status_code == 401, (name, r.text)
        assert r.json()["error"]["code"] == "unauthenticated", name


def test_roles_scopes_and_companies(cp: CP, keys: dict[str, Any]) -> None:
    # `admin` from another app is capped at owner: never a platform admin.
    admin_token = _token(keys, "RS256", role="admin")
    assert data_of(cp.client(admin_token).get("/v1/me"))["user"]["role"] == "owner"
    error_of(
        cp.client(admin_token).post("/v1/admin/companies", json={"name": "x"}), 403, "forbidden"
    )
    # Scopes narrow the role's: read-only cannot init.
    reader = _token(keys, "HS256", scopes=["llm:chat:read"])
    data_of(cp.client(reader).get("/v1/sessions"))
    error_of(cp.client(reader).post("/v1/chat/init", json={"query": "hi"}), 403, "forbidden")
    # Two users of one new company share it; a user cannot hop to another company.
    company = f"shared-{uuid.uuid4().hex[:6]}"
    first = data_of(cp.client(_token(keys, "HS256", company_id=company)).get("/v1/me"))
    second = data_of(cp.client(_token(keys, "ES256", company_id=company)).get("/v1/me"))
    assert first["company"]["id"] == second["company"]["id"]
    hopper = _claims(company_id=company)
    data_of(cp.client(_token(keys, "HS256", **hopper)).get("/v1/me"))
    moved = {**hopper, "company_id": "elsewhere-" + uuid.uuid4().hex[:6]}
    error_of(cp.client(_token(keys, "HS256", **moved)).get("/v1/me"), 401, "unauthenticated")
    # An email is taken only when the provider says it verified it (a JSON true).
    victim = f"victim-{uuid.uuid4().hex[:6]}@example.com"
    for verified in (None, False, "true", 1):
        me = data_of(
            cp.client(_token(keys, "HS256", email=victim, email_verified=verified)).get("/v1/me")
        )
        assert me["user"]["email"].endswith("@external.invalid"), (verified, me)
    me = data_of(cp.client(_token(keys, "HS256", email=victim, email_verified=True)).get("/v1/me"))
    assert me["user"]["email"] == victim
    # Revoking a provisioned user works like any other.
    user = data_of(cp.client(_token(keys, "HS256", **hopper)).get("/v1/me"))["user"]
    data_of(cp.admin.post("/v1/admin/revocations", json={"user_id": user["id"]}), 201)
    error_of(cp.client(_token(keys, "HS256", **hopper)).get("/v1/me"), 403, "revoked")
    # Our own access tokens still work next to external ones.
    owner = cp.user(first["company"]["id"])
    login = data_of(
        cp.client().post(
            "/v1/auth/login", json={"email": owner["email"], "password": "correct horse"}
        )
    )
    assert data_of(cp.client(login["access_token"]).get("/v1/me"))["user"]["id"] == owner["id"]


@pytest.mark.parametrize(
    ("claims", "role", "scopes"),
    [
        ({"role": "owner"}, "owner", None),
        ({"role": "admin"}, "owner", None),
        ({"role": "member", "scope": "llm:chat:read other"}, "member", ("llm:chat:read", "other")),
        ({"role": "member", "scopes": ["llm:chat:send"]}, "member", ("llm:chat:send",)),
    ],
)
def test_identity_from_claims(claims: dict[str, Any], role: str, scopes: Any) -> None:
    ident = identity_from_claims({"sub": "s", "company_id": "c", **claims})
    assert (ident.role, ident.scopes) == (role, scopes)


@pytest.mark.parametrize(
    "claims",
    [
        {"company_id": "c", "role": "member"},
        {"sub": "s", "role": "member"},
        {"sub": "s", "company_id": "c"},
        {"sub": "s", "company_id": "c", "role": "member", "scopes": [1]},
        {"sub": "s", "company_id": "c", "role": ["member"]},  # unhashable: was a TypeError
        {"sub": "s", "company_id": "c", "role": {"member": 1}},
        {"sub": "", "company_id": "c", "role": "member"},
        {"sub": "s", "company_id": "c" * 201, "role": "member"},
    ],
)
def test_identity_from_claims_rejects(claims: dict[str, Any]) -> None:
    with pytest.raises(Unauthenticated):
        identity_from_claims(claims)


def test_settings_for_identity_and_limits() -> None:
    from control_plane.settings import ControlPlaneSettings
    from shared.settings import ConfigError
    from tests.conftest import new_webhook_secret

    base = {"LLMGW_WEBHOOK_SECRET": new_webhook_secret()}
    settings = ControlPlaneSettings.from_env(base)
    assert (settings.init_rate_per_user, settings.init_rate_per_company) == (120, 1200)
    assert settings.auth_jwt_secret is None and settings.auth_jwks_url is None
    external = {
        "LLMGW_AUTH_JWT_SECRET": SECRET,
        "LLMGW_AUTH_JWKS_URL": "https://idp.example/.well-known/jwks.json",
        "LLMGW_AUTH_JWT_AUDIENCE": AUDIENCE,
        "LLMGW_AUTH_JWT_ISSUER": ISSUER,
    }
    settings = ControlPlaneSettings.from_env({**base, **external, "LLMGW_INIT_RATE_PER_USER": "5"})
    assert settings.auth_jwt_secret is not None and SECRET not in repr(settings)
    assert settings.auth_jwt_issuer == ISSUER and settings.auth_jwt_audience == AUDIENCE
    assert settings.init_rate_per_user == 5
    # External auth on without an audience or an issuer: refused at start, one line
    # naming the missing variable (else another service's tokens would sign users in).
    for source in ("LLMGW_AUTH_JWT_SECRET", "LLMGW_AUTH_JWKS_URL"):
        on = {source: external[source]}
        for missing in ("LLMGW_AUTH_JWT_AUDIENCE", "LLMGW_AUTH_JWT_ISSUER"):
            given = {k: v for k, v in external.items() if k.endswith(("AUDIENCE", "ISSUER"))}
            del given[missing]
            with pytest.raises(ConfigError, match=missing) as refused:
                ControlPlaneSettings.from_env({**base, **on, **given})
            assert "\n" not in str(refused.value)
    # Settings built some other way cannot switch it on without them either.
    from dataclasses import replace

    from control_plane.external_auth import ExternalVerifier

    assert ExternalVerifier.from_settings(settings) is not None
    for unset in ({"auth_jwt_audience": None}, {"auth_jwt_issuer": None}):
        with pytest.raises(ConfigError):
            ExternalVerifier.from_settings(replace(settings, **unset))
    for name, value in (
        ("LLMGW_AUTH_JWT_SECRET", "short"),
        ("LLMGW_AUTH_JWKS_URL", "ftp://idp"),
        ("LLMGW_INIT_RATE_PER_USER", "0"),
        ("LLMGW_INIT_RATE_PER_COMPANY", "many"),
    ):
        with pytest.raises(ConfigError, match=name):
            ControlPlaneSettings.from_env({**base, name: value})


@pytest.mark.parametrize(
    ("extra", "email"),
    [
        ({"email": "a@b.example"}, None),  # unverified: never used
        ({"email": "a@b.example", "email_verified": "true"}, None),  # not a JSON true
        ({"email": "a@b.example", "email_verified": True}, "a@b.example"),
    ],
)
def test_only_a_verified_email_is_used(extra: dict[str, Any], email: str | None) -> None:
    ident = identity_from_claims({"sub": "s", "company_id": "c", "role": "member", **extra})
    assert ident.email == email


class IdentityProvider:
    """A JWKS server on a real socket that counts connections; once `silent`, it
    accepts them and never answers (a hung or partitioned provider)."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.body = json.dumps(document).encode()
        self.silent = False
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> IdentityProvider:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/.well-known/jwks.json"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        if self.silent:
            await reader.read()  # until the client gives up
            return
        await reader.readuntil(b"\r\n\r\n")
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(self.body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + self.body)
        await writer.drain()
        writer.close()

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._writers:
            writer.close()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


async def until(condition: Any, deadline: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not condition():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_silent_idp_neither_stalls_logins_nor_drops_known_keys(
    tmp_path: Path, keys: dict[str, Any]
) -> None:
    """Review 4: the keys were fetched by `jwt.PyJWKClient` in the default thread pool,
    one blocking fetch per made-up token, and dropped once their lifespan passed."""
    async with IdentityProvider({"keys": [_jwk("RS256", keys["RS256"])]}) as idp:
        env = {
            **base_env(f"sqlite:///{tmp_path}/cp.db"),
            "LLMGW_AUTH_JWKS_URL": idp.url,
            "LLMGW_AUTH_JWT_AUDIENCE": AUDIENCE,
            "LLMGW_AUTH_JWT_ISSUER": ISSUER,
        }
        settings = ControlPlaneSettings.from_env(env)

        # A token verified while the provider answers still verifies once it has gone
        # silent past the cache's lifespan (a clock moved on, not slept through).
        now = [0.0]
        verifier = ExternalVerifier(settings, clock=lambda: now[0])
        token = _token(keys, "RS256")
        try:
            assert (await verifier.verify(token)).role == "member"
            idp.silent = True
            now[0] += JWKS_CACHE_SECONDS + 1
            assert (await verifier.verify(token)).role == "member"
            await verifier.verify(token)  # the refresh in the background, not a second
            await until(lambda: idp.connections >= 2)
        finally:
            await verifier.aclose()

        # A control plane whose provider never answered: made-up RS256 tokens queue
        # behind one fetch, and password logins do not queue behind them.
        app = create_app(settings, MemoryStore())
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://cp") as http,
        ):
            admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            company = await http.post("/v1/admin/companies", json={"name": "a"}, headers=admin)
            user = {"email": f"{uuid.uuid4().hex[:8]}@a.example", "password": "pw-123456"}
            created = await http.post(
                "/v1/admin/users",
                headers=admin,
                json={"company_id": company.json()["data"]["id"], "role": "member", **user},
            )
            assert created.status_code == 201, created.text
            other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            before = idp.connections
            assert before == 2  # the verifier's: one fetch, one refresh

            async def junk() -> httpx.Response:
                forged = jwt.encode(
                    _claims(), other, "RS256", headers={"kid": f"made-up-{uuid.uuid4().hex}"}
                )
                return await http.get("/v1/me", headers={"Authorization": f"Bearer {forged}"})

            attacks = [asyncio.create_task(junk()) for _ in range(30)]
            try:
                await until(lambda: idp.connections > before)
                login = await asyncio.wait_for(http.post("/v1/auth/login", json=user), 3.0)
                assert login.status_code == 200, login.text
                assert idp.connections == before + 1
                assert not any(attack.done() for attack in attacks)  # all wait on that one
            finally:
                for attack in attacks:
                    attack.cancel()
                await asyncio.gather(*attacks, return_exceptions=True)


def test_an_owner_cannot_squat_the_address_an_external_user_is_given(
    cp: CP, keys: dict[str, Any]
) -> None:
    """Attack: an owner of a company of its own creates a user at the address an
    external user without a verified email gets (`sha256(sub)[:32]@external.invalid`,
    its `sub` read off a profile URL): that user's every token was a 500."""
    victim = _claims(company_id=f"victims-{uuid.uuid4().hex[:6]}")
    squatted = hashlib.sha256(victim["sub"].encode()).hexdigest()[:32] + "@external.invalid"
    company_id = cp.company()
    owner = cp.client(cp.api_key(cp.user(company_id, "owner", password=None)["id"]))
    r = owner.post("/v1/admin/users", json={"company_id": company_id, "email": squatted})
    error_of(r, 422, "validation_error")

    me = data_of(cp.client(_token(keys, "HS256", **victim)).get("/v1/me"))
    assert me["user"]["email"] == squatted


def test_an_address_squatted_before_the_rule_does_not_lock_the_external_user_out(
    cp: CP, keys: dict[str, Any]
) -> None:
    """A user stored at an external user's address before the domain was reserved:
    that user still signs in (before the fix: 500 on every token), at another
    address of the reserved domain."""
    victim = _claims(company_id=f"victims-{uuid.uuid4().hex[:6]}")
    squatted = hashlib.sha256(victim["sub"].encode()).hexdigest()[:32] + "@external.invalid"
    company_id = cp.company()
    engine = create_engine(cp.settings.database_url)
    with Session(engine) as session:
        session.add(
            User(
                id=new_id(),
                company_id=company_id,
                email=squatted,
                role="owner",
                created_at=utcnow(),
            )
        )
        session.commit()
    engine.dispose()

    me = data_of(cp.client(_token(keys, "HS256", **victim)).get("/v1/me"))
    assert me["user"]["email"].endswith("@external.invalid") and me["user"]["email"] != squatted
    again = data_of(cp.client(_token(keys, "HS256", **victim)).get("/v1/me"))
    assert again["user"] == me["user"]


@pytest.mark.parametrize("claim", ["sub", "company_id", "company_name", "email"])
def test_a_claim_with_nul_is_a_401_not_a_500(cp: CP, keys: dict[str, Any], claim: str) -> None:
    """Attack: a user of the trusted app puts a NUL in what the app signs for it (its
    display name as `company_name`, an address): PostgreSQL text cannot hold it, and
    each of its requests was a 500 (measured on postgres: 500 for all four claims).
    Now the token is refused (401), and nothing is stored."""
    company_id = f"nul-co-{uuid.uuid4().hex[:6]}"
    value = "a\x00b@example.com" if claim == "email" else "a\x00b"
    claims = {"company_id": company_id, "email_verified": True, claim: value}
    token = _token(keys, "HS256", **claims)
    error_of(cp.client(token).get("/v1/me"), 401, "unauthenticated")
    # The same user without the NUL signs in, in a company no NUL token made.
    clean = _token(keys, "HS256", company_id=company_id)
    assert data_of(cp.client(clean).get("/v1/me"))["company"]["name"] == company_id


def test_a_token_whose_exp_is_a_string_is_refused_not_left_unsignable(
    cp: CP, keys: dict[str, Any]
) -> None:
    """Attack: the trusted app writes `exp` as a digit string (pyjwt reads it as a
    date); the token signed in, but had no expiry here, so its holder's sign-out was
    refused (measured: 200 at /v1/me, then 400 not_signed_in "carries no jti" for a
    token that has one, and the token worked on). A NumericDate is a JSON number, as
    our own verifier reads it: such a token is refused (401)."""
    now = int(time.time())
    for claim, value in (("exp", str(now + 300)), ("iat", str(now)), ("exp", True)):
        token = _token(keys, "HS256", jti="session-1", **{claim: value})
        error_of(cp.client(token).get("/v1/me"), 401, "unauthenticated")
        error_of(cp.client(token).post("/v1/auth/logout"), 401, "unauthenticated")
    # A float exp is a number: signed in, and signed out.
    client = cp.client(_token(keys, "HS256", jti="session-2", exp=now + 300.5))
    data_of(client.get("/v1/me"))
    assert data_of(client.post("/v1/auth/logout")) == {"signed_out": True}
    error_of(client.get("/v1/me"), 401, "signed_out")


def test_a_demoted_owner_replaying_an_older_token_does_not_climb_back(
    cp: CP, keys: dict[str, Any]
) -> None:
    """Attack: an external owner mints itself an owner key, is demoted at the trusted
    app (whose next token says `member`), then replays a token issued before the
    demotion and still unexpired. The role followed whichever token came last: the
    old token made it an owner again in our rows, and its key then kept `llm:admin`
    for good, long after that token expired (measured: /v1/me role owner, the key's
    GET /v1/admin/users 200). Now a role is taken from a token only when it was
    issued no earlier than the token that set the current one (`iat`)."""
    now = int(time.time())
    company_id = f"demoted-{uuid.uuid4().hex[:6]}"
    who = {"sub": f"ext-{uuid.uuid4().hex[:8]}", "company_id": company_id}
    old_owner = cp.client(_token(keys, "RS256", role="owner", iat=now - 60, exp=now + 600, **who))
    me = data_of(old_owner.get("/v1/me"))["user"]
    assert me["role"] == "owner"
    r = old_owner.post("/v1/admin/api-keys", json={"user_id": me["id"]})
    key = cp.client(data_of(r, 201)["key"])
    # An owner's key lists its company's users; a member's finds no such list (404).
    data_of(key.get("/v1/admin/users"))

    # Demoted at the trusted app: its new token says member, and the key follows.
    new_member = cp.client(_token(keys, "RS256", role="member", iat=now, exp=now + 600, **who))
    assert data_of(new_member.get("/v1/me"))["user"]["role"] == "member"
    error_of(key.get("/v1/admin/users"), 404, "not_found")

    # The older owner token, replayed: a member it stays, and so does its key.
    assert data_of(old_owner.get("/v1/me"))["user"]["role"] == "member"
    error_of(old_owner.get("/v1/admin/users"), 404, "not_found")
    error_of(key.get("/v1/admin/users"), 404, "not_found")

    # A promotion the app makes later (a newer token) still takes effect.
    promoted = cp.client(_token(keys, "RS256", role="owner", iat=now + 1, exp=now + 600, **who))
    assert data_of(promoted.get("/v1/me"))["user"]["role"] == "owner"
    data_of(key.get("/v1/admin/users"))


def test_without_iat_a_demoted_owner_replaying_an_older_token_does_not_climb_back(
    cp: CP, keys: dict[str, Any]
) -> None:
    """The same attack against a trusted app whose tokens carry no `iat` (optional in
    RFC 7519; pyjwt, among others, leaves it out unless asked): with no order between
    tokens the role followed whichever came last, so the replayed owner token made the
    demoted user an owner again, and its key kept `llm:admin` after that token expired
    (measured: /v1/me owner, the key's GET /v1/admin/users 200). Such an app's tokens
    are ordered by `exp`, which it must send: a token issued later, for the same life,
    expires later."""
    now = int(time.time())
    who = {"sub": f"ext-{uuid.uuid4().hex[:8]}", "company_id": f"no-iat-{uuid.uuid4().hex[:6]}"}
    # Issued a minute apart, each for ten minutes.
    old_owner = cp.client(_token(keys, "RS256", role="owner", iat=None, exp=now + 540, **who))
    me = data_of(old_owner.get("/v1/me"))["user"]
    key = cp.client(
        data_of(old_owner.post("/v1/admin/api-keys", json={"user_id": me["id"]}), 201)["key"]
    )
    new_member = cp.client(_token(keys, "RS256", role="member", iat=None, exp=now + 600, **who))
    assert data_of(new_member.get("/v1/me"))["user"]["role"] == "member"

    assert data_of(old_owner.get("/v1/me"))["user"]["role"] == "member"
    error_of(key.get("/v1/admin/users"), 404, "not_found")

    promoted = cp.client(_token(keys, "RS256", role="owner", iat=None, exp=now + 601, **who))
    assert data_of(promoted.get("/v1/me"))["user"]["role"] == "owner"
    data_of(key.get("/v1/admin/users"))


def test_an_older_token_cannot_undo_a_newer_one_that_kept_the_role(
    cp: CP, keys: dict[str, Any]
) -> None:
    """Attack: the app promotes a member (an owner token, kept unused) and demotes it
    again (a member token, presented). The newer token changed no role, so the row
    kept the first token's `iat`, and the kept owner token, older than the app's last
    word but newer than that, made the member an owner (measured: /v1/me owner, the
    company's users listed). Every token at least as new as the last one seen moves
    the row's `iat`, whatever it says of the role."""
    now = int(time.time())
    who = {"sub": f"ext-{uuid.uuid4().hex[:8]}", "company_id": f"kept-{uuid.uuid4().hex[:6]}"}
    first = cp.client(_token(keys, "RS256", role="member", iat=now - 120, exp=now + 600, **who))
    assert data_of(first.get("/v1/me"))["user"]["role"] == "member"
    kept_owner = cp.client(_token(keys, "RS256", role="owner", iat=now - 60, exp=now + 600, **who))
    latest = cp.client(_token(keys, "RS256", role="member", iat=now, exp=now + 600, **who))
    assert data_of(latest.get("/v1/me"))["user"]["role"] == "member"

    assert data_of(kept_owner.get("/v1/me"))["user"]["role"] == "member"
    error_of(kept_owner.get("/v1/admin/users"), 404, "not_found")


@pytest.mark.parametrize("claim", ["sub", "company_id", "company_name", "email", "jti"])
def test_a_claim_with_a_lone_surrogate_is_a_401_not_a_500(
    cp: CP, keys: dict[str, Any], claim: str
) -> None:
    """Attack: what the trusted app signs carries a JSON ``\\ud800`` escape (a lone
    surrogate: the JSON is valid, the string has no UTF-8). Hashing the `sub` or
    `jti`, or storing any of them, raised: each request with the token, its sign-out
    too, was a 500 (measured on sqlite and postgres, all five claims). Now 401."""
    value = "a\ud800b@example.com" if claim == "email" else "a\ud800b"
    claims = {"email_verified": True, "jti": "session-1", claim: value}
    token = _token(keys, "HS256", **claims)
    error_of(cp.client(token).get("/v1/me"), 401, "unauthenticated")
    error_of(cp.client(token).post("/v1/auth/logout"), 401, "unauthenticated")
