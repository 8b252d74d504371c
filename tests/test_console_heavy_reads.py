"""The console's heavy reads (usage aggregates, TTFT, audit searches) against an owner
who makes them as slow and as many as it can (`control_plane/heavy_reads.py`).

A heavy read is made slow here without any clock: the table it reads is locked
(``LOCK TABLE … ACCESS EXCLUSIVE``) by a connection of the test, and stays locked
until the test has seen what it needs; PostgreSQL's `pg_locks` says when the reads
are waiting on it. On PostgreSQL only: SQLite has neither the lock nor the timeout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from control_plane.heavy_reads import (
    BUSY_RETRY_AFTER_S,
    RUNNING_PER_COMPANY,
    THREADS,
    WAITING_PER_COMPANY,
    HeavyReads,
)
from tests.polling import wait_until
from tests.test_control_plane import CP, data_of, error_of, start_cp

ADMITTED = RUNNING_PER_COMPANY + WAITING_PER_COMPANY
SUMMARY = ("/v1/usage/summary", {"group_by": "day,model"})
TTFT = ("/v1/usage/ttft", {})
AUDIT = ("/v1/admin/audit", {"actor": "nobody"})  # matches nothing: reads the whole audit


@pytest.fixture
def pg_cp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CP]:
    with start_cp(request, tmp_path, "postgres") as handle:
        yield handle


def _gate(cp: CP) -> HeavyReads:
    gate = cp.app.state.deps.heavy_reads
    assert isinstance(gate, HeavyReads)
    return gate


def _raw_url(cp: CP) -> str:
    return cp.settings.database_url.replace("postgresql+psycopg://", "postgresql://", 1)


def _waiting_on(conn: psycopg.Connection[Any], table: str) -> int:
    """Backends of this database waiting for a lock on `table`."""
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass", (table,)
    ).fetchone()
    return int(row[0]) if row else 0


@contextlib.contextmanager
def _locked(cp: CP, table: str) -> Iterator[psycopg.Connection[Any]]:
    """`table` locked until the block ends; yields a watcher connection."""
    url = _raw_url(cp)
    with psycopg.connect(url) as locker, psycopg.connect(url, autocommit=True) as watcher:
        locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        try:
            yield watcher
        finally:
            locker.rollback()


def _fire(
    pool: ThreadPoolExecutor, client: httpx.Client, read: tuple[str, dict[str, str]], n: int
) -> list[Future[httpx.Response]]:
    path, params = read
    return [pool.submit(client.get, path, params=params) for _ in range(n)]


def _refused(r: httpx.Response) -> bool:
    if r.status_code != 429:
        return False
    error_of(r, 429, "too_many_heavy_reads")
    assert r.headers["Retry-After"] == str(BUSY_RETRY_AFTER_S)
    return True


def _answered(futures: list[Future[httpx.Response]]) -> list[httpx.Response]:
    return [f.result() for f in futures if f.done()]


def test_slow_aggregates_cannot_take_every_database_thread_from_inits(pg_cp: CP) -> None:
    """An owner of a large company (a year of a million streams: 1.5 s of one database
    thread per summary idle, 3 to 5 s loaded, measured) asks for its aggregates 30 at
    a time: every one of the control plane's 10 database threads waited on them, and
    every other company's inits, logins and settlements waited behind. Here two
    companies' owners do it while the records are locked: together they hold at most
    `THREADS` threads, and another company's init answers meanwhile."""
    _gate(pg_cp).timeout_ms = 300_000  # the lock, not the timeout, decides here
    owners = [pg_cp.owner_client("10")[0] for _ in range(2)]
    victim, _ = pg_cp.owner_client("10")
    with ThreadPoolExecutor(30) as pool, _locked(pg_cp, "usage_records") as watcher:
        reads = [
            f
            for owner in owners
            for f in _fire(pool, owner, SUMMARY, 10) + _fire(pool, owner, TTFT, 5)
        ]
        wait_until(
            lambda: _waiting_on(watcher, "usage_records") >= THREADS,
            "the aggregates never reached the table",
        )
        # Each company's reads past its share were refused at once.
        wait_until(
            lambda: len(_answered(reads)) == len(reads) - 2 * ADMITTED,
            "the surplus was not refused",
        )
        assert all(_refused(r) for r in _answered(reads))
        init = victim.post("/v1/chat/init", json={"query": "hi", "max_tokens": 100})
        assert init.status_code == 201, init.text
        assert _waiting_on(watcher, "usage_records") == THREADS
    answers = [f.result() for f in reads]
    assert sum(r.status_code == 200 for r in answers) == 2 * ADMITTED
    assert sum(_refused(r) for r in answers) == len(reads) - 2 * ADMITTED


