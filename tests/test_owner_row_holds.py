"""An owner's writes and its company's row, which every init's hold and every
settlement of the company updates (review rowlock).

A team of `TEAM_USERS_MAX` members swapped held the company's row ~1 s (one read
per member under the lock), created ~0.55 s, deleted ~0.35 s: meanwhile each of the
company's inits and settlements waited for it. Here a connection of the test holds
one member's row, so that the owner's write stops midway, at that member, for as
long as the test needs; PostgreSQL's `pg_stat_activity` says when it waits. On
PostgreSQL only (SQLite runs one write transaction at a time).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import event as sa_event

from control_plane.budget_admin import TEAM_USERS_MAX, TEAMS_PER_USER_MAX
from tests.polling import wait_until
from tests.test_control_plane import CP, data_of, error_of, start_cp
from tests.test_identity_owners import _lock_waiters, _raw_url

# Short, so that an init stuck behind the write says so within the test.
TIMEOUT_S = "3"


@pytest.fixture
def pg_cp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CP]:
    env = {"LLMGW_DATABASE_TIMEOUT_SECONDS": TIMEOUT_S}
    with start_cp(request, tmp_path, "postgres", env) as handle:
        yield handle


def _members(cp: CP, company_id: str, n: int) -> list[str]:
    """`n` members of the company, in one INSERT (the API would take a request each)."""
    ids = sorted(uuid.uuid4().hex for _ in range(n))
    with psycopg.connect(_raw_url(cp)) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO users (id, company_id, email, role, created_at)"
            " VALUES (%s, %s, %s, 'member', now())",
            [(user_id, company_id, f"{user_id}@example.com") for user_id in ids],
        )
    return ids


@contextlib.contextmanager
def _user_held(cp: CP, user_id: str) -> Iterator[psycopg.Connection[Any]]:
    """The user's row locked until the block ends; yields a watcher connection."""
    url = _raw_url(cp)
    with psycopg.connect(url) as locker, psycopg.connect(url, autocommit=True) as watcher:
        locker.execute("SELECT id FROM users WHERE id = %s FOR UPDATE", (user_id,))
        try:
            yield watcher
        finally:
            locker.rollback()


def _init(client: httpx.Client) -> httpx.Response:
    return client.post("/v1/chat/init", json={"query": "hi", "max_tokens": 10})


