"""The control plane on a real socket, on both backends: SQLite + in-memory store,
and PostgreSQL + Redis. Each test gets a fresh app and a fresh database."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from cryptography.fernet import Fernet
from sqlmodel import SQLModel
from starlette.applications import Starlette
from starlette.routing import Route

from control_plane.app import create_app
from control_plane.books import check_books
from control_plane.db import create_sync_engine
from control_plane.migrate import current, head, upgrade
from control_plane.seed import seed_demo
from control_plane.settings import ControlPlaneSettings
from shared.input_size import params_tokens
from shared.pricing import MICRO, cost_micro, estimate_input_tokens, format_credits
from shared.stash import StashedRequest, stash_key
from shared.store_memory import MemoryStore
from shared.tokens import (
    API_AUDIENCE,
    ISSUER,
    PARENT_CLAIM,
    STREAM_CLAIMS,
    sign_token,
    verify_stream_token,
)
from shared.webhooks import UsageEvent, sign
from tests.conftest import (
    REDIS_URL,
    fresh_pg_database,
    fresh_redis_prefix,
    migrated_sqlite,
    new_webhook_secret,
)
from tests.harness import ServerGroup, bind_free_socket, url_of
from tests.token_claims import claims_of, jti_of

ADMIN_TOKEN = "test-admin-token-" + uuid.uuid4().hex
# Tests that do not depend on the backend run on SQLite only, to keep the file fast.
sqlite_only = pytest.mark.parametrize("cp", ["sqlite"], indirect=True)
PASSWORD = "correct horse"


@dataclass
class CP:
    url: str
    app: Starlette
    group: ServerGroup
    settings: ControlPlaneSettings
    admin: httpx.Client
    clients: list[httpx.Client] = field(default_factory=list)

    def client(self, token: str | None = None) -> httpx.Client:
        """A client closed when the test ends."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in [self.admin, *self.clients]:
            client.close()

    def company(self, credits: str = "10") -> str:
        r = self.admin.post(
            "/v1/admin/companies", json={"name": f"co-{uuid.uuid4().hex[:8]}", "credits": credits}
        )
        assert r.status_code == 201, r.text
        return str(r.json()["data"]["id"])

    def user(
        self, company_id: str, role: str = "owner", password: str | None = PASSWORD
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "company_id": company_id,
            "email": f"U-{uuid.uuid4().hex[:8]}@Example.com",
            "role": role,
        }
        if password is not None:
            body["password"] = password
        r = self.admin.post("/v1/admin/users", json=body)
        assert r.status_code == 201, r.text
        return dict(r.json()["data"])

    def api_key(self, user_id: str, scopes: list[str] | None = None) -> str:
        body: dict[str, Any] = {"user_id": user_id}
        if scopes is not None:
            body["scopes"] = scopes
        r = self.admin.post("/v1/admin/api-keys", json=body)
        assert r.status_code == 201, r.text
        return str(r.json()["data"]["key"])

    def owner_client(self, credits: str = "10") -> tuple[httpx.Client, str]:
        company_id = self.company(credits)
        user = self.user(company_id, password=None)
        return self.client(self.api_key(user["id"])), company_id

    def webhook(
        self, event: UsageEvent, *, webhook_id: str | None = None, secret: str | None = None
    ) -> httpx.Response:
        body = event.body()
        headers = sign(
            secret or self.settings.webhook_secret.reveal(), webhook_id or event.webhook_id, body
        )
        return httpx.post(f"{self.url}/v1/webhooks/usage", content=body, headers=headers)

    def on_loop(self, fn: Any) -> Any:
        return self.group.call(fn)


def _settings(database_url: str, extra: dict[str, str] | None = None) -> ControlPlaneSettings:
    env = {
        "LLMGW_WEBHOOK_SECRET": new_webhook_secret(),
        "LLMGW_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "LLMGW_ADMIN_TOKEN": ADMIN_TOKEN,
        "LLMGW_DATABASE_URL": database_url,
        "LLMGW_AUTO_MIGRATE": "1",
        "LLMGW_EDGE_PUBLIC_URL": "http://edge.test:8001",
        # Most tests burst far past the default per-minute limits; the rate-limit
        # tests set their own.
        "LLMGW_INIT_RATE_PER_USER": "1000000",
        "LLMGW_INIT_RATE_PER_COMPANY": "10000000",
        "LLMGW_MAX_PENDING_INITS_PER_USER": "1000000",
        **(extra or {}),
    }
    return ControlPlaneSettings.from_env(env, dev=False)


