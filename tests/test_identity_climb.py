"""Nobody climbs: the role x action x target table, walked through the HTTP API.

One real control plane (uvicorn, SQLite) for the module. Actors: a member and an
owner of company X (access tokens from a real login), an ``admin`` user of X (an
API key), the platform admin token. Targets: a member, an owner and an admin user of
X ("same") and of Y ("other"), or the company itself. Every cell of `POLICY` is the
expected answer; a refused action must be 403/404 and change nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher

from tests.harness import ServerGroup, bind_free_socket, url_of
from tests.test_control_plane import ADMIN_TOKEN, PASSWORD, _settings

ACTORS = ("member", "owner", "admin_user", "admin_token")
ROLES = ("member", "owner", "admin")
COMPANIES = ("same", "other")
EVERY = " ".join(f"{r}@{c}" for c in COMPANIES for r in ROLES)
OWNERS_RANGE = "member@same owner@same"  # at or below its own role, in its own company

# action -> the targets each actor may act on (member, owner, admin user, admin token);
# every target not listed must be refused. "@same"/"@other" alone: the company itself;
# "*": an action without a target.
POLICY: dict[str, tuple[str, str, str, str]] = {
    "mint_key": ("", OWNERS_RANGE, EVERY, EVERY),
    "revoke_key": ("", OWNERS_RANGE, EVERY, EVERY),
    "list_keys": ("", OWNERS_RANGE, EVERY, EVERY),
    "create_user": ("", OWNERS_RANGE, EVERY, EVERY),
    "revoke_user": ("", OWNERS_RANGE, EVERY, EVERY),
    # A revocation made by the target company's owner (by the admin token for an admin
    # target, which no owner may revoke) ...
    "lift_owners_revocation": ("", OWNERS_RANGE, EVERY, EVERY),
    # ... and one the platform admin made: only a platform admin lifts it.
    "lift_admins_revocation": ("", "", EVERY, EVERY),
    "grant_credits": ("", "", "@same @other", "@same @other"),
    "read_audit": ("", "@same", "@same @other", "@same @other"),
    "list_companies": ("", "", "*", "*"),
}
USER_ACTIONS = (
    "mint_key",
    "revoke_key",
    "list_keys",
    "create_user",
    "revoke_user",
    "lift_owners_revocation",
    "lift_admins_revocation",
)
COMPANY_ACTIONS = ("grant_credits", "read_audit")


def _cases() -> list[tuple[str, str, str, bool]]:
    cases = []
    for action, allowed_by_actor in POLICY.items():
        if action in USER_ACTIONS:
            targets = EVERY.split()
        elif action in COMPANY_ACTIONS:
            targets = [f"@{c}" for c in COMPANIES]
        else:
            targets = ["*"]
        for actor, allowed in zip(ACTORS, allowed_by_actor, strict=True):
            cases.extend((actor, action, t, t in allowed.split()) for t in targets)
    return cases


CASES = _cases()


@dataclass
class World:
    http: httpx.Client
    companies: dict[str, str]  # "same"/"other" -> company id
    owners: dict[str, str]  # "same"/"other" -> an owner's access token (the revoker)
    targets: dict[str, str]  # "role@company" -> a standing user id
    actors: dict[str, str]  # actor -> bearer token

    def call(self, token: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
        return self.http.request(method, path, headers=headers, **kwargs)

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.call(ADMIN_TOKEN, method, path, **kwargs)

    def new_user(self, company: str, role: str, password: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "company_id": self.companies[company],
            "email": f"t-{uuid.uuid4().hex[:10]}@example.com",
            "role": role,
        }
        if password is not None:
            body["password"] = password
        r = self.admin("POST", "/v1/admin/users", json=body)
        assert r.status_code == 201, r.text
        return dict(r.json()["data"])

    def new_key(self, user_id: str) -> dict[str, Any]:
        r = self.admin("POST", "/v1/admin/api-keys", json={"user_id": user_id})
        assert r.status_code == 201, r.text
        return dict(r.json()["data"])

    def login(self, email: str) -> str:
        r = self.http.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
        assert r.status_code == 200, r.text
        return str(r.json()["data"]["access_token"])

    def keys_of(self, user_id: str) -> int:
        r = self.admin("GET", "/v1/admin/api-keys", params={"user_id": user_id})
        assert r.status_code == 200, r.text
        return len(r.json()["data"]["items"])

    def works(self, key: str) -> int:
        """What the target's own key gets on /v1/me: 200, 401 (key revoked) or 403
        (user revoked)."""
        return self.call(key, "GET", "/v1/me").status_code


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from control_plane.app import create_app
    from control_plane.routes import admin

    path: Path = tmp_path_factory.mktemp("climb") / "cp.db"
    app = create_app(_settings(f"sqlite:///{path}"))
    sock = bind_free_socket()
    # Actors' passwords hashed with cheap argon2 parameters: the logins are real, and
    # argon2's cost is not what this module tests.
    cheap = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash
    with (
        pytest.MonkeyPatch.context() as patch,
        ServerGroup([(app, sock)]),
        httpx.Client(base_url=url_of(sock), timeout=30) as http,
    ):
        patch.setattr(admin, "hash_password", cheap)
        w = World(http, {}, {}, {}, {})
        for company in COMPANIES:
            r = w.admin(
                "POST",
                "/v1/admin/companies",
                json={"name": f"{company}-{uuid.uuid4().hex[:8]}", "credits": "5"},
            )
            assert r.status_code == 201, r.text
            w.companies[company] = r.json()["data"]["id"]
        for company in COMPANIES:
            w.owners[company] = w.login(w.new_user(company, "owner", PASSWORD)["email"])
            for role in ROLES:
                w.targets[f"{role}@{company}"] = w.new_user(company, role)["id"]
        w.actors = {
            "member": w.login(w.new_user("same", "member", PASSWORD)["email"]),
            "owner": w.login(w.new_user("same", "owner", PASSWORD)["email"]),
            "admin_user": w.new_key(w.new_user("same", "admin")["id"])["key"],
            "admin_token": ADMIN_TOKEN,
        }
        yield w


def _revoke(w: World, token: str, user_id: str) -> str:
    r = w.call(token, "POST", "/v1/admin/revocations", json={"user_id": user_id})
    assert r.status_code == 201, r.text
    return str(r.json()["data"]["id"])


def _act(w: World, actor: str, action: str, target: str) -> tuple[int, bool]:
    """Run one cell; returns the status and whether the world changed as it would
    if the action had been allowed (checked for refusals: nothing may change)."""
    token = w.actors[actor]
    role, _, company = target.partition("@")
    if action == "mint_key":
        user_id = w.targets[target]
        before = w.keys_of(user_id)
        r = w.call(token, "POST", "/v1/admin/api-keys", json={"user_id": user_id})
        return r.status_code, w.keys_of(user_id) != before
    if action == "revoke_key":
        key = w.new_key(w.targets[target])
        r = w.call(token, "DELETE", f"/v1/admin/api-keys/{key['id']}")
        return r.status_code, w.works(key["key"]) == 401
    if action == "list_keys":
        r = w.call(token, "GET", "/v1/admin/api-keys", params={"user_id": w.targets[target]})
        return r.status_code, False
    if action == "create_user":
        email = f"c-{uuid.uuid4().hex[:10]}@example.com"
        body = {"company_id": w.companies[company], "email": email, "role": role}
        r = w.call(token, "POST", "/v1/admin/users", json=body)
        # Had the user been created, its email would now be taken (409).
        again = w.admin("POST", "/v1/admin/users", json=body)
        return r.status_code, again.status_code == 409
    if action == "revoke_user":
        user = w.new_user(company, role)
        key = w.new_key(user["id"])["key"]
        r = w.call(token, "POST", "/v1/admin/revocations", json={"user_id": user["id"]})
        return r.status_code, w.works(key) == 403
    if action in ("lift_owners_revocation", "lift_admins_revocation"):
        user = w.new_user(company, role)
        key = w.new_key(user["id"])["key"]
        by_owner = action == "lift_owners_revocation" and role != "admin"
        revocation = _revoke(w, w.owners[company] if by_owner else ADMIN_TOKEN, user["id"])
        r = w.call(token, "DELETE", f"/v1/admin/revocations/{revocation}")
        return r.status_code, w.works(key) == 200
    if action == "grant_credits":
        r = w.call(
            token,
            "POST",
            f"/v1/admin/companies/{w.companies[company]}/credits",
            json={"amount": "1000000", "reason": "climb"},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        )
        return r.status_code, False
    if action == "read_audit":
        params = {"company_id": w.companies[company]}
        return w.call(token, "GET", "/v1/admin/audit", params=params).status_code, False
    assert action == "list_companies"
    return w.call(token, "GET", "/v1/admin/companies").status_code, False


@pytest.mark.parametrize(("actor", "action", "target", "allowed"), CASES)
def test_role_action_target_table(
    world: World, actor: str, action: str, target: str, allowed: bool
) -> None:
    status, changed = _act(world, actor, action, target)
    if allowed:
        assert 200 <= status < 300, (actor, action, target, status)
    else:
        assert status in (403, 404), (actor, action, target, status)
        assert not changed, (actor, action, target, "a refused action changed something")


def test_the_table_covers_every_cell() -> None:
    assert len(CASES) == len(ACTORS) * (len(USER_ACTIONS) * 6 + len(COMPANY_ACTIONS) * 2 + 1)
