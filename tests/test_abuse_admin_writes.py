"""Free storage through an owner's admin writes: live API keys are capped per company
and per user, and a company's admin writes (each one an audit row) are counted per
minute in the store. One control plane on PostgreSQL + Redis per fixture."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from control_plane import accounts
from tests.test_control_plane import CP, data_of, error_of, pg_settings, serve_cp


@pytest.fixture(scope="module")
def cp(pg_server: str) -> Iterator[CP]:
    with pg_settings(pg_server) as settings, serve_cp(settings) as handle:
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
