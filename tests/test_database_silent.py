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

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest
import redis

from control_plane.db_threads import DatabaseTimeout
from control_plane.rate_limits import window_at
from control_plane.sweeper import SweepResult, sweep_expired_holds
from control_plane.time_ids import instant_of
from shared.webhooks import sign
from tests.conftest import REDIS_URL
from tests.database_outage import a_held_stream, split_on
from tests.ops_processes import scrape
from tests.polling import wait_until
from tests.private_postgres import PrivatePostgres, private_postgres
from tests.stack import SplitStack, micro
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
    with split_on(
        private_postgres, redis_prefix, LLMGW_DATABASE_TIMEOUT_SECONDS=BOUND_SECONDS
    ) as stack:
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
    company_id, access, grant, before, event, body = a_held_stream(c)
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


@pytest.fixture
def split_tpm(private_postgres: PrivatePostgres, redis_prefix: str) -> Iterator[SplitStack]:
    """`split` with a per-user tokens-per-minute limit (far above what a test takes):
    each settlement then corrects the user's window."""
    with split_on(
        private_postgres,
        redis_prefix,
        LLMGW_DATABASE_TIMEOUT_SECONDS=BOUND_SECONDS,
        LLMGW_TPM_PER_USER="1000000",
    ) as stack:
        yield stack


def _money_counted(split: SplitStack) -> tuple[float, float]:
    """(charged, released) credits as the control plane's counters have them."""
    cp = scrape(split.client.cp_url)
    return cp.value("llmgw_cp_credits_charged_total"), cp.value("llmgw_cp_credits_released_total")


def _webhooks_settled(split: SplitStack) -> float:
    cp = scrape(split.client.cp_url)
    return cp.value("llmgw_cp_webhooks_total", outcome="settled")


def _settled_money(
    server: PrivatePostgres, split: SplitStack, reservation_id: str
) -> tuple[float, float]:
    """(charged, released) credits in the ledger for `reservation_id`."""
    with _direct(server, split) as conn:
        rows = conn.execute(
            "SELECT kind, amount_micro FROM ledger_entries WHERE reservation_id = %s",
            (reservation_id,),
        ).fetchall()
    amounts = {str(kind): abs(int(str(amount))) for kind, amount in rows}
    return amounts.get("charge", 0) / 1_000_000, amounts.get("release", 0) / 1_000_000


def test_a_settlement_that_commits_after_its_503_is_counted_once_and_corrects_tpm(
    split_tpm: SplitStack, private_postgres: PrivatePostgres, redis_prefix: str
) -> None:
    """A usage webhook's settlement waits on a lock past the bound (503), then
    commits; the edge's redelivery is a duplicate. Before, only the route counted
    what a settlement commits, after it returned: this one was never counted in
    ``llmgw_cp_credits_charged_total`` / ``_released_total`` (measured: both
    deltas 0 while the ledger had the charge and the release), and the user's
    tokens-per-minute window kept the hold's whole estimate (1034 tokens for 8
    used) until it ended. Now the database job's own success counts it and corrects
    the window, once: the duplicate adds nothing."""
    split = split_tpm
    c = split.client
    company_id = c.new_company("5")
    access = c.new_user(company_id)
    grant = c.init_ok(access, {"query": "settled late"})
    event = usage_event(grant, company_id, input_tokens=3, output_tokens=5)
    body = event.body()
    headers = sign(split.env["LLMGW_WEBHOOK_SECRET"], event.webhook_id, body)
    # The instant (the store's clock) the init counted its tokens at, in its id.
    counted_at = instant_of(grant["reservation_id"])
    assert counted_at is not None
    # The settlement's "now" inside the init's window, whatever the test's pace: a
    # correction past the window's end changes nothing by design.
    split.apps["cp"].state.deps.clock = lambda: counted_at
    window = f"{redis_prefix}tpm:user:{event.user_id}:{window_at(counted_at).start}"
    tokens = redis.Redis.from_url(REDIS_URL)
    held_tokens = int(tokens.get(window) or 0)
    assert held_tokens > 8, held_tokens
    before = _money_counted(split)
    settled_before = _webhooks_settled(split)

    # Another connection holds the reservation's row: the settlement waits on the
    # lock past its bound (503), then commits when the lock goes.
    with _direct(private_postgres, split) as locker:
        locker.execute("BEGIN")
        locker.execute(
            "SELECT 1 FROM reservations WHERE id = %s FOR UPDATE", (grant["reservation_id"],)
        )
        answer = c.http.post(f"{c.cp_url}/v1/webhooks/usage", content=body, headers=headers)
        locker.execute("ROLLBACK")
    _assert_503(answer)
    wait_until(
        lambda: (
            _statuses(private_postgres, split, company_id) == [(grant["reservation_id"], "settled")]
        ),
        "the settlement that waited on the lock never committed",
        within=POLL_SECONDS,
    )
    charged, released = _settled_money(private_postgres, split, grant["reservation_id"])
    assert charged > 0 and released > 0

    def counted() -> tuple[float, float]:
        now = _money_counted(split)
        return round(now[0] - before[0], 6), round(now[1] - before[1], 6)

    wait_until(
        lambda: counted() == (charged, released),
        "the settlement that committed after its 503 was never counted",
        within=POLL_SECONDS,
    )
    wait_until(
        lambda: int(tokens.get(window) or 0) == 8,
        "the settlement that committed after its 503 never corrected the TPM window",
        within=POLL_SECONDS,
    )
    # The edge's redelivery finds it settled: a duplicate, which counts nothing.
    again = c.http.post(f"{c.cp_url}/v1/webhooks/usage", content=body, headers=headers)
    assert again.status_code == 200, again.text
    assert again.json()["data"] == {"duplicate": True}
    assert counted() == (charged, released)
    assert int(tokens.get(window) or 0) == 8
    # Counted `settled` once, though its answer was a 503 and its retry a duplicate.
    assert _webhooks_settled(split) - settled_before == 1
    tokens.close()


