"""A key minted for a user by someone ranked below the user's *later* role.

A key's power follows its user's current role (`auth.api_key_principal` cuts its
scopes to the role's on every request), and an owner's scopes are already every
scope a platform admin has. So a key an owner minted for a co-owner (or a member)
became a platform admin's key the moment the platform promoted that colleague to
``admin``: the owner who minted it climbed without meeting a rank check. A
promotion past what an owner may mint for now revokes the user's keys
(`policy.promotion_voids_keys`).
"""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import psycopg
import pytest

from control_plane.audit import ADMIN_TOKEN_ACTOR
from control_plane.company_locks import CONFIGURATION
from control_plane.policy import promotion_voids_keys
from tests.conftest import migrated_sqlite
from tests.polling import wait_until
from tests.test_control_plane import (
    CP,
    PASSWORD,
    _settings,
    data_of,
    error_of,
    pg_settings,
    serve_cp,
)
from tests.test_identity_owners import _lock_waiters, _raw_url


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CP]:
    """One control plane (SQLite) for the module: each test makes its own company."""
    path = tmp_path_factory.mktemp("promotion") / "cp.db"
    with serve_cp(_settings(migrated_sqlite(path))) as handle:
        yield handle


def _login(cp: CP, email: str) -> str:
    r = cp.client().post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    return str(data_of(r)["access_token"])


def _balances(cp: CP) -> dict[str, str]:
    items = data_of(cp.admin.get("/v1/admin/companies", params={"limit": 200}))["items"]
    return {c["id"]: c["credits"] for c in items}


@pytest.mark.parametrize("target_role", ["owner", "member"])
def test_a_key_an_owner_minted_does_not_become_a_platform_admins_key(
    cp: CP, target_role: str
) -> None:
    """Attack: an owner mints a key for a colleague ranked at or below it, then the
    platform promotes the colleague to platform admin. Before the fix, with a
    co-owner's key the owner listed every company, granted its own 1,000,000
    credits and created a platform admin elsewhere (200, 201, 201); with a member's,
    it chatted and read sessions as the platform admin (200)."""
    company_id = cp.company("1")
    elsewhere = cp.company("1")
    rogue = cp.user(company_id, "owner")
    colleague = cp.user(company_id, target_role)
    rogue_client = cp.client(_login(cp, rogue["email"]))
    key = data_of(rogue_client.post("/v1/admin/api-keys", json={"user_id": colleague["id"]}), 201)
    thief = cp.client(key["key"])
    assert thief.get("/v1/sessions").status_code == 200  # the colleague's, at its rank

    data_of(cp.admin.patch(f"/v1/admin/users/{colleague['id']}", json={"role": "admin"}))

    balances = _balances(cp)
    answers = [
        thief.get("/v1/admin/companies"),
        thief.post(
            f"/v1/admin/companies/{company_id}/credits",
            json={"amount": "1000000", "reason": "mine"},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        ),
        thief.post(
            "/v1/admin/users",
            json={
                "company_id": elsewhere,
                "email": f"p-{uuid.uuid4().hex[:8]}@x.io",
                "role": "admin",
                "password": PASSWORD,
            },
        ),
        thief.get("/v1/sessions"),
        thief.post("/v1/chat/init", json={"query": "hi"}),
    ]
    for answer in answers:
        error_of(answer, 401, "unauthenticated")
    assert _balances(cp) == balances
    # The revocation is on record, in the listing and the audit, as the platform's.
    listed = data_of(cp.admin.get("/v1/admin/api-keys", params={"user_id": colleague["id"]}))
    assert [k["revoked_at"] is not None for k in listed["items"]] == [True]
    events = data_of(
        cp.admin.get(
            "/v1/admin/audit",
            params={"kind": "admin.api_key.revoke", "target": f"api_key:{key['id']}"},
        )
    )["items"]
    assert [e["actor"] for e in events] == [ADMIN_TOKEN_ACTOR]
    # The platform admin mints the promoted user keys of its new rank, which work.
    fresh = cp.client(cp.api_key(colleague["id"]))
    assert fresh.get("/v1/admin/companies").status_code == 200


