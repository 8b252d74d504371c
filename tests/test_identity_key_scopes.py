"""Narrowed keys are narrow: admin actions need the ``llm:admin`` scope on the
principal, and a new key's scopes are capped at its creator's.

One real control plane (SQLite) for the module. Its database is first brought to
revision 0003 and given two keys minted before the admin scope existed: an owner's
default key (every chat scope) and an owner's send-only key. Starting the app
migrates it: the first keeps its admin power, the second never had any.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from control_plane.credentials import new_api_key
from control_plane.migrate import upgrade
from tests.harness import ServerGroup, bind_free_socket, url_of
from tests.test_control_plane import ADMIN_TOKEN, _settings

SEND, READ, DELETE, ADMIN = "llm:chat:send", "llm:chat:read", "llm:chat:delete", "llm:admin"


@dataclass
class Plane:
    http: httpx.Client
    legacy: dict[str, str]  # "full"/"send" -> a key minted at revision 0003
    legacy_company: str

    def call(self, token: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
        return self.http.request(method, path, headers=headers, **kwargs)

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.call(ADMIN_TOKEN, method, path, **kwargs)

    def company(self) -> str:
        r = self.admin(
            "POST", "/v1/admin/companies", json={"name": uuid.uuid4().hex, "credits": "5"}
        )
        assert r.status_code == 201, r.text
        return str(r.json()["data"]["id"])

    def user(self, company_id: str, role: str) -> str:
        body = {"company_id": company_id, "email": f"k-{uuid.uuid4().hex[:10]}@x.io", "role": role}
        r = self.admin("POST", "/v1/admin/users", json=body)
        assert r.status_code == 201, r.text
        return str(r.json()["data"]["id"])

    def key(self, token: str, user_id: str, scopes: list[str] | None = None) -> httpx.Response:
        body: dict[str, Any] = {"user_id": user_id}
        if scopes is not None:
            body["scopes"] = scopes
        return self.call(token, "POST", "/v1/admin/api-keys", json=body)


def _legacy_keys(database_url: str) -> tuple[str, dict[str, str]]:
    """A company, an owner and two of its API keys as revision 0003 stored them."""
    upgrade(database_url, "0003")
    engine = sa.create_engine(database_url)
    tables = sa.MetaData()
    tables.reflect(engine)
    now = datetime.now(UTC)
    company_id, user_id = uuid.uuid4().hex, uuid.uuid4().hex
    keys = {"full": new_api_key(), "send": new_api_key()}
    with engine.begin() as db:
        db.execute(
            tables.tables["companies"].insert(),
            {"id": company_id, "name": "legacy", "balance_micro": 0, "held_micro": 0,
             "created_at": now},
        )  # fmt: skip
        db.execute(
            tables.tables["users"].insert(),
            {"id": user_id, "company_id": company_id, "email": "legacy@x.io", "role": "owner",
             "created_at": now},
        )  # fmt: skip
        for name, scopes in (
            ("full", f'["{SEND}", "{READ}", "{DELETE}"]'),
            ("send", f'["{SEND}"]'),
        ):
            db.execute(
                tables.tables["api_keys"].insert(),
                {"id": uuid.uuid4().hex, "user_id": user_id, "prefix": keys[name].prefix,
                 "key_hash": keys[name].key_hash, "scopes": scopes, "created_at": now},
            )  # fmt: skip
    engine.dispose()
    return company_id, {name: key.key for name, key in keys.items()}


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    from control_plane.app import create_app

    path: Path = tmp_path_factory.mktemp("scopes") / "cp.db"
    database_url = f"sqlite:///{path}"
    legacy_company, legacy = _legacy_keys(database_url)
    app = create_app(_settings(database_url))  # migrates to head at start
    sock = bind_free_socket()
    with ServerGroup([(app, sock)]), httpx.Client(base_url=url_of(sock), timeout=30) as http:
        yield Plane(http, legacy, legacy_company)


def _admin_actions(p: Plane, token: str, company_id: str) -> dict[str, int]:
    """Every kind of admin action, each on a fresh target; the status of each."""
    member = p.user(company_id, "member")
    return {
        "mint key": p.key(token, member).status_code,
        "create owner": p.call(
            token,
            "POST",
            "/v1/admin/users",
            json={"company_id": company_id, "email": f"o-{uuid.uuid4().hex}@x.io", "role": "owner"},
        ).status_code,
        "read audit": p.call(token, "GET", "/v1/admin/audit").status_code,
        "list keys": p.call(token, "GET", "/v1/admin/api-keys").status_code,
        "revoke user": p.call(
            token, "POST", "/v1/admin/revocations", json={"user_id": p.user(company_id, "member")}
        ).status_code,
        "list revocations": p.call(token, "GET", "/v1/admin/revocations").status_code,
        "provider key": p.call(
            token,
            "PUT",
            f"/v1/admin/companies/{company_id}/providers/openai",
            json={"api_key": "sk-test-" + uuid.uuid4().hex},
        ).status_code,
    }


def test_a_narrowed_owner_key_has_no_admin_power(plane: Plane) -> None:
    company_id = plane.company()
    owner = plane.user(company_id, "owner")
    r = plane.key(ADMIN_TOKEN, owner, [SEND])
    assert r.status_code == 201 and r.json()["data"]["scopes"] == [SEND], r.text
    narrow = r.json()["data"]["key"]
    statuses = _admin_actions(plane, narrow, company_id)
    assert all(status in (403, 404) for status in statuses.values()), statuses
    # What it was given still works.
    init = plane.call(narrow, "POST", "/v1/chat/init", json={"query": "hi", "max_tokens": 5})
    assert init.status_code == 201, init.text


def test_a_default_owner_key_keeps_admin_power(plane: Plane) -> None:
    company_id = plane.company()
    owner = plane.user(company_id, "owner")
    r = plane.key(ADMIN_TOKEN, owner)
    assert r.json()["data"]["scopes"] == [SEND, READ, DELETE, ADMIN], r.text
    statuses = _admin_actions(plane, r.json()["data"]["key"], company_id)
    assert all(200 <= status < 300 for status in statuses.values()), statuses


def test_new_keys_are_capped_at_the_creators_scopes(plane: Plane) -> None:
    company_id = plane.company()
    owner, member = plane.user(company_id, "owner"), plane.user(company_id, "member")
    creator = plane.key(ADMIN_TOKEN, owner, [ADMIN, SEND]).json()["data"]["key"]
    # Asking for more than the creator holds is refused and mints nothing.
    for scopes in ([READ], [SEND, DELETE], [SEND, READ, DELETE, ADMIN]):
        r = plane.key(creator, owner, scopes)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
    listed = plane.call(ADMIN_TOKEN, "GET", "/v1/admin/api-keys", params={"user_id": owner})
    assert len(listed.json()["data"]["items"]) == 1
    # The default is the target's role scopes, capped at the creator's.
    assert plane.key(creator, member).json()["data"]["scopes"] == [SEND]
    assert plane.key(creator, owner).json()["data"]["scopes"] == [SEND, ADMIN]
    assert plane.key(creator, owner, [SEND]).json()["data"]["scopes"] == [SEND]
    # The role still bounds a key: a member's key never carries the admin scope.
    r = plane.key(ADMIN_TOKEN, member, [SEND, ADMIN])
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", r.text


def test_keys_minted_before_the_admin_scope(plane: Plane) -> None:
    """A 0003 key with every chat scope was a default key: it keeps its admin power;
    a 0003 key narrowed to sending never had any."""
    full, send = plane.legacy["full"], plane.legacy["send"]
    listed = plane.call(full, "GET", "/v1/admin/api-keys").json()["data"]["items"]
    assert sorted(tuple(k["scopes"]) for k in listed) == [
        (SEND,),
        (SEND, READ, DELETE, ADMIN),
    ]
    assert plane.call(send, "GET", "/v1/admin/api-keys").status_code == 404
    assert plane.call(send, "GET", "/v1/me").status_code == 200
    assert plane.call(full, "GET", "/v1/admin/audit").status_code == 200