@pytest.mark.parametrize("write", ["create", "swap"])
def test_a_largest_team_written_leaves_the_companys_inits_alone(pg_cp: CP, write: str) -> None:
    """Attack: an owner creates a team of 1,000 members, or swaps one's 1,000 members
    for 1,000 others, again and again: each held the company's row for the whole
    write, one read per member (measured: 0.5-0.8 s created, 0.9-1.4 s swapped), and
    every init and settlement of the company queued behind it (2 owners swapping 24
    times: the company's inits p50 1.8-2.0 s, p99 2.9-5.7 s). Stopped midway here
    (one member's row held), the write kept the row and the company's init waited
    past its bound: 503 `database_unavailable`. Now an edit holds the team's row and
    its members' only, a creation the company's configuration lock
    (`company_locks`), and neither the company's row: the init answers at once."""
    owner, company_id = pg_cp.owner_client("1000")
    member = pg_cp.client(pg_cp.api_key(pg_cp.user(company_id, "member", password=None)["id"]))
    first, second = (_members(pg_cp, company_id, TEAM_USERS_MAX) for _ in range(2))
    teams = f"/v1/admin/companies/{company_id}/teams"
    call: Callable[[], httpx.Response]
    if write == "create":
        call = lambda: owner.post(teams, json={"name": "big", "user_ids": first})  # noqa: E731
        held, done = first[TEAM_USERS_MAX // 2], 201
    else:
        team = data_of(owner.post(teams, json={"name": "big", "user_ids": first}), 201)
        path = f"{teams}/{team['id']}"
        call = lambda: owner.patch(path, json={"user_ids": second})  # noqa: E731
        held, done = second[TEAM_USERS_MAX // 2], 200
    with ThreadPoolExecutor(1) as pool, _user_held(pg_cp, held) as watcher:
        pending = pool.submit(call)
        wait_until(lambda: _lock_waiters(watcher) == 1, "the write never reached the member")
        r = _init(member)
        assert r.status_code == 201, r.text
    answer = pending.result()
    assert answer.status_code == done, answer.text
    assert sorted(data_of(answer, done)["user_ids"]) == (first if write == "create" else second)


def _statements(
    cp: CP, client: httpx.Client, method: str, path: str, body: Any = None
) -> tuple[httpx.Response, int]:
    """The request's answer and how many statements on members and users it sent."""
    sent: list[str] = []

    def count(*args: Any) -> None:
        statement = str(args[2])
        if "team_members" in statement or "FROM users" in statement:
            sent.append(statement)

    engine = cp.app.state.db.engine
    sa_event.listen(engine, "before_cursor_execute", count)
    try:
        return client.request(method, path, json=body), len(sent)
    finally:
        sa_event.remove(engine, "before_cursor_execute", count)


def test_a_team_writes_statements_do_not_grow_with_its_members(pg_cp: CP) -> None:
    """Each member was read with a statement of its own (and removed ones again),
    under the company's row: 1,000 members, ~1,000 round trips. Now a creation, a
    swap and a deletion each send as many statements for 1 member as for 300."""
    owner, company_id = pg_cp.owner_client("1")
    teams = f"/v1/admin/companies/{company_id}/teams"
    counted: dict[int, list[int]] = {}
    for size in (1, 300):
        first, second = (_members(pg_cp, company_id, size) for _ in range(2))
        body = {"name": f"t{size}", "user_ids": first}
        created, on_create = _statements(pg_cp, owner, "POST", teams, body)
        path = f"{teams}/{data_of(created, 201)['id']}"
        swapped, on_swap = _statements(pg_cp, owner, "PATCH", path, {"user_ids": second})
        assert data_of(swapped)["user_ids"] == second
        deleted, on_delete = _statements(pg_cp, owner, "DELETE", path)
        assert deleted.status_code == 204, deleted.text
        counted[size] = [on_create, on_swap, on_delete]
    assert counted[300] == counted[1], counted


def test_two_teams_taking_a_user_at_once_keep_it_within_its_teams(pg_cp: CP) -> None:
    """The company's row no longer queues team edits, so the user's own row must: a
    user in `TEAMS_PER_USER_MAX` - 1 teams added to two more at once (both edits
    stopped at the user's row, then let go together) ends in the most it may be in;
    the second edit is 422 and changes nothing."""
    owner, company_id = pg_cp.owner_client("1")
    [user] = _members(pg_cp, company_id, 1)
    teams = f"/v1/admin/companies/{company_id}/teams"
    for i in range(TEAMS_PER_USER_MAX - 1):
        data_of(owner.post(teams, json={"name": f"in{i}", "user_ids": [user]}), 201)
    paths = [
        f"{teams}/{data_of(owner.post(teams, json={'name': name}), 201)['id']}"
        for name in ("x", "y")
    ]
    with ThreadPoolExecutor(2) as pool, _user_held(pg_cp, user) as watcher:
        pending = [pool.submit(owner.patch, path, json={"user_ids": [user]}) for path in paths]
        wait_until(lambda: _lock_waiters(watcher) == 2, "the edits never queued on the user")
    answers = sorted((f.result() for f in pending), key=lambda r: r.status_code)
    assert [r.status_code for r in answers] == [200, 422], [r.text for r in answers]
    error_of(answers[1], 422, "validation_error")
    listed = data_of(owner.get(teams))["items"]
    assert sum(user in t["user_ids"] for t in listed) == TEAMS_PER_USER_MAX


def test_a_team_edited_while_it_is_deleted_is_404_not_a_deadlock(pg_cp: CP) -> None:
    """The order the edit takes its locks in: a deletion holds the company's row,
    then waits for the team's (held here, by a key share of the test); an edit sent
    then must not hold the team's row while it waits for the company's (its audit
    row's foreign key), or PostgreSQL breaks the deadlock by failing one of them. It
    waits for the company first: the deletion is 204, the edit 404."""
    owner, company_id = pg_cp.owner_client("1")
    team = data_of(owner.post(f"/v1/admin/companies/{company_id}/teams", json={"name": "t"}), 201)
    path = f"/v1/admin/companies/{company_id}/teams/{team['id']}"
    url = _raw_url(pg_cp)
    with (
        ThreadPoolExecutor(2) as pool,
        psycopg.connect(url) as locker,
        psycopg.connect(url, autocommit=True) as watcher,
    ):
        locker.execute("SELECT id FROM teams WHERE id = %s FOR KEY SHARE", (team["id"],))
        deleting = pool.submit(owner.delete, path)
        wait_until(lambda: _lock_waiters(watcher) == 1, "the deletion never reached the team")
        editing = pool.submit(owner.patch, path, json={"name": "renamed"})
        wait_until(lambda: _lock_waiters(watcher) == 2, "the edit never queued")
        locker.rollback()
        assert deleting.result().status_code == 204, deleting.result().text
        error_of(editing.result(), 404, "not_found")