@contextlib.contextmanager
def start_cp(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    backend: str,
    extra_env: dict[str, str] | None = None,
) -> Iterator[CP]:
    """A control plane on a real socket: ``sqlite`` (+ in-memory store) or ``postgres``
    (+ Redis), each on a fresh database. The tests in ``test_credits_*.py`` use it too."""
    extra = dict(extra_env or {})
    with contextlib.ExitStack() as resources:
        # Migrated copies: the app's own migration at start then finds nothing to do.
        if backend == "sqlite":
            settings = _settings(migrated_sqlite(tmp_path / "cp.db"), extra)
        else:
            pg_server = request.getfixturevalue("pg_server")
            database_url = resources.enter_context(fresh_pg_database(pg_server, migrated=True))
            prefix = request.getfixturevalue("redis_prefix")
            settings = _settings(database_url, {**redis_env(prefix), **extra})
        yield resources.enter_context(serve_cp(settings))


def redis_env(prefix: str) -> dict[str, str]:
    return {"LLMGW_REDIS_URL": REDIS_URL, "LLMGW_REDIS_PREFIX": prefix}


@contextlib.contextmanager
def pg_settings(
    pg_server: str, extra_env: dict[str, str] | None = None
) -> Iterator[ControlPlaneSettings]:
    """Settings on a fresh PostgreSQL database and Redis prefix, both removed at the
    end: for a fixture wider than one test (`pg_database_url` and `redis_prefix` are
    a test's own)."""
    with fresh_pg_database(pg_server, migrated=True) as url, fresh_redis_prefix() as prefix:
        yield _settings(url, {**redis_env(prefix), **(extra_env or {})})


@contextlib.contextmanager
def serve_cp(
    settings: ControlPlaneSettings, app: Starlette | None = None, *, served: Any = None
) -> Iterator[CP]:
    """The control plane `app` (by default built from `settings`) on a real socket;
    `served` is what the socket serves instead, when a test wraps the app."""
    app = create_app(settings) if app is None else app
    sock = bind_free_socket()
    with ServerGroup([(served or app, sock)]) as group:
        url = url_of(sock)
        admin = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
        )
        handle = CP(url=url, app=app, group=group, settings=settings, admin=admin)
        try:
            yield handle
        finally:
            handle.close()


@pytest.fixture(params=["sqlite", "postgres"])
def cp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CP]:
    with start_cp(request, tmp_path, request.param) as handle:
        yield handle


