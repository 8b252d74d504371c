"""Revocations (user, company, single token) and the init rate limits."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane.errors import RateLimited
from control_plane.rate_limits import check_init_rate, window_at
from shared.revocations import revocation_key
from shared.store_redis import RedisStore
from tests.conftest import REDIS_URL
from tests.test_control_plane import (
    ADMIN_TOKEN,
    CP,
    PASSWORD,
    cp,
    data_of,
    error_of,
    sqlite_only,
    start_cp,
)
from tests.token_claims import jti_of

__all__ = ["cp"]  # the fixture (sqlite, postgres) shared with test_control_plane


def _stored(cp: CP, kind: str, value: str, company_id: str) -> bytes | None:
    store = cp.app.state.store
    key = revocation_key(kind, value, company_id)
    result: bytes | None = cp.on_loop(lambda: store.get(key))
    return result


def test_revoking_a_user_disables_it_and_tells_the_edges(cp: CP) -> None:
    company_id = cp.company("10")
    owner = cp.user(company_id, role="owner")
    member = cp.user(company_id, role="member")
    owner_client = cp.client(cp.api_key(owner["id"]))
    member_key = cp.api_key(member["id"])
    member_client = cp.client(member_key)
    login = data_of(
        cp.client().post("/v1/auth/login", json={"email": member["email"], "password": PASSWORD})
    )
    access_client = cp.client(login["access_token"])
    assert data_of(member_client.post("/v1/chat/init", json={"query": "hi"}), 201)

    # A member cannot revoke; an owner can revoke its own company's user.
    error_of(
        member_client.post("/v1/admin/revocations", json={"user_id": owner["id"]}), 404, "not_found"
    )
    record = data_of(
        owner_client.post(
            "/v1/admin/revocations", json={"user_id": member["id"], "reason": "left"}
        ),
        201,
    )
    assert record["kind"] == "user" and record["value"] == member["id"]
    assert record["company_id"] == company_id and record["reason"] == "left"
    assert record["actor"] == owner["id"] and record["lifted_at"] is None
    assert _stored(cp, "user", member["id"], company_id) is not None

    # Every way in is closed: API key, access token, login, and so init.
    for client in (member_client, access_client):
        error_of(client.post("/v1/chat/init", json={"query": "hi"}), 403, "revoked")
        error_of(client.get("/v1/me"), 403, "revoked")
    error_of(
        cp.client().post("/v1/auth/login", json={"email": member["email"], "password": PASSWORD}),
        403,
        "revoked",
    )
    listed = data_of(owner_client.get("/v1/admin/revocations"))["items"]
    assert [r["id"] for r in listed] == [record["id"]]

    # Lifting it opens the door again and clears the edges' copy.
    assert owner_client.delete(f"/v1/admin/revocations/{record['id']}").status_code == 204
    assert _stored(cp, "user", member["id"], company_id) is None
    assert data_of(member_client.post("/v1/chat/init", json={"query": "hi"}), 201)


@sqlite_only
def test_revoking_a_company_and_a_token(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    init = data_of(client.post("/v1/chat/init", json={"query": "hi"}), 201)
    jti = jti_of(init["stream_token"])

    # Owners revoke single tokens of their company, not other companies' or the company.
    stranger, _ = cp.owner_client("10")
    error_of(stranger.post("/v1/admin/revocations", json={"jti": jti}), 404, "not_found")
    error_of(
        client.post("/v1/admin/revocations", json={"company_id": company_id}), 404, "not_found"
    )
    record = data_of(client.post("/v1/admin/revocations", json={"jti": jti}), 201)
    assert record["kind"] == "jti" and record["company_id"] == company_id
    assert _stored(cp, "jti", jti, company_id) is not None
    data_of(client.post("/v1/chat/init", json={"query": "still fine"}), 201)

    # TTL: a token's life + the longest stream + 60 s.
    ttl = cp.settings.token_ttl_seconds + cp.settings.max_stream_seconds + 60
    assert record["expires_at"] > record["created_at"]

    data_of(cp.admin.post("/v1/admin/revocations", json={"company_id": company_id}), 201)
    assert _stored(cp, "company", company_id, company_id) is not None
    error_of(client.post("/v1/chat/init", json={"query": "x"}), 403, "revoked")
    assert ttl > 0

    # Validation: exactly one target, which must exist.
    for body in ({}, {"user_id": "a", "jti": "b"}, {"jti": 5}, {"jti": ""}):
        error_of(cp.admin.post("/v1/admin/revocations", json=body), 422, "validation_error")
    error_of(cp.admin.post("/v1/admin/revocations", json={"user_id": "nope"}), 404, "not_found")
    error_of(cp.admin.delete("/v1/admin/revocations/nope"), 404, "not_found")


def test_an_owner_cannot_undo_the_platform_admins_revocation_with_one_of_its_own(
    cp: CP,
) -> None:
    """Attack: the owner may not lift the admin's revocation of a member, so it
    revokes the member itself and lifts that one, or lifts an old lifted one again.
    The member stays out and the edges keep their key while any revocation of the
    member is in force; lifting the last one lets the member back in."""
    client, company_id = cp.owner_client("10")
    member = cp.user(company_id, role="member")
    member_client = cp.client(cp.api_key(member["id"]))
    old = data_of(client.post("/v1/admin/revocations", json={"user_id": member["id"]}), 201)
    assert client.delete(f"/v1/admin/revocations/{old['id']}").status_code == 204
    assert member_client.get("/v1/me").status_code == 200

    admins = data_of(cp.admin.post("/v1/admin/revocations", json={"user_id": member["id"]}), 201)
    error_of(client.delete(f"/v1/admin/revocations/{admins['id']}"), 404, "not_found")
    mine = data_of(client.post("/v1/admin/revocations", json={"user_id": member["id"]}), 201)
    for lifted in (mine, old):  # its own fresh one, then the long-lifted one again
        assert client.delete(f"/v1/admin/revocations/{lifted['id']}").status_code == 204
        error_of(member_client.get("/v1/me"), 403, "revoked")
        assert _stored(cp, "user", member["id"], company_id) is not None
    listed = data_of(cp.admin.get("/v1/admin/revocations", params={"company_id": company_id}))
    by_id = {r["id"]: r for r in listed["items"]}
    assert by_id[admins["id"]]["lifted_at"] is None and by_id[mine["id"]]["lifted_at"]

    assert cp.admin.delete(f"/v1/admin/revocations/{admins['id']}").status_code == 204
    assert member_client.get("/v1/me").status_code == 200
    assert _stored(cp, "user", member["id"], company_id) is None


def test_a_revocation_made_while_another_is_lifted_keeps_the_edges_key(cp: CP) -> None:
    """Race: the owner lifts its revocation of a member while the platform admin
    revokes the same member. The admin's revocation commits after the lift looked
    for others, and publishes its key just before the lift deletes the key. The
    member must stay out at the edges too, not only at init."""
    client, company_id = cp.owner_client("10")
    member = cp.user(company_id, role="member")
    mine = data_of(client.post("/v1/admin/revocations", json={"user_id": member["id"]}), 201)
    store = cp.app.state.store
    delete = store.delete
    admins: list[dict[str, Any]] = []

    async def admin_revokes_first(key: str) -> None:
        transport = httpx.ASGITransport(app=cp.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cp") as admin:
            r = await admin.post(
                "/v1/admin/revocations",
                json={"user_id": member["id"]},
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            )
        admins.append(data_of(r, 201))
        await delete(key)

    store.delete = admin_revokes_first
    try:
        assert client.delete(f"/v1/admin/revocations/{mine['id']}").status_code == 204
    finally:
        store.delete = delete
    assert admins, "the lift never reached the store"
    assert _stored(cp, "user", member["id"], company_id) is not None
    error_of(cp.client(cp.api_key(member["id"])).get("/v1/me"), 403, "revoked")
    # Lifting the admin's revocation, the last one in force, lets the member back.
    assert cp.admin.delete(f"/v1/admin/revocations/{admins[0]['id']}").status_code == 204
    assert _stored(cp, "user", member["id"], company_id) is None


def test_lifting_one_of_two_revocations_of_a_token_keeps_it_revoked(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    init = data_of(client.post("/v1/chat/init", json={"query": "hi"}), 201)
    jti = jti_of(init["stream_token"])
    admins = data_of(cp.admin.post("/v1/admin/revocations", json={"jti": jti}), 201)
    mine = data_of(client.post("/v1/admin/revocations", json={"jti": jti}), 201)
    assert client.delete(f"/v1/admin/revocations/{mine['id']}").status_code == 204
    assert _stored(cp, "jti", jti, company_id) is not None
    assert cp.admin.delete(f"/v1/admin/revocations/{admins['id']}").status_code == 204
    assert _stored(cp, "jti", jti, company_id) is None


def test_init_rate_limits_per_user(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    extra = {"LLMGW_INIT_RATE_PER_USER": "3", "LLMGW_INIT_RATE_PER_COMPANY": "5"}
    with start_cp(request, tmp_path, "sqlite", extra) as cp:
        company_id = cp.company("10")
        # A fixed clock in the middle of a window: every init below counts in it.
        cp.app.state.deps.clock = lambda: 1_800_000_030.0
        first = cp.client(cp.api_key(cp.user(company_id)["id"]))
        second = cp.client(cp.api_key(cp.user(company_id)["id"]))
        for _ in range(3):
            data_of(first.post("/v1/chat/init", json={"query": "hi"}), 201)
        r = first.post("/v1/chat/init", json={"query": "hi"})
        error_of(r, 429, "rate_limited")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        # The company's limit (5) counts all its users' inits.
        data_of(second.post("/v1/chat/init", json={"query": "hi"}), 201)
        data_of(second.post("/v1/chat/init", json={"query": "hi"}), 201)
        error_of(second.post("/v1/chat/init", json={"query": "hi"}), 429, "rate_limited")
        # Nothing was held for the refused ones.
        assert data_of(first.get("/v1/me"))["credits"]["held"] != "0.000000"


@pytest.mark.parametrize(
    ("now", "start", "retry"), [(120.0, 120, 60), (179.2, 120, 1), (150.5, 120, 30)]
)
def test_window_at(now: float, start: int, retry: int) -> None:
    window = window_at(now)
    assert (window.start, window.retry_after) == (start, retry)


def test_rate_limits_are_shared_through_redis(redis_prefix: str) -> None:
    """Two control-plane processes = two store clients on one Redis: one counter."""

    async def run() -> None:
        stores = [RedisStore.from_url(REDIS_URL, prefix=redis_prefix) for _ in range(2)]
        try:
            args = {"user_id": "u", "company_id": "c", "per_user": 2, "per_company": 100}
            await check_init_rate(stores[0], now=1000.0, **args)  # type: ignore[arg-type]
            await check_init_rate(stores[1], now=1001.0, **args)  # type: ignore[arg-type]
            with pytest.raises(RateLimited) as info:
                await check_init_rate(stores[0], now=1002.0, **args)  # type: ignore[arg-type]
            assert info.value.retry_after == 1020 - 1002
            # The next window starts afresh.
            await check_init_rate(stores[1], now=1020.0, **args)  # type: ignore[arg-type]
        finally:
            for store in stores:
                await store.close()

    asyncio.run(run())


@sqlite_only
def test_signing_keys_leave_the_jwks_once_their_tokens_have_expired(cp: CP) -> None:
    from datetime import timedelta

    from sqlalchemy import select

    from control_plane.tables import SigningKey

    first = data_of(cp.admin.post("/v1/admin/signing-keys/rotate"), 201)
    second = data_of(cp.admin.post("/v1/admin/signing-keys/rotate"), 201)
    assert second["retired"] == []  # the first key's tokens may still be alive
    kids = {k["kid"] for k in cp.client().get("/.well-known/jwks.json").json()["keys"]}
    assert {first["kid"], second["kid"]} <= kids and len(kids) == 3
    # Pretend all this happened two hours ago: everything signed by the keys the
    # second one replaced has expired, so the next rotation retires them.
    db = cp.app.state.db

    def shift(session: Any) -> None:
        for key in session.scalars(select(SigningKey)):
            key.created_at = key.created_at - timedelta(hours=2)

    cp.on_loop(lambda: db.transaction(shift))
    third = data_of(cp.admin.post("/v1/admin/signing-keys/rotate"), 201)
    assert first["kid"] in third["retired"] and second["kid"] not in third["retired"]
    kids = {k["kid"] for k in cp.client().get("/.well-known/jwks.json").json()["keys"]}
    assert kids == {second["kid"], third["kid"]}


@sqlite_only
def test_a_platform_admins_revocation_stays_its_own_after_it_is_demoted(cp: CP) -> None:
    """Attack: a platform admin (a user placed in the company) revokes a member; the
    platform later demotes that admin to owner. The lift rule read the revoker's role
    as it is now, so the company's owner lifted the platform admin's decision (204,
    the member back in) once its author was no longer ranked above it. The rank a
    revocation was made with is recorded with it (`revocations.actor_role`)."""
    client, company_id = cp.owner_client("10")
    member = cp.user(company_id, role="member")
    member_client = cp.client(cp.api_key(member["id"]))
    platform_admin = cp.user(company_id, role="admin", password=None)
    admin_client = cp.client(cp.api_key(platform_admin["id"]))
    made = data_of(admin_client.post("/v1/admin/revocations", json={"user_id": member["id"]}), 201)
    error_of(client.delete(f"/v1/admin/revocations/{made['id']}"), 404, "not_found")

    data_of(cp.admin.patch(f"/v1/admin/users/{platform_admin['id']}", json={"role": "owner"}))

    error_of(client.delete(f"/v1/admin/revocations/{made['id']}"), 404, "not_found")
    error_of(member_client.get("/v1/me"), 403, "revoked")
    # The platform admin still lifts it.
    assert cp.admin.delete(f"/v1/admin/revocations/{made['id']}").status_code == 204
    assert member_client.get("/v1/me").status_code == 200