def test_a_promotion_an_owner_could_mint_for_keeps_the_users_keys(cp: CP) -> None:
    """A member made an owner keeps its keys: every key it holds was minted by an
    owner or the platform admin, ranked at or above its new role."""
    company_id = cp.company("1")
    member = cp.user(company_id, "member")
    key = cp.client(cp.api_key(member["id"]))
    data_of(cp.admin.patch(f"/v1/admin/users/{member['id']}", json={"role": "owner"}))
    assert key.get("/v1/sessions").status_code == 200


@pytest.mark.parametrize(
    ("previous", "role", "voids"),
    [
        ("member", "member", False),
        ("member", "owner", False),
        ("owner", "member", False),
        ("owner", "owner", False),
        ("admin", "owner", False),
        ("admin", "member", False),
        ("admin", "admin", False),
        ("member", "admin", True),
        ("owner", "admin", True),
        ("member", "boss", True),  # an unknown role ranks above everyone
        ("boss", "admin", True),
    ],
)
def test_which_role_changes_void_keys(previous: str, role: str, voids: bool) -> None:
    assert promotion_voids_keys(previous, role) is voids


def test_an_owner_who_chose_a_colleagues_password_does_not_sign_in_as_a_platform_admin(
    cp: CP,
) -> None:
    """Attack: an owner creates a colleague with a password it chooses (no user can
    change its own) and signs in as it once; the platform then promotes the colleague
    to platform admin. Before the fix the owner's token of before the promotion, and
    a new login with the password it chose, each listed every company (200, 200)."""
    company_id = cp.company("1")
    rogue = cp.client(_login(cp, cp.user(company_id, "owner")["email"]))
    email = f"c-{uuid.uuid4().hex[:8]}@x.io"
    body = {"company_id": company_id, "email": email, "role": "member", "password": PASSWORD}
    colleague = data_of(rogue.post("/v1/admin/users", json=body), 201)
    early = cp.client(_login(cp, email))
    assert early.get("/v1/sessions").status_code == 200

    promoted = cp.admin.patch(f"/v1/admin/users/{colleague['id']}", json={"role": "admin"})
    assert data_of(promoted)["role"] == "admin"

    error_of(early.get("/v1/admin/companies"), 401, "signed_out")
    error_of(early.get("/v1/sessions"), 401, "signed_out")
    login = cp.client().post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    error_of(login, 401, "invalid_credentials")
    events = data_of(
        cp.admin.get(
            "/v1/admin/audit",
            params={"kind": "admin.user.role", "target": f"user:{colleague['id']}"},
        )
    )["items"]
    assert [(e["details"]["before"], e["details"]["after"]) for e in events] == [
        (
            {"role": "member", "has_password": True},
            {"role": "admin", "has_password": False, "sign_ins_ended": True},
        )
    ]


def test_the_platform_admin_gives_the_promoted_user_a_password_only_it_knows(cp: CP) -> None:
    """The promotion may carry a new password, the platform admin's choice; only the
    platform admin sets one, only with a promotion to admin, and a refusal changes
    nothing (the old password still signs in, the role is kept)."""
    company_id = cp.company("1")
    owner = cp.client(_login(cp, cp.user(company_id, "owner")["email"]))
    member = cp.user(company_id, "member")
    path = f"/v1/admin/users/{member['id']}"
    refused = [
        (owner.patch(path, json={"role": "owner", "password": "chosen-by-owner"}), 403),
        (cp.admin.patch(path, json={"role": "owner", "password": "new-password"}), 422),
        (cp.admin.patch(path, json={"role": "admin", "password": "   "}), 422),
        (cp.admin.patch(path, json={"role": "admin", "password": 7}), 422),
    ]
    assert [r.status_code for r, _ in refused] == [status for _, status in refused]
    assert _login(cp, member["email"])  # unchanged
    data_of(cp.admin.patch(path, json={"role": "admin", "password": "the-platforms-choice"}))
    login = cp.client().post(
        "/v1/auth/login", json={"email": member["email"], "password": "the-platforms-choice"}
    )
    fresh = cp.client(str(data_of(login)["access_token"]))
    assert fresh.get("/v1/admin/companies").status_code == 200
    # A promotion the platform admin makes of an admin it demoted ends them again.
    data_of(cp.admin.patch(path, json={"role": "owner"}))
    assert fresh.get("/v1/sessions").status_code == 200  # a demotion ends nothing
    data_of(cp.admin.patch(path, json={"role": "admin"}))
    error_of(fresh.get("/v1/sessions"), 401, "signed_out")