@pytest.fixture
def split_unswept(private_postgres: PrivatePostgres, redis_prefix: str) -> Iterator[SplitStack]:
    """`split` whose control plane never sweeps on its own: the test sweeps."""
    with split_on(
        private_postgres,
        redis_prefix,
        LLMGW_DATABASE_TIMEOUT_SECONDS=BOUND_SECONDS,
        LLMGW_SWEEP_INTERVAL_SECONDS="3600",
    ) as stack:
        yield stack


def test_a_hold_the_sweeper_releases_after_its_bound_is_counted_once(
    split_unswept: SplitStack, private_postgres: PrivatePostgres
) -> None:
    """The hold sweeper's release waits on a lock past the database's bound (the
    sweep gives up), then commits. Before, only the sweep counted what it committed,
    after the call returned: this release was never counted in
    ``llmgw_cp_credits_released_total`` (the next sweep finds it released and counts
    nothing). Now the database job's own success counts it, once."""
    split = split_unswept
    c = split.client
    company_id = c.new_company("5")
    access = c.new_user(company_id)
    grant = c.init_ok(access, {"query": "never streamed"})
    reservation_id = grant["reservation_id"]
    with _direct(private_postgres, split) as conn:
        conn.execute(
            "UPDATE reservations SET expires_at = now() - interval '1 minute' WHERE id = %s",
            (reservation_id,),
        )
    state = split.apps["cp"].state
    loop = split.groups["cp"].loop
    assert loop is not None

    def sweep() -> SweepResult:
        return asyncio.run_coroutine_threadsafe(
            sweep_expired_holds(state.db, state.store, state.metrics), loop
        ).result(POLL_SECONDS)

    before = _money_counted(split)
    # Another connection holds the company's row: the release waits on it past the
    # bound (the sweep gives up), then commits when the lock goes.
    with _direct(private_postgres, split) as locker:
        locker.execute("BEGIN")
        locker.execute("SELECT 1 FROM companies WHERE id = %s FOR UPDATE", (company_id,))
        with pytest.raises(DatabaseTimeout):
            sweep()
        locker.execute("ROLLBACK")
    wait_until(
        lambda: _statuses(private_postgres, split, company_id) == [(reservation_id, "released")],
        "the release that waited on the lock never committed",
        within=POLL_SECONDS,
    )
    charged, released = _settled_money(private_postgres, split, reservation_id)
    assert (charged, released) == (0, micro(grant["reserved_credits"]) / 1_000_000)

    def counted() -> tuple[float, float]:
        now = _money_counted(split)
        return round(now[0] - before[0], 6), round(now[1] - before[1], 6)

    wait_until(
        lambda: counted() == (charged, released),
        "the release that committed after its sweep gave up was never counted",
        within=POLL_SECONDS,
    )
    assert sweep() == SweepResult(0, 0)  # already released: counted nothing more
    assert counted() == (charged, released)
