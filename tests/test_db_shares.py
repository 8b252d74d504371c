"""One company's calls waiting on its own locks against everyone's database threads
(`control_plane/db_shares.py`).

Every init's hold and settlement, and most of an owner's admin writes (teams,
budgets, agents, the webhook, providers, roles), take the company's row lock; each
waits for it on one of the control plane's database threads. Here the company's own
long transaction is stood in for by a connection of the test holding the row
(``SELECT … FOR UPDATE``) until the test has seen what it needs: PostgreSQL's
`pg_stat_activity` says how many backends wait on a lock. On PostgreSQL only.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from control_plane.signing_keys import REFRESH_SECONDS
from shared.service_calls import INIT_PATH, key_digest, signed_headers
from tests.conftest import new_webhook_secret
from tests.polling import wait_until
from tests.test_control_plane import CP, error_of, start_cp
from tests.test_identity_owners import _company_locked as _row_held
from tests.test_identity_owners import _lock_waiters

# Short, so that a call refused for want of a thread says so within the test.
TIMEOUT_S = "3"
EDGE_SECRET = new_webhook_secret()


@pytest.fixture
def pg_cp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CP]:
    env = {"LLMGW_DATABASE_TIMEOUT_SECONDS": TIMEOUT_S, "LLMGW_EDGE_SERVICE_SECRET": EDGE_SECRET}
    with start_cp(request, tmp_path, "postgres", env) as handle:
        yield handle


def _init(client: httpx.Client) -> httpx.Response:
    return client.post("/v1/chat/init", json={"query": "hi", "max_tokens": 10})


def _edge_init(cp: CP, key: str) -> httpx.Response:
    """An init an edge forwards for its API-key caller (`routes/internal.py`)."""
    doc = {"key_hash": key_digest(key), "request": {"query": "hi", "max_tokens": 10}}
    body = orjson.dumps(doc)
    headers = {**signed_headers(EDGE_SECRET, body), "content-type": "application/json"}
    return httpx.post(f"{cp.url}{INIT_PATH}", content=body, headers=headers, timeout=30)


def _owner(cp: CP) -> tuple[httpx.Client, str, str]:
    """A company's owner: its API client, the company and the key."""
    company_id = cp.company("1000")
    key = cp.api_key(cp.user(company_id, password=None)["id"])
    return cp.client(key), company_id, key


def _burst(pool: ThreadPoolExecutor, cp: CP, owner: tuple[httpx.Client, str, str]) -> list[Any]:
    """The company's own inits (its bearer's and through an edge) and team creations,
    all at once: each takes its row."""
    client, company_id, key = owner
    teams = f"/v1/admin/companies/{company_id}/teams"
    return [
        *(pool.submit(_init, client) for _ in range(8)),
        *(pool.submit(_edge_init, cp, key) for _ in range(8)),
        *(
            pool.submit(client.post, teams, json={"name": f"t-{uuid.uuid4().hex[:8]}"})
            for _ in range(8)
        ),
    ]


def test_a_companys_calls_queued_on_its_own_row_leave_other_companies_threads(
    pg_cp: CP,
) -> None:
    """Company A's owner keeps its row locked (its own long transaction: a team of
    1,000 members swapped is about a second under the lock, measured) while its
    inits (a bearer's, and an API key's through an edge) and admin writes arrive, 24
    at once. Each waited for the row on a database thread: all 10 were A's, and
    company B's init waited for a thread until its bound and got 503
    `database_unavailable`. Now A's calls take at most its share of the threads (the
    rest wait in the event loop) and B's init answers while A's wait. Past the bound
    A's calls are 503 but those on the threads still wait on the row: they keep A's
    slots until their threads are done, so nothing more of A's gets on and B still
    answers."""
    deps = pg_cp.app.state.deps
    share = deps.db.shares.per_company
    owner = _owner(pg_cp)
    a, a_id, _ = owner
    b, _ = pg_cp.owner_client("1000")
    # The control plane's store connection opened before the burst, not by it: on a
    # busy machine, 24 requests at once could hold the connect past its 2 s.
    assert _init(b).status_code == 201
    with ThreadPoolExecutor(24) as pool, _row_held(pg_cp, a_id) as watcher:
        burst = _burst(pool, pg_cp, owner)
        wait_until(lambda: _lock_waiters(watcher) >= share, "A's calls never reached its row")
        wait_until(lambda: deps.db.shares.waiting(a_id) > 0, "A's surplus never queued")
        r = _init(b)
        assert r.status_code == 201, r.text
        assert _lock_waiters(watcher) == share  # A never held more than its share
        answers = [f.result() for f in burst]  # each past its bound, the row still held
        for r in answers:
            error_of(r, 503, "database_unavailable")
        # A's next inits wait for those slots, not for the row on more threads.
        later = [pool.submit(_init, a) for _ in range(10)]
        wait_until(
            lambda: _lock_waiters(watcher) > share or deps.db.shares.waiting(a_id) == 10,
            "A's later inits never arrived",
        )
        assert _lock_waiters(watcher) == share
        r = _init(b)
        assert r.status_code == 201, r.text
    # Once the row is free, A's timed-out calls end and give their slots back.
    for f in later:
        if f.result().status_code != 201:
            error_of(f.result(), 503, "database_unavailable")
    r = _init(a)
    assert r.status_code == 201, r.text


def test_a_key_read_started_by_a_company_at_its_share_holds_up_no_other_company(
    pg_cp: CP,
) -> None:
    """The signing keys are read again once a minute, by whichever init finds them
    stale first, and every init meanwhile joins that read. Started by an init of A
    while A's share is full (its calls waiting on its row), the read is nobody's
    call: it does not wait on A's gate, and B's init, joining it, answers."""
    deps = pg_cp.app.state.deps
    share = deps.db.shares.per_company
    a, a_id = pg_cp.owner_client("1000")
    b, _ = pg_cp.owner_client("1000")
    with ThreadPoolExecutor(share + 1) as pool, _row_held(pg_cp, a_id) as watcher:
        held = [pool.submit(_init, a) for _ in range(share)]
        wait_until(lambda: _lock_waiters(watcher) == share, "A's inits never reached its row")
        deps.keyring.loaded_at -= REFRESH_SECONDS + 1
        starter = pool.submit(_init, a)  # finds the keys stale: starts the read
        wait_until(lambda: deps.db.shares.waiting(a_id) == 1, "A's init never queued")
        r = _init(b)
        assert r.status_code == 201, r.text
        assert not starter.done() and not any(f.done() for f in held)
    for f in [*held, starter]:
        if f.result().status_code != 201:
            error_of(f.result(), 503, "database_unavailable")