@pytest.fixture(scope="module")
def pg_cp(pg_server: str) -> Iterator[CP]:
    """One control plane on PostgreSQL (+ Redis) for the module's races."""
    with pg_settings(pg_server) as settings, serve_cp(settings) as handle:
        yield handle


@contextlib.contextmanager
def _configuration_held(cp: CP, company_id: str) -> Iterator[psycopg.Connection[Any]]:
    """The company's configuration lock (`company_locks`, which an owner's mint takes
    after reading its target) held until the block ends; yields a watcher."""
    url = _raw_url(cp)
    with psycopg.connect(url) as holder, psycopg.connect(url, autocommit=True) as watcher:
        holder.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (CONFIGURATION, company_id)
        )
        try:
            yield watcher
        finally:
            holder.rollback()


@contextlib.contextmanager
def _queued_behind_a_promotion(
    cp: CP, company_id: str, request: Callable[[], httpx.Response], what: str
) -> Iterator[tuple[psycopg.Connection[Any], Future[httpx.Response]]]:
    """A promotion's transaction holding the company's row, and `request` sent and
    waiting on it: the promotion's statements (and its commit) are the caller's."""
    url = _raw_url(cp)
    with (
        ThreadPoolExecutor(1) as pool,
        psycopg.connect(url) as promoter,
        psycopg.connect(url, autocommit=True) as watcher,
    ):
        promoter.execute("SELECT id FROM companies WHERE id = %s FOR UPDATE", (company_id,))
        pending = pool.submit(request)
        wait_until(
            lambda: _lock_waiters(watcher) == 1 or pending.done(), f"the {what} never queued"
        )
        yield promoter, pending


def test_a_key_minted_while_its_user_is_promoted_is_not_a_platform_admins(pg_cp: CP) -> None:
    """Attack: the owner's mint for a co-owner reads the co-owner's role, then the
    platform's promotion of the co-owner commits (finding no key to revoke), then the
    mint inserts its key. Made to happen in that order by holding the lock the mint
    takes after its read; before the fix the key was minted (201) and listed every
    company (200). The mint reads the role again under the user's row lock."""
    cp = pg_cp
    company_id = cp.company("1")
    rogue = cp.client(cp.api_key(cp.user(company_id, "owner", password=None)["id"]))
    colleague = cp.user(company_id, "owner", password=None)
    path = f"/v1/admin/users/{colleague['id']}"
    with ThreadPoolExecutor(1) as pool, _configuration_held(cp, company_id) as watcher:
        mint = pool.submit(rogue.post, "/v1/admin/api-keys", json={"user_id": colleague["id"]})
        wait_until(lambda: _lock_waiters(watcher) == 1 or mint.done(), "the mint never queued")
        data_of(cp.admin.patch(path, json={"role": "admin"}))
    answer = mint.result()
    if answer.status_code == 201:
        key = cp.client(answer.json()["data"]["key"])
        assert key.get("/v1/admin/companies").status_code == 401, "a platform admin's key"
    error_of(answer, 404, "not_found")
    listed = data_of(cp.admin.get("/v1/admin/api-keys", params={"user_id": colleague["id"]}))
    assert [k for k in listed["items"] if k["revoked_at"] is None] == []


