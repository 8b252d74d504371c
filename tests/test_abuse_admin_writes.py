"""Free storage through an owner's admin writes: live API keys are capped per company
and per user, and a company's admin writes (each one an audit row) are counted per
minute in the store. One control plane on PostgreSQL + Redis per fixture."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from starlette.routing import Route

from control_plane import accounts
from control_plane.routes import all_routes
from tests.test_control_plane import CP, data_of, error_of, pg_settings, serve_cp

WRITES_PER_MINUTE = 6
# In the middle of a window: every write of a test counts in the same one.
PINNED = 1_800_000_030.0


@pytest.fixture(scope="module")
def cp(pg_server: str) -> Iterator[CP]:
    with pg_settings(pg_server) as settings, serve_cp(settings) as handle:
        yield handle


@pytest.fixture(scope="module")
def limited(pg_server: str) -> Iterator[CP]:
    extra = {"LLMGW_ADMIN_WRITE_RATE_PER_COMPANY": str(WRITES_PER_MINUTE)}
    with pg_settings(pg_server, extra) as settings, serve_cp(settings) as handle:
        handle.app.state.deps.clock = lambda: PINNED
        yield handle


def _rows(cp: CP, company_id: str) -> tuple[int, int]:
    """(live API keys, audit rows) of a company."""

    def read(session: Any) -> tuple[int, int]:
        keys = session.execute(
            text(
                "SELECT count(*) FROM api_keys k JOIN users u ON u.id = k.user_id "
                "WHERE u.company_id = :c AND k.revoked_at IS NULL"
            ),
            {"c": company_id},
        ).scalar()
        audits = session.execute(
            text("SELECT count(*) FROM audit_events WHERE company_id = :c"), {"c": company_id}
        ).scalar()
        return int(keys), int(audits)

    return cp.on_loop(lambda: cp.app.state.db.transaction(read))  # type: ignore[no-any-return]


def _mint(client: httpx.Client, user_id: str) -> httpx.Response:
    return client.post("/v1/admin/api-keys", json={"user_id": user_id})


# --- API keys: a cap per company and per user ------------------------------------------
def test_an_owner_cannot_mint_api_keys_without_end(cp: CP, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: an owner's script mints API keys in a loop, for one user or spread
    over its members. Nothing bounded it: each key a row and an audit row, kept
    forever (live keys are never swept). Now a user holds at most
    `accounts.API_KEYS_PER_USER_MAX` live keys and a company
    `accounts.API_KEYS_PER_COMPANY_MAX` (409 naming the limit, nothing written); a
    revoked key frees its place; the platform admin is not bound."""
    monkeypatch.setattr(accounts, "API_KEYS_PER_USER_MAX", 3)
    monkeypatch.setattr(accounts, "API_KEYS_PER_COMPANY_MAX", 6)
    owner, company_id = cp.owner_client("1")  # the owner's own key: one live key
    member = cp.user(company_id, role="member", password=None)["id"]
    minted = [data_of(_mint(owner, member), 201)["id"] for _ in range(3)]
    before = _rows(cp, company_id)
    assert before[0] == 4
    message = error_of(_mint(owner, member), 409, "conflict")
    assert "3 API keys" in message, message
    assert _rows(cp, company_id) == before
    # A revoked key is no longer live: its place is free again.
    assert owner.delete(f"/v1/admin/api-keys/{minted[0]}").status_code == 204
    data_of(_mint(owner, member), 201)
    # The company's cap counts every user's keys.
    other = cp.user(company_id, role="member", password=None)["id"]
    data_of(_mint(owner, other), 201)
    data_of(_mint(owner, other), 201)
    before = _rows(cp, company_id)
    assert before[0] == 6
    message = error_of(_mint(owner, other), 409, "conflict")
    assert "6 API keys" in message, message
    assert _rows(cp, company_id) == before
    data_of(_mint(cp.admin, other), 201)  # the platform admin may
    elsewhere, other_company = cp.owner_client("1")  # another company is not blocked
    data_of(_mint(elsewhere, cp.user(other_company, role="member", password=None)["id"]), 201)


