"""API keys: shown once, stored hashed, prefix visible, scoped, revocable, last use
recorded; listed newest first with pagination."""

from __future__ import annotations

import hashlib

from sqlalchemy import select

from control_plane.tables import ApiKey
from tests.test_control_plane import (
    CP,
    cp,
    data_of,
    error_of,
)

__all__ = ["cp"]  # the fixture (sqlite, postgres) shared with test_control_plane


def test_api_key_lifecycle_and_listing(cp: CP) -> None:
    company_id = cp.company("10")
    owner = cp.user(company_id, "owner")
    member = cp.user(company_id, "member")
    owner_client = cp.client(cp.api_key(owner["id"]))
    created = [
        data_of(cp.admin.post("/v1/admin/api-keys", json={"user_id": member["id"]}), 201)
        for _ in range(3)
    ]
    key = created[0]
    assert key["key"].startswith("sk_") and key["key"].startswith(key["prefix"])
    assert key["scopes"] == ["llm:chat:send", "llm:chat:read"]

    # Stored as a hash only.
    db = cp.app.state.db
    rows = cp.on_loop(lambda: db.transaction(lambda s: list(s.scalars(select(ApiKey)))))
    stored = {r.id: r for r in rows}[key["id"]]
    assert stored.key_hash == hashlib.sha256(key["key"].encode()).hexdigest()
    assert key["key"] not in (stored.key_hash, stored.prefix)

    # Listing: prefixes, never keys; paginated; last use recorded.
    data_of(cp.client(key["key"]).get("/v1/me"))
    page = data_of(
        owner_client.get("/v1/admin/api-keys", params={"user_id": member["id"], "limit": 2})
    )
    assert len(page["items"]) == 2 and page["next_cursor"]
    rest = data_of(
        owner_client.get(
            "/v1/admin/api-keys",
            params={"user_id": member["id"], "limit": 2, "cursor": page["next_cursor"]},
        )
    )
    assert rest["next_cursor"] is None
    listed = {k["id"]: k for k in page["items"] + rest["items"]}
    assert set(listed) == {k["id"] for k in created}
    assert all("key" not in k and "key_hash" not in k for k in listed.values())
    assert listed[key["id"]]["prefix"] == key["prefix"]
    assert listed[key["id"]]["last_used_at"] is not None
    assert listed[created[1]["id"]]["last_used_at"] is None
    company_wide = data_of(owner_client.get("/v1/admin/api-keys"))["items"]
    assert len(company_wide) == 4  # the owner's own key too

    # Other companies and members see nothing; a bad cursor is a 422.
    stranger, _ = cp.owner_client()
    error_of(stranger.get("/v1/admin/api-keys", params={"user_id": member["id"]}), 404, "not_found")
    assert member["id"] not in str(data_of(stranger.get("/v1/admin/api-keys")))
    error_of(cp.client(key["key"]).get("/v1/admin/api-keys"), 404, "not_found")
    error_of(
        owner_client.get("/v1/admin/api-keys", params={"cursor": "zz"}), 422, "validation_error"
    )

    # Revoked: refused at once, and shown as revoked.
    assert owner_client.delete(f"/v1/admin/api-keys/{key['id']}").status_code == 204
    error_of(cp.client(key["key"]).get("/v1/me"), 401, "unauthenticated")
    again = data_of(owner_client.get("/v1/admin/api-keys", params={"user_id": member["id"]}))
    assert {k["id"]: k["revoked_at"] is not None for k in again["items"]}[key["id"]] is True