def test_slow_audit_searches_cannot_take_every_database_thread(pg_cp: CP) -> None:
    """`?actor=` that matches nothing reads the company's whole audit: 0.5 s of a
    database thread with two million events (a million streams), measured. Thirty at
    once took all 10 threads from everyone else. Made slow here by a lock on the audit."""
    _gate(pg_cp).timeout_ms = 300_000
    owners = [pg_cp.owner_client("10")[0] for _ in range(2)]
    victim, _ = pg_cp.owner_client("10")
    with ThreadPoolExecutor(30) as pool, _locked(pg_cp, "audit_events") as watcher:
        searches = [f for owner in owners for f in _fire(pool, owner, AUDIT, 15)]
        wait_until(
            lambda: _waiting_on(watcher, "audit_events") >= THREADS,
            "the searches never reached the table",
        )
        # Another company's reads still get a database thread meanwhile.
        assert victim.get("/v1/me").status_code == 200
        assert victim.get("/v1/credits").status_code == 200
        assert not any(r.status_code == 200 for r in _answered(searches))
    assert all(f.result().status_code in (200, 429) for f in searches)


def test_one_companys_burst_of_heavy_reads_leaves_other_companies_a_thread(pg_cp: CP) -> None:
    """Company A's owner fires 20 audit searches that cannot finish (the audit is
    locked). Before, they took both heavy-read threads and queued the rest ahead of
    everyone: company B's owner's summary waited for all 20 (measured on a million
    records: ten of A's summaries made B's empty one wait 10.4 s). Now A runs one at a
    time, queues `WAITING_PER_COMPANY` more on its own gate, is refused the rest with
    429 and Retry-After, and B's summary and TTFT answer while A's still wait."""
    _gate(pg_cp).timeout_ms = 300_000
    a, _ = pg_cp.owner_client("10")
    b, _ = pg_cp.owner_client("10")
    with ThreadPoolExecutor(20) as pool, _locked(pg_cp, "audit_events") as watcher:
        searches = _fire(pool, a, AUDIT, 20)
        wait_until(
            lambda: _waiting_on(watcher, "audit_events") >= 1, "A's search never reached the audit"
        )
        wait_until(lambda: len(_answered(searches)) == 20 - ADMITTED, "A's surplus was not refused")
        assert all(_refused(r) for r in _answered(searches))
        assert data_of(b.get(SUMMARY[0], params=SUMMARY[1]))["items"] == []
        assert data_of(b.get(TTFT[0]))["items"] == []
        # A holds one thread, never both: its admitted searches still wait.
        assert _waiting_on(watcher, "audit_events") == RUNNING_PER_COMPANY
        assert len(_answered(searches)) == 20 - ADMITTED
    answers = [f.result() for f in searches]
    assert sum(r.status_code == 200 for r in answers) == ADMITTED
    # Its share is whole again once they have answered.
    data_of(a.get(AUDIT[0], params=AUDIT[1]))


@pytest.mark.parametrize(
    ("read", "table"),
    [(SUMMARY, "usage_records"), (TTFT, "usage_records"), (AUDIT, "audit_events")],
)
def test_a_heavy_read_past_its_statement_timeout_is_a_503_not_a_held_thread(
    pg_cp: CP, read: tuple[str, dict[str, str]], table: str
) -> None:
    """Nothing bounded how long a heavy read held its database thread (a large
    company's year: seconds; a pathological one: without end). Each statement now
    runs under `SET LOCAL statement_timeout`; one past it is cancelled and answered
    503 `query_timeout` with Retry-After while the table stays locked, and the
    company's place is given back."""
    _gate(pg_cp).timeout_ms = 200
    owner, _ = pg_cp.owner_client("10")
    path, params = read
    with _locked(pg_cp, table) as watcher:
        r = owner.get(path, params=params)
        error_of(r, 503, "query_timeout")
        assert r.headers["Retry-After"] == "1"
        assert _waiting_on(watcher, table) == 0  # cancelled, not still waiting
    _gate(pg_cp).timeout_ms = 300_000
    data_of(owner.get(path, params=params))