@pytest.mark.parametrize("scope", ["company", "user"])
def test_keys_minted_at_once_at_the_cap_take_only_the_places_left(
    cp: CP, monkeypatch: pytest.MonkeyPatch, scope: str
) -> None:
    """Eight mints racing for the last two places: two pass, six are refused (409),
    never more keys than the cap."""
    monkeypatch.setattr(accounts, "API_KEYS_PER_USER_MAX", 4 if scope == "user" else 100)
    monkeypatch.setattr(accounts, "API_KEYS_PER_COMPANY_MAX", 5 if scope == "company" else 100)
    owner, company_id = cp.owner_client("1")
    member = cp.user(company_id, role="member", password=None)["id"]
    for _ in range(2):
        data_of(_mint(owner, member), 201)
    clients = [cp.client(owner.headers["Authorization"].split()[1]) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda c: _mint(c, member).status_code, clients))
    assert sorted(answers) == [201, 201] + [409] * 6, answers
    assert _rows(cp, company_id)[0] == 5  # the owner's, the member's two, two more


# --- admin writes: a rate per company --------------------------------------------------
def test_an_owner_looping_an_admin_write_is_held_to_the_rate(limited: CP) -> None:
    """Attack: an owner's script loops an admin write (here a member's role, back and
    forth): every one an audit row, kept forever, as fast as the server answers.
    Now a company's admin writes count per minute in the store: past
    LLMGW_ADMIN_WRITE_RATE_PER_COMPANY the answer is 429 with Retry-After, before
    anything is written (no audit row, the role unchanged); the platform admin and
    other companies are not held by it."""
    cp = limited
    owner, company_id = cp.owner_client("1")
    member = cp.user(company_id, role="member", password=None)["id"]
    audits = _rows(cp, company_id)[1]
    roles = ["owner", "member"] * WRITES_PER_MINUTE
    answers = [owner.patch(f"/v1/admin/users/{member}", json={"role": r}) for r in roles]
    passed = [r for r in answers if r.status_code == 200]
    assert len(passed) == WRITES_PER_MINUTE, [r.status_code for r in answers]
    assert _rows(cp, company_id)[1] == audits + WRITES_PER_MINUTE
    refused = answers[WRITES_PER_MINUTE]
    message = error_of(refused, 429, "rate_limited")
    assert refused.headers["retry-after"] == "30"
    assert f"admin writes for this company ({WRITES_PER_MINUTE} per minute)" in message, message
    # The last write that passed set "member"; the refused ones changed nothing.
    users = data_of(owner.get("/v1/admin/users", params={"company_id": company_id}))
    assert {u["id"]: u["role"] for u in users["items"]}[member] == "member"
    # Reads are not writes.
    data_of(owner.get("/v1/admin/api-keys"))
    # The platform admin is not held by the company's rate; another company neither.
    data_of(cp.admin.patch(f"/v1/admin/users/{member}", json={"role": "owner"}))
    elsewhere, other_company = cp.owner_client("1")
    other = cp.user(other_company, role="member", password=None)["id"]
    data_of(elsewhere.patch(f"/v1/admin/users/{other}", json={"role": "owner"}))
    # The next window starts afresh.
    cp.app.state.deps.clock = lambda: PINNED + 60
    try:
        data_of(owner.patch(f"/v1/admin/users/{member}", json={"role": "member"}))
    finally:
        cp.app.state.deps.clock = lambda: PINNED