def data_of(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is True
    return body["data"]


def error_of(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False and body["error"]["code"] == code, body
    assert "Traceback" not in r.text
    return str(body["message"])


def credits_of(client: httpx.Client) -> dict[str, str]:
    return dict(data_of(client.get("/v1/me"))["credits"])


def micro(value: str) -> int:
    return int(Decimal(value) * MICRO)


def usage_event(init: dict[str, Any], company_id: str, **changes: Any) -> UsageEvent:
    claims = claims_of(init["stream_token"])
    now = datetime.now(UTC)
    event = UsageEvent(
        jti=claims["jti"],
        reservation_id=init["reservation_id"],
        company_id=company_id,
        user_id=claims["sub"],
        session_id=init["session_id"],
        request_id=claims["request_id"],
        model=init["model"],
        provider="mock",
        status="completed",
        finish_reason="stop",
        input_tokens=12,
        output_tokens=64,
        usage_source="upstream",
        started_at=(now - timedelta(seconds=3)).isoformat(),
        first_token_at=None,
        ended_at=now.isoformat(),
        content="Hello there!",
    )
    return replace(event, **changes)


def assert_books_balance(cp: CP, company_id: str, client: httpx.Client) -> None:
    """The public view agrees with the ledger (Σ grant/adjustment/charge = balance;
    Σ grant/adjustment/hold/release = available ≥ 0), and `check_books` finds nothing
    wrong (held = Σ active holds, one charge/release per reservation at most, one audit
    event per ledger entry)."""
    data = data_of(client.get("/v1/credits", params={"limit": 200}))
    assert data["next_cursor"] is None
    by_kind: dict[str, int] = {}
    for entry in data["entries"]:
        by_kind[entry["kind"]] = by_kind.get(entry["kind"], 0) + micro(entry["amount"])
    balance = sum(by_kind.get(k, 0) for k in ("grant", "adjustment", "charge"))
    available = sum(by_kind.get(k, 0) for k in ("grant", "adjustment", "hold", "release"))
    assert balance == micro(data["balance"])
    assert available == micro(data["available"]) >= 0
    assert micro(data["held"]) == balance - available
    db = cp.app.state.db
    assert cp.on_loop(lambda: db.transaction(lambda s: check_books(s, company_id))) == []


# --- health, errors, envelope ---------------------------------------------------------


def test_health_ready_metrics_and_request_ids(cp: CP) -> None:
    plain = cp.client()
    assert plain.get("/healthz").json() == {"status": "ok"}
    assert plain.get("/readyz").json() == {"status": "ok"}
    r = plain.get("/healthz", headers={"X-Request-Id": "trace-1.2_3"})
    assert r.headers["x-request-id"] == "trace-1.2_3"
    r = plain.get("/healthz", headers={"X-Request-Id": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces" and r.headers["x-request-id"]
    error_of(plain.get("/v1/nothing-here"), 404, "not_found")
    r = plain.delete("/v1/me")
    error_of(r, 405, "method_not_allowed")
    assert r.headers["x-request-id"]
    assert plain.get("/openapi.json").json()["paths"]["/v1/chat/init"]["post"]
    metrics = plain.get("/metrics")
    assert metrics.status_code == 200
    text = metrics.text
    assert 'llmgw_cp_http_requests_total{route="/healthz",status="200"}' in text
    assert 'route="unmatched",status="404"' in text
    assert "llmgw_cp_holds_active 0.0" in text
    for name in (
        "llmgw_cp_http_request_duration_seconds_bucket",
        "llmgw_cp_credits_reserved_total",
        "llmgw_cp_credits_charged_total",
        "llmgw_cp_credits_released_total",
        "llmgw_cp_reconciliation_lag_seconds",
    ):
        assert name in text


@sqlite_only
def test_readyz_reports_a_dead_store(cp: CP) -> None:
    store = cp.app.state.store
    original = store.ping

    async def dead() -> bool:
        return False

    store.ping = dead
    try:
        r = cp.client().get("/readyz")
    finally:
        store.ping = original
    assert r.status_code == 503
    assert r.json() == {"status": "unavailable", "failing": ["store"]}


# --- admin, login, me, models ---------------------------------------------------------


def test_admin_login_me_and_models(cp: CP) -> None:
    company_id = cp.company("12.5")
    user = cp.user(company_id, role="member")
    assert user["email"] == user["email"].lower() and user["role"] == "member"
    error_of(cp.admin.post("/v1/admin/users", json={**user, "password": PASSWORD}), 409, "conflict")
    r = cp.client().post("/v1/auth/login", json={"email": user["email"], "password": PASSWORD})
    token = data_of(r)
    assert token["token_type"] == "bearer" and token["expires_in"] == 3600
    header = jwt.get_unverified_header(token["access_token"])
    assert header["alg"] == "EdDSA"
    assert claims_of(token["access_token"])["aud"] == API_AUDIENCE

    bad = error_of(
        cp.client().post("/v1/auth/login", json={"email": user["email"], "password": "nope"}),
        401,
        "invalid_credentials",
    )
    unknown = error_of(
        cp.client().post("/v1/auth/login", json={"email": "ghost@x.io", "password": "nope"}),
        401,
        "invalid_credentials",
    )
    assert bad == unknown
    error_of(
        cp.client().post("/v1/auth/login", json={"email": user["email"]}), 422, "validation_error"
    )

    member = cp.client(token["access_token"])
    me = data_of(member.get("/v1/me"))
    assert me["user"] == {"id": user["id"], "email": user["email"], "role": "member"}
    assert me["company"]["id"] == company_id
    assert me["credits"] == {"balance": "12.500000", "held": "0.000000", "available": "12.500000"}

    models = data_of(member.get("/v1/models"))
    assert models["default_model"] == cp.settings.catalog.default_model
    assert {m["id"] for m in models["models"]} == set(cp.settings.catalog.models)
    first = models["models"][0]
    assert set(first) == {
        "id",
        "provider",
        "context_length",
        "max_output_tokens",
        "features",
        "price",
    }
    assert set(first["price"]) == {"input_per_mtok", "output_per_mtok"}
    only_mock = data_of(member.get("/v1/models", params={"provider": "mock"}))["models"]
    assert only_mock and all(m["provider"] == "mock" for m in only_mock)
    assert data_of(member.get("/v1/models", params={"provider": "nobody"}))["models"] == []

    # Members cannot administer; owners cannot mint credits or create admins.
    error_of(member.post("/v1/admin/companies", json={"name": "x"}), 403, "forbidden")
    owner_key = cp.api_key(cp.user(company_id, role="owner", password=None)["id"])
    owner = cp.client(owner_key)
    error_of(
        owner.post(f"/v1/admin/companies/{company_id}/credits", json={"amount": "5"}),
        403,
        "forbidden",
    )
    error_of(
        owner.post(
            "/v1/admin/users",
            json={"company_id": company_id, "email": "boss@x.io", "role": "admin"},
        ),
        403,
        "forbidden",
    )
    made = data_of(
        owner.post(
            "/v1/admin/users",
            json={"company_id": company_id, "email": "new@x.io", "role": "member"},
        ),
        201,
    )
    other_company = cp.company()
    error_of(
        owner.post(
            "/v1/admin/users",
            json={"company_id": other_company, "email": "spy@x.io", "role": "member"},
        ),
        403,
        "forbidden",
    )
    # A blank password is refused as login would refuse it, and nobody is created.
    error_of(
        owner.post(
            "/v1/admin/users",
            json={"company_id": company_id, "email": "blank@x.io", "password": " " * 12},
        ),
        422,
        "validation_error",
    )
    blank = {"email": "blank@x.io", "password": "correct horse battery"}
    data_of(cp.admin.post("/v1/admin/users", json={**blank, "company_id": company_id}), 201)
    # A user without a password can use API keys but cannot log in.
    error_of(
        cp.client().post("/v1/auth/login", json={"email": made["email"], "password": "x"}),
        401,
        "invalid_credentials",
    )


def test_authentication_failures(cp: CP) -> None:
    company_id = cp.company()
    user = cp.user(company_id)
    for token in (None, "garbage", "sk_unknown", "a.b.c"):
        r = cp.client(token).get("/v1/me")
        error_of(r, 401, "unauthenticated")
        assert r.headers["www-authenticate"] == "Bearer"
    error_of(
        cp.client().get("/v1/me", headers={"Authorization": "Basic x"}), 401, "unauthenticated"
    )

    # Deliberately bad access tokens, signed with the real key.
    kid, key = cp.app.state.keyring.active()
    now = int(time.time())
    base = {
        "iss": ISSUER,
        "aud": API_AUDIENCE,
        "sub": user["id"],
        "jti": "j",
        "iat": now,
        "nbf": now,
    }
    good = sign_token({**base, "exp": now + 60}, key, kid)
    assert cp.client(good).get("/v1/me").status_code == 200
    for claims in (
        {**base, "exp": now - 60},  # expired
        {**base, "exp": now + 60, "aud": "llm-stream"},  # a stream token is not an access token
        {**base, "exp": now + 60, "iss": "someone-else"},
    ):
        error_of(cp.client(sign_token(claims, key, kid)).get("/v1/me"), 401, "unauthenticated")
    error_of(
        cp.client(sign_token({**base, "exp": now + 60}, key, "unknown-kid")).get("/v1/me"),
        401,
        "unauthenticated",
    )

    # Revoked API keys stop working.
    key_id_resp = cp.admin.post("/v1/admin/api-keys", json={"user_id": user["id"]})
    created = data_of(key_id_resp, 201)
    assert created["key"].startswith("sk_") and created["key"].startswith(created["prefix"])
    api = cp.client(created["key"])
    assert api.get("/v1/me").status_code == 200
    assert cp.admin.delete(f"/v1/admin/api-keys/{created['id']}").status_code == 204
    error_of(api.get("/v1/me"), 401, "unauthenticated")
    error_of(cp.admin.delete("/v1/admin/api-keys/nope"), 404, "not_found")
    # The admin token is a platform admin but no user.
    error_of(cp.admin.get("/v1/me"), 403, "forbidden")
    error_of(cp.admin.post("/v1/chat/init", json={"query": "hi"}), 403, "forbidden")


# --- chat init -------------------------------------------------------------------------


def _jwks_key(cp: CP, token: str) -> Any:
    jwks = cp.client().get("/.well-known/jwks.json")
    assert jwks.headers["cache-control"] == "public, max-age=60"
    kid = jwt.get_unverified_header(token)["kid"]
    (jwk,) = [k for k in jwks.json()["keys"] if k["kid"] == kid]
    return jwt.PyJWK(jwk).key


def test_init_reserves_and_mints_a_stream_token(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    r = client.post(
        "/v1/chat/init",
        json={"model": "mock-fast", "messages": messages, "max_tokens": 100, "temperature": 0.2},
        headers={"X-Request-Id": "init-req-1"},
    )
    data = data_of(r, 201)
    model = cp.settings.catalog.models["mock-fast"]
    # Everything sent upstream counts: the messages and the sampling parameters.
    estimate = estimate_input_tokens(messages) + params_tokens({"temperature": 0.2})
    hold = cost_micro(estimate, 100, model.price)
    assert data["reserved_credits"] == format_credits(hold)
    assert data["model"] == "mock-fast" and data["max_tokens"] == 100
    token = data["stream_token"]
    assert data["stream_url"] == f"http://edge.test:8001/v1/stream?token={token}"
    assert data["completions_url"] == "http://edge.test:8001/v1/chat/completions"

    # The token verifies with the published JWKS and carries the grant.
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA" and header["typ"] == "JWT"
    grant = verify_stream_token(token, _jwks_key(cp, token))
    claims = claims_of(token)
    # DESIGN's claims, and the API key it was minted with, whose revocation ends it.
    assert set(claims) == {*STREAM_CLAIMS, PARENT_CLAIM}
    assert claims[PARENT_CLAIM].startswith("key-")
    assert claims["iss"] == "llm-gateway" and claims["aud"] == "llm-stream"
    assert grant.company_id == company_id and grant.role == "owner"
    assert grant.reservation_id == data["reservation_id"] and grant.session_id == data["session_id"]
    assert (grant.model, grant.max_tokens, grant.max_input_tokens) == ("mock-fast", 100, estimate)
    assert grant.request_id == "init-req-1" and "llm:chat:send" in grant.scopes
    assert claims["exp"] - claims["iat"] == cp.settings.token_ttl_seconds
    expires = datetime.strptime(data["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert int(expires.timestamp()) == claims["exp"]

    # The hold shows in /v1/me.
    credits = credits_of(client)
    assert credits["held"] == format_credits(hold)
    assert micro(credits["available"]) == 10 * MICRO - hold

    # The request is stashed for the edge under the token's jti.
    store = cp.app.state.store
    raw = cp.on_loop(lambda: store.get(stash_key(grant.company_id, grant.jti)))
    stashed = StashedRequest.loads(raw)
    assert stashed.messages == messages and stashed.params == {"temperature": 0.2}
    assert_books_balance(cp, company_id, client)


def test_init_with_query_continues_a_session(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    first = data_of(client.post("/v1/chat/init", json={"query": "first question"}), 201)
    assert first["model"] == cp.settings.catalog.default_model
    assert first["max_tokens"] == cp.settings.catalog.models[first["model"]].max_output_tokens
    assert cp.webhook(usage_event(first, company_id, content="first answer")).status_code == 200
    second = data_of(
        client.post("/v1/chat/init", json={"query": "second", "session_id": first["session_id"]}),
        201,
    )
    assert second["session_id"] == first["session_id"]
    jti = jti_of(second["stream_token"])
    store = cp.app.state.store
    stashed = StashedRequest.loads(cp.on_loop(lambda: store.get(stash_key(company_id, jti))))
    assert stashed.messages == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second"},
    ]
    session = data_of(client.get(f"/v1/sessions/{first['session_id']}"))
    assert [m["role"] for m in session["messages"]] == ["user", "assistant", "user"]
    assert session["title"] == "first question"
    listed = data_of(client.get("/v1/sessions"))
    assert [s["id"] for s in listed["items"]] == [first["session_id"]]
    # Someone else's session is invisible.
    stranger, _ = cp.owner_client()
    error_of(
        stranger.post("/v1/chat/init", json={"query": "x", "session_id": first["session_id"]}),
        404,
        "session_not_found",
    )
    error_of(stranger.get(f"/v1/sessions/{first['session_id']}"), 404, "session_not_found")
    assert client.delete(f"/v1/sessions/{first['session_id']}").status_code == 204
    error_of(client.get(f"/v1/sessions/{first['session_id']}"), 404, "session_not_found")
    # Settling a stream of a deleted session still works.
    assert cp.webhook(usage_event(second, company_id)).json()["data"]["settled"] is True


def test_init_errors(cp: CP) -> None:
    client, company_id = cp.owner_client("0.001")
    hi = [{"role": "user", "content": "hi"}]
    error_of(
        client.post("/v1/chat/init", json={"model": "nope", "messages": hi}), 404, "model_not_found"
    )
    error_of(client.post("/v1/chat/init", json={"messages": hi}), 402, "insufficient_credits")
    big = [{"role": "user", "content": "x" * 30_000}]
    error_of(
        client.post("/v1/chat/init", json={"messages": big, "max_tokens": 10}),
        413,
        "input_too_large",
    )
    error_of(
        client.post(
            "/v1/chat/init", content=b"{not json", headers={"Content-Type": "application/json"}
        ),
        400,
        "malformed_json",
    )
    message = error_of(client.post("/v1/chat/init", json={}), 422, "validation_error")
    assert "messages" in message
    message = error_of(
        client.post("/v1/chat/init", json={"query": "a", "max_tokens": 10**6}),
        422,
        "validation_error",
    )
    assert "max_tokens" in message
    error_of(
        client.post("/v1/chat/init", content=b"x" * (1024 * 1024 + 1)), 413, "payload_too_large"
    )
    r = cp.client().post("/v1/chat/init", json={"messages": hi})
    error_of(r, 401, "unauthenticated")
    member = cp.user(company_id, role="member", password=None)
    read_only = cp.client(cp.api_key(member["id"], scopes=["llm:chat:read"]))
    error_of(read_only.post("/v1/chat/init", json={"messages": hi}), 403, "forbidden")
    error_of(
        cp.admin.post(
            "/v1/admin/api-keys", json={"user_id": member["id"], "scopes": ["llm:chat:delete"]}
        ),
        422,
        "validation_error",
    )
    # Nothing above changed the books.
    assert credits_of(client) == {
        "balance": "0.001000",
        "held": "0.000000",
        "available": "0.001000",
    }
    assert_books_balance(cp, company_id, client)


def test_concurrent_inits_never_overdraw(cp: CP) -> None:
    # Fund exactly three holds, then race ten inits for them.
    messages = [{"role": "user", "content": "hi"}]
    model = cp.settings.catalog.models["mock-fast"]
    hold = cost_micro(estimate_input_tokens(messages), 16, model.price)
    client, company_id = cp.owner_client(format_credits(3 * hold))
    with ThreadPoolExecutor(10) as pool:
        results = list(
            pool.map(
                lambda _: client.post(
                    "/v1/chat/init", json={"messages": messages, "max_tokens": 16}
                ),
                range(10),
            )
        )
    codes = sorted(r.status_code for r in results)
    assert codes == [201] * 3 + [402] * 7
    assert credits_of(client)["available"] == "0.000000"
    assert_books_balance(cp, company_id, client)


# --- usage webhooks ----------------------------------------------------------------------


def test_webhook_settles_exactly_once(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    init = data_of(client.post("/v1/chat/init", json={"query": "hello", "max_tokens": 200}), 201)
    hold = micro(init["reserved_credits"])
    event = usage_event(init, company_id, input_tokens=12, output_tokens=64)
    price = cp.settings.catalog.models[init["model"]].price
    cost = cost_micro(12, 64, price)

    r = cp.webhook(event)
    assert data_of(r) == {"settled": True, "charged": format_credits(cost)}
    credits = credits_of(client)
    assert credits["held"] == "0.000000"
    assert micro(credits["balance"]) == 10 * MICRO - cost

    # The same webhook again, and another id for the same stream: charged once.
    assert data_of(cp.webhook(event)) == {"duplicate": True}
    assert data_of(cp.webhook(event, webhook_id="usage_other")) == {"duplicate": True}
    assert micro(credits_of(client)["balance"]) == 10 * MICRO - cost

    usage = data_of(client.get("/v1/usage"))
    (item,) = usage["items"]
    assert item["reservation_id"] == init["reservation_id"] and item["cost"] == format_credits(cost)
    assert (item["input_tokens"], item["output_tokens"], item["status"]) == (12, 64, "completed")
    assert set(item) >= {
        "id",
        "jti",
        "session_id",
        "model",
        "provider",
        "usage_source",
        "created_at",
    }
    entries = data_of(client.get("/v1/credits"))["entries"]
    # Newest first: the settlement's two rows (same instant), then the hold.
    assert {e["kind"] for e in entries[:2]} == {"charge", "release"}
    assert entries[2]["kind"] == "hold"
    assert {e["amount"] for e in entries[:2]} == {
        format_credits(-cost),
        format_credits(hold - cost),
    }
    assert_books_balance(cp, company_id, client)

    metrics = cp.client().get("/metrics").text
    assert 'llmgw_cp_webhooks_total{outcome="settled"} 1.0' in metrics
    assert 'llmgw_cp_webhooks_total{outcome="duplicate"} 2.0' in metrics
    assert 'llmgw_cp_chat_inits_total{outcome="ok"} 1.0' in metrics
    assert "llmgw_cp_reconciliation_lag_seconds_count 1.0" in metrics


def test_webhook_billing_rules_and_cap(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    failed = data_of(client.post("/v1/chat/init", json={"query": "a", "max_tokens": 10}), 201)
    r = cp.webhook(usage_event(failed, company_id, status="failed", output_tokens=0, content=None))
    assert data_of(r)["charged"] == "0.000000"
    capped = data_of(client.post("/v1/chat/init", json={"query": "b", "max_tokens": 10}), 201)
    r = cp.webhook(usage_event(capped, company_id, input_tokens=10**6, output_tokens=10**6))
    assert data_of(r)["charged"] == capped["reserved_credits"]
    assert credits_of(client)["held"] == "0.000000"
    assert_books_balance(cp, company_id, client)


def test_webhook_rejections(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    init = data_of(client.post("/v1/chat/init", json={"query": "hello"}), 201)
    event = usage_event(init, company_id)
    error_of(cp.webhook(event, secret=new_webhook_secret()), 401, "invalid_signature")
    body = event.body()
    old = sign(
        cp.settings.webhook_secret.reveal(),
        event.webhook_id,
        body,
        datetime.now(UTC) - timedelta(minutes=10),
    )
    # Still a 401 (DESIGN §7); its own code tells the signer its clock is off.
    error_of(
        httpx.post(f"{cp.url}/v1/webhooks/usage", content=body, headers=old),
        401,
        "timestamp_out_of_window",
    )
    error_of(httpx.post(f"{cp.url}/v1/webhooks/usage", content=body), 401, "invalid_signature")
    bad_json = b"{nope"
    headers = sign(cp.settings.webhook_secret.reveal(), "w1", bad_json)
    error_of(
        httpx.post(f"{cp.url}/v1/webhooks/usage", content=bad_json, headers=headers),
        400,
        "malformed_json",
    )
    error_of(cp.webhook(replace(event, usage_source="guess")), 422, "validation_error")
    error_of(cp.webhook(replace(event, output_tokens=-1)), 422, "validation_error")
    error_of(cp.webhook(replace(event, reservation_id="missing")), 404, "reservation_not_found")
    error_of(cp.webhook(replace(event, jti="someone-else")), 422, "reservation_mismatch")
    error_of(cp.webhook(replace(event, company_id="other")), 422, "reservation_mismatch")
    # None of that settled anything.
    assert credits_of(client)["held"] == init["reserved_credits"]
    assert data_of(cp.webhook(event))["settled"] is True


def test_usage_visibility_and_pagination(cp: CP) -> None:
    owner, company_id = cp.owner_client("10")
    member_user = cp.user(company_id, role="member", password=None)
    member = cp.client(cp.api_key(member_user["id"]))
    for client in (owner, owner, member):
        init = data_of(client.post("/v1/chat/init", json={"query": "q", "max_tokens": 5}), 201)
        assert cp.webhook(usage_event(init, company_id, output_tokens=1)).status_code == 200
    assert len(data_of(owner.get("/v1/usage"))["items"]) == 3
    assert len(data_of(member.get("/v1/usage"))["items"]) == 1
    page1 = data_of(owner.get("/v1/usage", params={"limit": 2}))
    assert len(page1["items"]) == 2 and page1["next_cursor"]
    page2 = data_of(owner.get("/v1/usage", params={"limit": 2, "cursor": page1["next_cursor"]}))
    assert len(page2["items"]) == 1 and page2["next_cursor"] is None
    ids = [i["id"] for i in page1["items"] + page2["items"]]
    assert len(set(ids)) == 3
    stamps = [i["created_at"] for i in page1["items"] + page2["items"]]
    assert stamps == sorted(stamps, reverse=True)
    error_of(owner.get("/v1/usage", params={"limit": 0}), 422, "validation_error")
    error_of(owner.get("/v1/usage", params={"limit": 201}), 422, "validation_error")
    error_of(owner.get("/v1/usage", params={"cursor": "garbage!"}), 422, "validation_error")
    credits = data_of(owner.get("/v1/credits", params={"limit": 3}))
    assert len(credits["entries"]) == 3 and credits["next_cursor"]
    assert_books_balance(cp, company_id, owner)


@sqlite_only
def test_a_member_reads_its_own_streams_in_the_ledger_not_its_colleagues(cp: CP) -> None:
    """`/v1/credits` showed a member every colleague's holds and charges (when, how
    much, which reservation). DESIGN §9: a member sees its own usage; the pool's
    balance and the company's own entries (grants, adjustments) stay everyone's."""
    owner, company_id = cp.owner_client("10")
    members = [cp.client(cp.api_key(cp.user(company_id, role="member")["id"])) for _ in range(2)]
    inits = [data_of(m.post("/v1/chat/init", json={"query": "hi"}), 201) for m in members]

    def reservations(client: httpx.Client) -> set[str]:
        entries = data_of(client.get("/v1/credits", params={"limit": 200}))["entries"]
        assert any(e["kind"] == "grant" for e in entries)
        return {e["reservation_id"] for e in entries if e["reservation_id"]}

    mine, theirs = (init["reservation_id"] for init in inits)
    assert reservations(members[0]) == {mine}
    assert reservations(members[1]) == {theirs}
    assert reservations(owner) == {mine, theirs}
    everyone = {data_of(c.get("/v1/credits"))["held"] for c in (owner, *members)}
    assert len(everyone) == 1  # one pool, one balance


def test_a_leaked_signing_key_is_retired_at_once(cp: CP) -> None:
    """Rotation keeps the keys it replaced for the longest token life, by design; a
    leaked one must go now: whoever holds it could sign access tokens for anyone
    until a later rotation, an hour on, retired it."""
    user = cp.user(cp.company())
    login = {"email": user["email"], "password": PASSWORD}
    leaked = data_of(cp.client().post("/v1/auth/login", json=login))["access_token"]
    plain = data_of(cp.admin.post("/v1/admin/signing-keys/rotate"), 201)
    assert plain["retired"] == []
    error_of(cp.admin.post("/v1/admin/signing-keys/rotate", json={"retire_others": 1}), 422,
             "validation_error")  # fmt: skip
    fresh = data_of(
        cp.admin.post("/v1/admin/signing-keys/rotate", json={"retire_others": True}), 201
    )
    assert jwt.get_unverified_header(leaked)["kid"] in fresh["retired"]
    assert plain["kid"] in fresh["retired"]
    kids = {k["kid"] for k in cp.client().get("/.well-known/jwks.json").json()["keys"]}
    assert kids == {fresh["kid"]}
    error_of(cp.client(leaked).get("/v1/me"), 401, "unauthenticated")
    again = data_of(cp.client().post("/v1/auth/login", json=login))["access_token"]
    assert jwt.get_unverified_header(again)["kid"] == fresh["kid"]
    assert cp.client(again).get("/v1/me").status_code == 200


def test_signing_key_rotation_keeps_old_tokens_valid(cp: CP) -> None:
    company_id = cp.company()
    user = cp.user(company_id)
    token = data_of(
        cp.client().post("/v1/auth/login", json={"email": user["email"], "password": PASSWORD})
    )
    old_kid = jwt.get_unverified_header(token["access_token"])["kid"]
    new_kid = data_of(cp.admin.post("/v1/admin/signing-keys/rotate"), 201)["kid"]
    assert new_kid != old_kid
    kids = {k["kid"] for k in cp.client().get("/.well-known/jwks.json").json()["keys"]}
    assert kids == {old_kid, new_kid}
    assert cp.client(token["access_token"]).get("/v1/me").status_code == 200
    fresh = data_of(
        cp.client().post("/v1/auth/login", json={"email": user["email"], "password": PASSWORD})
    )
    assert jwt.get_unverified_header(fresh["access_token"])["kid"] == new_kid


# --- failure paths, sweeper, seeding, schema ----------------------------------------------


@sqlite_only
def test_unexpected_errors_are_500_envelopes(cp: CP, caplog: pytest.LogCaptureFixture) -> None:
    async def boom(request: Any) -> Any:
        raise RuntimeError("secret internals")

    cp.app.router.routes.append(Route("/boom", boom))
    r = cp.client().get("/boom", headers={"X-Request-Id": "boom-1"})
    error_of(r, 500, "internal_error")
    assert "secret internals" not in r.text
    assert r.headers["x-request-id"] == "boom-1"
    assert any("boom-1" in rec.getMessage() for rec in caplog.records)


def test_a_failed_stash_releases_the_hold(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    store = cp.app.state.store
    original = store.set

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("store down")

    store.set = broken
    try:
        refused = client.post("/v1/chat/init", json={"query": "hi"})
        error_of(refused, 503, "store_unavailable")  # the edge's code for the same
        assert refused.headers["Retry-After"] == "1"
    finally:
        store.set = original
    assert credits_of(client) == {
        "balance": "10.000000",
        "held": "0.000000",
        "available": "10.000000",
    }
    assert_books_balance(cp, company_id, client)


def test_seed_demo_is_idempotent_and_mints_a_new_key_each_time(cp: CP) -> None:
    first = asyncio.run(seed_demo(cp.settings.database_url))
    second = asyncio.run(seed_demo(cp.settings))
    assert first.startswith("sk_") and second.startswith("sk_") and first != second
    for key in (first, second):
        me = data_of(cp.client(key).get("/v1/me"))
        assert me["user"]["email"] == "demo@example.com" and me["user"]["role"] == "owner"
        assert me["company"]["name"] == "demo"
        assert me["credits"]["balance"] == "1000.000000"
    login = cp.client().post(
        "/v1/auth/login", json={"email": "demo@example.com", "password": "demo"}
    )
    assert data_of(login)["access_token"]


def test_migrations_match_the_table_models(cp: CP) -> None:
    engine = create_sync_engine(cp.settings.database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, SQLModel.metadata) == []
    finally:
        engine.dispose()
    upgrade(cp.settings.database_url)  # idempotent
    assert current(cp.settings.database_url) == head()


def test_a_shared_store_is_used_and_left_open(tmp_path: Path) -> None:
    class TrackingStore(MemoryStore):
        closed = False

        async def close(self) -> None:
            self.closed = True

    store = TrackingStore()
    settings = _settings(f"sqlite:///{tmp_path}/nested/dir/cp.db")
    app = create_app(settings, store=store)
    sock = bind_free_socket()
    with ServerGroup([(app, sock)]), httpx.Client(base_url=url_of(sock)) as client:
        assert app.state.store is store
        assert client.get("/readyz").json() == {"status": "ok"}
    assert not store.closed
    assert (tmp_path / "nested" / "dir" / "cp.db").exists()


def test_start_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    settings = _settings(f"sqlite:///{tmp_path}/cp.db", {"LLMGW_AUTO_MIGRATE": "0"})
    app = create_app(settings)

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pass

    with pytest.raises(RuntimeError, match="llm-gateway migrate"):
        asyncio.run(start())


def test_settlements_and_inits_on_one_session_interleave(cp: CP) -> None:
    """Inits and settlements touch the company and the chat session in the same
    order, so running them together on one session cannot deadlock."""
    client, company_id = cp.owner_client("10")
    first = data_of(client.post("/v1/chat/init", json={"query": "q0", "max_tokens": 5}), 201)
    session_id = first["session_id"]
    inits = [first] + [
        data_of(
            client.post(
                "/v1/chat/init", json={"query": f"q{i}", "session_id": session_id, "max_tokens": 5}
            ),
            201,
        )
        for i in range(1, 6)
    ]

    def settle(init: dict[str, Any]) -> int:
        return cp.webhook(usage_event(init, company_id, output_tokens=2)).status_code

    def more(i: int) -> int:
        body = {"query": f"more {i}", "session_id": session_id, "max_tokens": 5}
        return client.post("/v1/chat/init", json=body).status_code

    with ThreadPoolExecutor(12) as pool:
        settled = [pool.submit(settle, init) for init in inits]
        started = [pool.submit(more, i) for i in range(6)]
        assert [f.result() for f in settled] == [200] * 6
        assert [f.result() for f in started] == [201] * 6
    messages = data_of(client.get(f"/v1/sessions/{session_id}"))["messages"]
    assert len(messages) == 18  # 12 questions + 6 answers
    assert_books_balance(cp, company_id, client)
