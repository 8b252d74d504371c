"""PostgreSQL goes silent: the server stops answering without closing anything (a
stopped process, a lock held, a partition the sockets have not noticed). Before,
every request waited for as long as that lasted (measured: all 16 still waiting
after 40 s, the 10 database threads held), and the inits queued behind them ran
once it was back, taking holds for clients long gone (13 after SIGCONT). Now each
database call is bounded (``LLMGW_DATABASE_TIMEOUT_SECONDS``): a clear 503
``database_unavailable`` with ``Retry-After``; a call no thread took never runs; an
init whose hold commits after its 503 releases it.

A private cluster (`tests.private_postgres`), never the machine's shared server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest

from shared.webhooks import sign
from tests.conftest import REDIS_URL
from tests.polling import wait_until
from tests.private_postgres import PrivatePostgres, private_postgres
from tests.stack import SplitStack, base_env, micro
from tests.test_control_plane import usage_event

__all__ = ["private_postgres"]  # the fixture, used by name

# Small, so the test's requests meet it; the clients below wait far longer, and
# fail the test if no answer comes.
BOUND_SECONDS = "1"
CLIENT_TIMEOUT_SECONDS = 60
POLL_SECONDS = 30
REQUESTS = 14  # more than the control plane's 10 database threads


@pytest.fixture
def split(private_postgres: PrivatePostgres, redis_prefix: str) -> Iterator[SplitStack]:
    url = private_postgres.new_database()
    env = base_env(url, REDIS_URL, redis_prefix)
    env["LLMGW_DATABASE_TIMEOUT_SECONDS"] = BOUND_SECONDS
    with SplitStack(env) as stack:
        yield stack


def _cluster_pids(server: PrivatePostgres) -> list[int]:
    """The private cluster's postmaster and its children (the backends)."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(
        ["ps", "--ppid", str(postmaster), "-o", "pid="],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [postmaster, *map(int, children)]


@contextlib.contextmanager
def _silenced(server: PrivatePostgres) -> Iterator[None]:
    """The cluster stopped with SIGSTOP: its sockets stay open, nothing answers."""
    pids = _cluster_pids(server)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def _direct(server: PrivatePostgres, split: SplitStack) -> psycopg.Connection[tuple[object, ...]]:
    dbname = split.env["LLMGW_DATABASE_URL"].rsplit("/", 1)[-1]
    return psycopg.connect(
        f"postgresql://postgres@127.0.0.1:{server.port}/{dbname}", autocommit=True
    )


def _statuses(server: PrivatePostgres, split: SplitStack, company_id: str) -> list[tuple[str, str]]:
    """(id, status) of the company's reservations."""
    with _direct(server, split) as conn:
        rows = conn.execute(
            "SELECT id, status FROM reservations WHERE company_id = %s", (company_id,)
        ).fetchall()
    return [(str(row[0]), str(row[1])) for row in rows]


def _assert_503(answer: httpx.Response) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "1"
    assert answer.json()["error"]["code"] == "database_unavailable"


def test_a_silent_database_is_a_bounded_503_and_holds_nothing_once_back(
    split: SplitStack, private_postgres: PrivatePostgres
) -> None:
    c = split.client
    company_id = c.new_company("5")
    access = c.new_user(company_id)
    grant = c.init_ok(access, {"query": "before"})
    before = c.credits(access)
    event = usage_event(grant, company_id, input_tokens=3, output_tokens=5)
    body = event.body()
    auth = {"Authorization": f"Bearer {access}"}

    with httpx.Client(base_url=c.cp_url, timeout=CLIENT_TIMEOUT_SECONDS) as http:
        calls: list[Callable[[], httpx.Response]] = [
            lambda: http.get("/v1/me", headers=auth),
            lambda: http.post(
                "/v1/webhooks/usage",
                content=body,
                headers=sign(split.env["LLMGW_WEBHOOK_SECRET"], event.webhook_id, body),
            ),
            *(
                lambda i=i: http.post("/v1/chat/init", json={"query": f"q{i}"}, headers=auth)
                for i in range(REQUESTS)
            ),
        ]
        with _silenced(private_postgres), ThreadPoolExecutor(len(calls)) as pool:
            answers = list(pool.map(lambda call: call(), calls))

    for answer in answers:
        _assert_503(answer)
    # Back: what was stuck finishes, what was queued never runs. No hold but the one
    # taken before is active (one an init took too late was released); the
    # settlement may have committed late, and the edge's redelivery (the 503 asks
    # for it) charges it exactly once.
    wait_until(
        lambda: all(
            status == "released"
            for reservation_id, status in _statuses(private_postgres, split, company_id)
            if reservation_id != grant["reservation_id"]
        ),
        "a hold taken too late was never released",
        within=POLL_SECONDS,
    )
    redelivered = c.http.post(
        f"{c.cp_url}/v1/webhooks/usage",
        content=body,
        headers=sign(split.env["LLMGW_WEBHOOK_SECRET"], event.webhook_id, body),
    )
    assert redelivered.status_code == 200, redelivered.text
    charged = micro(before["balance"]) - micro(c.credits(access)["balance"])
    assert 0 < charged < micro(before["held"])
    assert c.credits(access)["held"] == "0.000000"
    after = c.init_ok(access, {"query": "after"})
    assert c.credits(access)["held"] == after["reserved_credits"]


def test_an_init_whose_hold_commits_after_its_503_releases_it(
    split: SplitStack, private_postgres: PrivatePostgres
) -> None:
    c = split.client
    company_id = c.new_company("5")
    access = c.new_user(company_id)
    before = c.credits(access)
    # Another connection holds the company's row: init's hold waits on the lock
    # past its bound, then commits when the lock goes, for a client told 503.
    with _direct(private_postgres, split) as locker:
        locker.execute("BEGIN")
        locker.execute("SELECT 1 FROM companies WHERE id = %s FOR UPDATE", (company_id,))
        answer = c.init(access, {"query": "stuck behind a lock"})
        locker.execute("ROLLBACK")
    _assert_503(answer)
    wait_until(
        lambda: (
            [status for _, status in _statuses(private_postgres, split, company_id)] == ["released"]
        ),
        "the hold that committed after its 503 was never released",
        within=POLL_SECONDS,
    )
    assert c.credits(access) == before