def test_with_the_store_down_an_owners_admin_write_goes_through_uncounted(
    limited: CP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The counter lives in the store: with the store down an owner's admin write is
    let through, uncounted (an owner demoting a rogue member during an outage must
    not be refused; the limit bounds storage over hours, not minutes)."""
    cp = limited
    owner, company_id = cp.owner_client("1")
    member = cp.user(company_id, role="owner", password=None)["id"]

    async def down(key: str, window_seconds: float) -> int:
        raise ConnectionError("store down")

    monkeypatch.setattr(cp.app.state.deps.store, "hit", down)
    demoted = data_of(owner.patch(f"/v1/admin/users/{member}", json={"role": "member"}))
    assert demoted["role"] == "member"


def test_a_member_cannot_spend_its_companys_admin_writes(limited: CP) -> None:
    """Attack: a rogue member (no `llm:admin` scope: every admin write of its is
    refused 403, nothing written) loops an admin write anyway. Each was counted
    against its company's window all the same, so the member kept the owners from
    every admin write, demoting or revoking it included, for as long as it looped.
    Only a caller that may make an admin write (one with the admin scope) counts."""
    cp = limited
    owner, company_id = cp.owner_client("1")
    rogue_id = cp.user(company_id, role="member", password=None)["id"]
    rogue = cp.client(cp.api_key(rogue_id))
    for _ in range(WRITES_PER_MINUTE * 2):
        r = rogue.patch(f"/v1/admin/users/{rogue_id}", json={"role": "owner"})
        assert r.status_code in (403, 404), (r.status_code, r.text)  # never 429: not counted
    revoked = owner.post("/v1/admin/revocations", json={"user_id": rogue_id})
    assert revoked.status_code == 201, (revoked.status_code, revoked.text)


def _admin_writes() -> list[tuple[str, str]]:
    """(method, path) of every state-changing route under /v1/admin/, path
    parameters filled with made-up ids."""
    found = []
    for route in all_routes():
        if not isinstance(route, Route) or not route.path.startswith("/v1/admin/"):
            continue
        for method in sorted((route.methods or set()) - {"GET", "HEAD"}):
            found.append((method, re.sub(r"\{[^}]+\}", "x" + uuid.uuid4().hex[:8], route.path)))
    return found


def test_every_admin_write_counts_against_the_rate(limited: CP) -> None:
    """Once a company's window is full, every state-changing admin route answers
    429 to its owner (a route added later is covered by the same rule)."""
    cp = limited
    owner, company_id = cp.owner_client("1")
    writes = _admin_writes()
    assert len(writes) >= 20, writes
    member = cp.user(company_id, role="member", password=None)["id"]
    for _ in range(WRITES_PER_MINUTE):
        data_of(owner.patch(f"/v1/admin/users/{member}", json={"role": "member"}))
    audits = _rows(cp, company_id)[1]
    for method, path in writes:
        r = owner.request(method, path, json={})
        assert r.status_code == 429, (method, path, r.status_code, r.text)
    assert _rows(cp, company_id)[1] == audits


def test_the_admin_write_rate_is_a_setting_with_a_safe_default() -> None:
    from cryptography.fernet import Fernet

    from control_plane import admin_writes
    from control_plane.settings import ControlPlaneSettings
    from shared.settings import ConfigError
    from tests.conftest import new_webhook_secret

    base = {
        "LLMGW_WEBHOOK_SECRET": new_webhook_secret(),
        "LLMGW_ENCRYPTION_KEY": Fernet.generate_key().decode(),
    }
    assert ControlPlaneSettings.from_env(base).admin_write_rate_per_company == 600
    with pytest.raises(ConfigError, match="LLMGW_ADMIN_WRITE_RATE_PER_COMPANY"):
        ControlPlaneSettings.from_env({**base, "LLMGW_ADMIN_WRITE_RATE_PER_COMPANY": "0"})
    assert admin_writes.is_admin_write("POST", "/v1/admin/api-keys")
    assert admin_writes.is_admin_write("DELETE", "/v1/admin/companies/c/webhook")
    assert not admin_writes.is_admin_write("GET", "/v1/admin/api-keys")
    assert not admin_writes.is_admin_write("POST", "/v1/chat/init")
