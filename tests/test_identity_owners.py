"""A company keeps an owner (`control_plane/owners.py`): two owners demoting or revoking
each other at the same moment must not both win.

The two requests are made to overlap without any clock: a connection of the test
holds the company's row lock (``SELECT … FOR UPDATE``) while both are sent, and lets
go once PostgreSQL shows both waiting on it (`pg_stat_activity`). Before the fix the
requests never touched that row, so they did not wait at all: both went through, and
the company was left with no owner. On PostgreSQL: SQLite runs one write transaction
at a time (``BEGIN IMMEDIATE``), so there the second always sees the first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.polling import wait_until
from tests.test_control_plane import CP, data_of, error_of, start_cp


@pytest.fixture
def pg_cp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CP]:
    with start_cp(request, tmp_path, "postgres") as handle:
        yield handle


@pytest.fixture
def sqlite_cp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CP]:
    with start_cp(request, tmp_path, "sqlite") as handle:
        yield handle


def _raw_url(cp: CP) -> str:
    return cp.settings.database_url.replace("postgresql+psycopg://", "postgresql://", 1)


@contextlib.contextmanager
def _company_locked(cp: CP, company_id: str) -> Iterator[psycopg.Connection[Any]]:
    """The company's row locked until the block ends; yields a watcher connection."""
    url = _raw_url(cp)
    with psycopg.connect(url) as locker, psycopg.connect(url, autocommit=True) as watcher:
        locker.execute("SELECT id FROM companies WHERE id = %s FOR UPDATE", (company_id,))
        try:
            yield watcher
        finally:
            locker.rollback()


def _lock_waiters(watcher: psycopg.Connection[Any]) -> int:
    """Backends of this database waiting on a lock."""
    row = watcher.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ).fetchone()
    return int(row[0]) if row else 0


def _two_owners(cp: CP) -> tuple[str, list[dict[str, Any]], list[httpx.Client]]:
    company_id = cp.company("1")
    owners = [cp.user(company_id, "owner", password=None) for _ in range(2)]
    return company_id, owners, [cp.client(cp.api_key(o["id"])) for o in owners]


def _at_once(
    cp: CP, company_id: str, calls: list[Callable[[], httpx.Response]]
) -> list[httpx.Response]:
    """Send `calls` together while the company's row is locked; let go once all of
    them wait on it (or, without the lock in their path, once all have answered)."""
    with ThreadPoolExecutor(len(calls)) as pool, _company_locked(cp, company_id) as watcher:
        futures: list[Future[httpx.Response]] = [pool.submit(call) for call in calls]
        wait_until(
            lambda: _lock_waiters(watcher) == len(calls) or all(f.done() for f in futures),
            "the requests neither queued on the company's row nor answered",
        )
    return [f.result() for f in futures]


def _active_owners(cp: CP, company_id: str) -> list[str]:
    users = data_of(cp.admin.get("/v1/admin/users", params={"company_id": company_id}))
    return [u["id"] for u in users["items"] if u["role"] == "owner" and u["disabled_at"] is None]


def _one_won(answers: list[httpx.Response], won: int) -> int:
    """Exactly one answer is `won` and the other 409 `last_owner`; the winner's index."""
    assert sorted(r.status_code for r in answers) == sorted([won, 409]), [r.text for r in answers]
    loser = next(r for r in answers if r.status_code == 409)
    error_of(loser, 409, "last_owner")
    return next(i for i, r in enumerate(answers) if r.status_code == won)


def test_two_owners_demoting_each_other_at_once_leave_one_owner(pg_cp: CP) -> None:
    """Attack: the company's two owners each demote the other at the same moment.
    Both passed authentication as owners; unlocked, both demotions committed and the
    company had no owner left (measured: 200 and 200, zero owners)."""
    company_id, owners, clients = _two_owners(pg_cp)
    answers = _at_once(
        pg_cp,
        company_id,
        [
            lambda: clients[0].patch(f"/v1/admin/users/{owners[1]['id']}", json={"role": "member"}),
            lambda: clients[1].patch(f"/v1/admin/users/{owners[0]['id']}", json={"role": "member"}),
        ],
    )
    winner = _one_won(answers, 200)
    assert _active_owners(pg_cp, company_id) == [owners[winner]["id"]]


def test_two_owners_revoking_each_other_at_once_leave_one_owner(pg_cp: CP) -> None:
    """Attack: the two owners each revoke the other at once: both disabled, nobody
    left to manage the company (measured unlocked: 201 and 201, zero active owners)."""
    company_id, owners, clients = _two_owners(pg_cp)
    answers = _at_once(
        pg_cp,
        company_id,
        [
            lambda: clients[0].post("/v1/admin/revocations", json={"user_id": owners[1]["id"]}),
            lambda: clients[1].post("/v1/admin/revocations", json={"user_id": owners[0]["id"]}),
        ],
    )
    winner = _one_won(answers, 201)
    assert _active_owners(pg_cp, company_id) == [owners[winner]["id"]]


def test_owners_still_manage_each_other_and_the_platform_admin_is_not_bound(
    sqlite_cp: CP,
) -> None:
    """The rule takes nothing else away: with another owner left an owner demotes or
    revokes an owner, and the platform admin (the way back for a company with no
    owner, and the one who revokes a compromised owner) may remove the last one."""
    cp = sqlite_cp
    company_id, owners, clients = _two_owners(cp)
    third = cp.user(company_id, "owner", password=None)
    assert data_of(clients[0].patch(f"/v1/admin/users/{third['id']}", json={"role": "member"}))
    revoked = clients[0].post("/v1/admin/revocations", json={"user_id": owners[1]["id"]})
    data_of(revoked, 201)
    assert _active_owners(cp, company_id) == [owners[0]["id"]]
    last = cp.admin.patch(f"/v1/admin/users/{owners[0]['id']}", json={"role": "member"})
    assert data_of(last)["role"] == "member"
    assert _active_owners(cp, company_id) == []