def test_an_owner_revoking_a_user_as_it_is_promoted_does_not_disable_a_platform_admin(
    pg_cp: CP,
) -> None:
    """Attack: an owner revokes a member at the moment the platform promotes it. The
    revocation read the member's role, then queued on the company's row (`owners`)
    behind the promotion, and went on with the role it had read: the platform admin
    was disabled by an owner (measured: 201, its key 403 ``revoked``). The role is read
    again once the company's row is held. The promotion's commit is made here by the
    transaction holding that row, exactly when the revocation waits on it."""
    cp = pg_cp
    company_id = cp.company("1")
    owner = cp.client(cp.api_key(cp.user(company_id, "owner", password=None)["id"]))
    member = cp.user(company_id, "member", password=None)
    revoke = functools.partial(owner.post, "/v1/admin/revocations", json={"user_id": member["id"]})
    with _queued_behind_a_promotion(cp, company_id, revoke, "revocation") as (promoter, revoking):
        promoter.execute("UPDATE users SET role = 'admin' WHERE id = %s", (member["id"],))
        promoter.commit()
    error_of(revoking.result(), 404, "not_found")
    users = data_of(cp.admin.get("/v1/admin/users", params={"company_id": company_id}))
    assert [u["disabled_at"] for u in users["items"] if u["id"] == member["id"]] == [None]


def test_a_key_minted_while_its_user_is_promoted_does_not_deadlock(pg_cp: CP) -> None:
    """The mint's user row lock against a promotion's lock order (the company's row,
    then the user's: `accounts.set_role`, as a revocation's). The mint took the
    user's row, then its audit row's foreign key waited for the company's row, held
    by a promotion waiting for the user's row: a deadlock. Measured before the fix:
    PostgreSQL broke it after its `deadlock_timeout` (1 s), the mint answered 503 or
    the promotion failed. The promotion's statements are made here by a transaction
    holding the company's row, exactly when the mint waits on it. The mint now queues
    on the company's row (a key share: inits go on) before it takes the user's."""
    cp = pg_cp
    company_id = cp.company("1")
    rogue = cp.client(cp.api_key(cp.user(company_id, "owner", password=None)["id"]))
    colleague = cp.user(company_id, "owner", password=None)
    minting = functools.partial(rogue.post, "/v1/admin/api-keys", json={"user_id": colleague["id"]})
    with _queued_behind_a_promotion(cp, company_id, minting, "mint") as (promoter, mint):
        try:
            promoter.execute("UPDATE users SET role = 'admin' WHERE id = %s", (colleague["id"],))
        except psycopg.errors.DeadlockDetected:
            pytest.fail("the promotion deadlocked with the mint")
        promoter.commit()
        answer = mint.result()
    assert answer.status_code != 503, answer.text
    error_of(answer, 404, "not_found")  # the promotion came first: seen under the lock


def test_a_key_revoked_while_its_user_is_promoted_does_not_deadlock(pg_cp: CP) -> None:
    """An owner revokes a colleague's key as the platform promotes the colleague (whose
    promotion revokes the user's keys, `accounts.revoke_live_keys`). The revocation
    held the key's row, then its audit row's foreign key waited for the company's row,
    held by the promotion, which waited for the key's row: a deadlock. Measured before
    the fix: PostgreSQL broke it after 1 s, the revocation answered 503 or the
    promotion failed. The promotion's statements are made here by a transaction
    holding the company's row, exactly when the revocation waits on it."""
    cp = pg_cp
    company_id = cp.company("1")
    owner = cp.client(cp.api_key(cp.user(company_id, "owner", password=None)["id"]))
    colleague = cp.user(company_id, "owner", password=None)
    cp.api_key(colleague["id"])
    listed = data_of(cp.admin.get("/v1/admin/api-keys", params={"user_id": colleague["id"]}))
    key_id = listed["items"][0]["id"]
    revoke = functools.partial(owner.delete, f"/v1/admin/api-keys/{key_id}")
    with _queued_behind_a_promotion(cp, company_id, revoke, "revocation") as (promoter, revoking):
        try:
            promoter.execute("UPDATE users SET role = 'admin' WHERE id = %s", (colleague["id"],))
            promoter.execute(
                "SELECT id FROM api_keys WHERE user_id = %s AND revoked_at IS NULL FOR UPDATE",
                (colleague["id"],),
            )
        except psycopg.errors.DeadlockDetected:
            pytest.fail("the promotion deadlocked with the key's revocation")
        promoter.commit()
        answer = revoking.result()
    assert answer.status_code != 503, answer.text
    error_of(answer, 404, "not_found")  # the promotion came first: seen under the lock
