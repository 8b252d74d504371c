"""A write whose connection is cut while PostgreSQL still runs it (waiting on a row
lock here; a synchronous standby's acknowledgement or a slow disk in production):
the caller hears the cut at once, and the write commits later, once the lock goes.
The socket is really cut (shut down under psycopg), the commit is PostgreSQL's own.
In-process (ASGITransport) on PostgreSQL + Redis."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import orjson
import psycopg
import pytest
from psycopg import sql
from sqlalchemy import create_engine, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import (
    abandoned_holds,
    late_settlements,
    lost_settlements,
    sweeper,
    webhook_settlement,
)
from control_plane import db as db_module
from control_plane.books import check_books
from control_plane.tables import Reservation
from control_plane.usage_events import parse_usage_event
from shared.pricing import format_credits
from tests.inproc import eventually
from tests.test_control_plane import pg_settings, usage_event
from tests.test_lost_commit_answers import (
    BODY,
    _ledger_counted_once,
    _ledger_of,
    _member,
    _micro,
    _money_counters,
    _new_init,
    _new_inits,
    _served,
    _signed,
    _webhook_counts,
)

T = TypeVar("T")


@pytest.fixture(scope="module")
def settings(pg_server: str) -> Iterator[Any]:
    # The tests sweep themselves: the app's own passes would race them.
    with pg_settings(pg_server, {"LLMGW_SWEEP_INTERVAL_SECONDS": "3600"}) as value:
        yield value


def _conninfo(settings: Any) -> str:
    url = make_url(str(settings.database_url)).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def _waiting_port(watcher: psycopg.Connection[Any], event: str | None = None) -> int | None:
    """The client port of this database's backend waiting on a lock (of kind `event`:
    ``advisory``, ``tuple`` …), if any."""
    row = watcher.execute(
        "SELECT client_port FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        " AND (%(event)s::text IS NULL OR wait_event = %(event)s)",
        {"event": event},
    ).fetchone()
    return None if row is None else int(row[0])


@contextlib.contextmanager
def _commits_wait(
    conninfo: str, reservation_ids: list[str] | None = None, *, released_of: str | None = None
) -> Iterator[Callable[[], Any]]:
    """While inside, a transaction that changes one of `reservation_ids` (or releases
    a hold of the company `released_of`) waits at its COMMIT (a deferred trigger
    taking an advisory lock held here, as a synchronous standby's acknowledgement
    would make it wait) until the function yielded is called; then it commits."""
    tag = uuid.uuid4().hex[:12]
    key = int(tag, 16) % 2**62
    when = (
        sql.SQL("OLD.id IN ({})").format(
            sql.SQL(", ").join(sql.Literal(i) for i in reservation_ids or [])
        )
        if released_of is None
        else sql.SQL("OLD.company_id = {} AND NEW.status = 'released'").format(
            sql.Literal(released_of)
        )
    )
    function, trigger = sql.Identifier(f"wait_{tag}"), sql.Identifier(f"wait_{tag}")
    with psycopg.connect(conninfo, autocommit=True) as admin:
        admin.execute(
            sql.SQL(
                "CREATE FUNCTION {} () RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN PERFORM pg_advisory_xact_lock({}); RETURN NULL; END $$"
            ).format(function, sql.Literal(key))
        )
        admin.execute(
            sql.SQL(
                "CREATE CONSTRAINT TRIGGER {} AFTER UPDATE ON reservations"
                " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN ({})"
                " EXECUTE FUNCTION {} ()"
            ).format(trigger, when, function)
        )
        try:
            with psycopg.connect(conninfo, autocommit=True) as locker:
                locker.execute("SELECT pg_advisory_lock(%s)", (key,))
                yield lambda: locker.execute("SELECT pg_advisory_unlock(%s)", (key,))
        finally:
            admin.execute(sql.SQL("DROP TRIGGER {} ON reservations").format(trigger))
            admin.execute(sql.SQL("DROP FUNCTION {} ()").format(function))


def _looks(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[str]:
    """What the background work after a lost answer reads first, as it reads it: the
    lost write's backend's state (`lost_settlements.backend_state`), or `module.name`
    (what it wrote)."""
    looked: list[str] = []
    for owner, read in ((module, name), (lost_settlements, "backend_state")):
        real = getattr(owner, read, None)
        if real is None:  # `backend_state`, before it existed
            continue

        def look(*args: Any, real: Any = real, read: str = read, **kwargs: Any) -> Any:
            found = real(*args, **kwargs)
            looked.append(f"{read}: {found!r}")
            return found

        monkeypatch.setattr(owner, read, look)
    return looked


async def _looked_while_it_waits(looked: list[str], nothing_yet: str, what: str) -> None:
    """The read-back's first look (`_looks`) came while the lost write still waited:
    it found `nothing_yet` written, or the write's backend still active."""
    await eventually(lambda: bool(looked), what)
    assert looked[0] in (nothing_yet, "backend_state: 'active'"), looked


async def _cut_the_waiter(
    watcher: psycopg.Connection[Any], event: str | None = None, what: str = "a lock wait"
) -> None:
    """Wait until a backend of this database waits on a lock (`_waiting_port`), then
    cut its client's socket (`_cut`)."""
    port: list[int] = []

    def waiting() -> bool:
        found = _waiting_port(watcher, event)
        port.extend([] if found is None else [found])
        return bool(port)

    await eventually(waiting, what)
    _cut(port[0])


def _cut(port: int) -> None:
    """Shut down this process's socket whose local port is `port`: its peer's
    backend keeps running its statement, the client hears the connection close."""
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.getsockname()[1] == port:
                sock.shutdown(socket.SHUT_RDWR)
                return
        except OSError:
            pass
        finally:
            sock.close()
    raise AssertionError(f"no socket on local port {port}")


@contextlib.contextmanager
def _row_locked(conninfo: str, table: str, row_id: str) -> Iterator[Callable[[], Any]]:
    """While inside, another transaction holds the row `row_id` of `table` (FOR
    UPDATE): a write to it waits until the function yielded is called (its COMMIT)."""
    with psycopg.connect(conninfo, autocommit=True) as locker:
        locker.execute("BEGIN")
        locker.execute(
            sql.SQL("SELECT 1 FROM {} WHERE id = %s FOR UPDATE").format(sql.Identifier(table)),
            (row_id,),
        )
        yield lambda: locker.execute("COMMIT")


@contextlib.asynccontextmanager
async def _cut_while_blocked(
    conninfo: str,
    blocked: contextlib.AbstractContextManager[Callable[[], Any]],
    send: Callable[[], Awaitable[T]],
    what: str,
    event: str | None = None,
) -> AsyncIterator[tuple[asyncio.Future[T], Callable[[], Any]]]:
    """Inside `blocked` (`_row_locked`, `_commits_wait`), `send` is called and, once
    the write it starts waits on a lock (of kind `event`), that write's connection is
    cut (`_cut_the_waiter`). Yields what `send` started and what lets the write go on."""
    with blocked as let_go, psycopg.connect(conninfo, autocommit=True) as watcher:
        sent = asyncio.ensure_future(send())
        await _cut_the_waiter(watcher, event, what)
        yield sent, let_go


async def test_a_settlement_that_commits_after_its_cut_connection_is_counted_once(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lone webhook's settlement waits on its reservation's row lock; its
    connection is cut (503); the read-back of what it settled looks, finds nothing
    yet; then the lock goes and PostgreSQL commits the settlement. The edge's retry
    is a duplicate."""
    async with _served(settings) as (app, client):
        deps = app.state.deps
        auth, company_id, init = await _new_init(client)
        # No reply to keep: its one statement commits alone (autocommit), so the
        # commit is PostgreSQL's as soon as the lock goes, whoever hears it.
        event = usage_event(init, company_id, output_tokens=3, content="")
        body, headers = _signed(app, event)
        money, answers = _money_counters(app), _webhook_counts(app)
        # The read-back's first look at the database (its backend's state, or what
        # it settled), after which the test lets PostgreSQL commit.
        looked = _looks(monkeypatch, lost_settlements, "settled_by")
        conninfo = _conninfo(settings)
        async with _cut_while_blocked(
            conninfo,
            _row_locked(conninfo, "reservations", init["reservation_id"]),
            lambda: client.post("/v1/webhooks/usage", content=body, headers=headers),
            "the settlement waits on the row lock",
        ) as (post, unlock):
            r = await post
            assert r.status_code == 503, r.text
            # The read-back looks while the settlement still waits on the lock.
            await _looked_while_it_waits(
                looked, "settled_by: {}", "the lost settlement is read back"
            )
            unlock()

        ids = [init["reservation_id"]]

        async def committed() -> bool:
            found = await deps.db.transaction(lambda s: _ledger_of(s, company_id, ids))
            return bool(found[1]["charge"] < 0)

        await eventually(committed, "the settlement commits once the lock goes")
        r = await client.post("/v1/webhooks/usage", content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["data"] == {"duplicate": True}
        await _ledger_counted_once(app, company_id, ids, money, within=5)
        assert _webhook_counts(app)["settled"] - answers["settled"] == 1
        r = await client.get("/v1/credits", headers=auth)
        assert r.json()["data"]["held"] == "0.000000"


async def test_a_hold_that_commits_after_its_cut_connection_is_given_back(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Init's one write (autocommit: its company's LLM configuration is cached)
    waits on the company's row lock; its connection is cut (503, no token); the
    release of a hold that may have committed looks at once, finds none yet; then
    the lock goes and PostgreSQL commits the hold, for nobody. The client's retry
    must find those credits free, not held until the sweeper's deadline."""
    async with _served(settings) as (app, client):
        deps = app.state.deps
        _, _, probe = await _new_init(client)
        hold = _micro(probe["reserved_credits"])
        # Room for the warm-up's hold and one and a half more.
        auth, company_id = await _member(client, format_credits(2 * hold + hold // 2))
        r = await client.post("/v1/chat/init", json=BODY, headers=auth)
        assert r.status_code == 201, r.text
        money = _money_counters(app)
        looked = _looks(monkeypatch, abandoned_holds, "release_reservation")
        conninfo = _conninfo(settings)
        async with _cut_while_blocked(
            conninfo,
            _row_locked(conninfo, "companies", company_id),
            lambda: client.post("/v1/chat/init", json=BODY, headers=auth),
            "the hold waits on the company's row lock",
        ) as (post, unlock):
            r = await post
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "database_unavailable"
            await _looked_while_it_waits(
                looked, "release_reservation: None", "the lost hold is looked for"
            )
            unlock()

        def statuses(session: Any) -> list[str]:
            stmt = select(col(Reservation.status)).where(col(Reservation.company_id) == company_id)
            return sorted(session.scalars(stmt))

        async def given_back() -> bool:
            found: list[str] = await deps.db.transaction(statuses)
            return found == ["active", "released"]

        await eventually(given_back, "the hold committed after the cut is released", 5)
        r = await client.get("/v1/credits", headers=auth)
        assert _micro(r.json()["data"]["held"]) == hold
        # The retry fits: the lost hold's credits are free again.
        r = await client.post("/v1/chat/init", json=BODY, headers=auth)
        assert r.status_code == 201, r.text
        problems = await deps.db.transaction(lambda s: check_books(s, company_id))
        assert problems == []
        now = _money_counters(app)
        moved = {k: now[k] - money[k] for k in now}
        assert moved == {"reserved": 2 * hold, "charged": 0, "released": hold}


@pytest.mark.parametrize("batch", [False, True], ids=["alone-with-its-reply", "a-batch"])
async def test_a_settlement_whose_commit_finishes_after_its_cut_connection_is_counted_once(
    settings: Any, monkeypatch: pytest.MonkeyPatch, batch: bool
) -> None:
    """A settlement's COMMIT waits (a deferred trigger on an advisory lock, as on a
    synchronous standby); its connection is cut meanwhile (its caller hears it at
    the COMMIT); the read-back of what it settled looks; then PostgreSQL commits.
    Alone: a webhook with a reply (its charge and reply in one transaction, then
    COMMIT). A batch of two: the batcher's one transaction."""
    async with _served(settings) as (app, client):
        deps = app.state.deps
        _, company_id, inits = await _new_inits(client, 2 if batch else 1)
        events = [usage_event(init, company_id, output_tokens=3) for init in inits]
        money, answers = _money_counters(app), _webhook_counts(app)
        looked = _looks(monkeypatch, lost_settlements, "settled_by")
        conninfo = _conninfo(settings)
        ids = [init["reservation_id"] for init in inits]

        def send() -> Awaitable[Any]:
            if batch:
                deliveries = [
                    webhook_settlement.Delivery(
                        e.webhook_id, parse_usage_event(orjson.loads(e.body())), False
                    )
                    for e in events
                ]
                return asyncio.gather(
                    *(
                        deps.settler.settle(
                            d, functools.partial(late_settlements.late, deps, d.event)
                        )
                        for d in deliveries
                    ),
                    return_exceptions=True,
                )
            body, headers = _signed(app, events[0])
            return client.post("/v1/webhooks/usage", content=body, headers=headers)

        async with _cut_while_blocked(
            conninfo,
            _commits_wait(conninfo, ids),
            send,
            "the settlement's COMMIT waits",
            "advisory",
        ) as (sent, let_commit):
            await _looked_while_it_waits(
                looked, "settled_by: {}", "the lost settlement is read back"
            )
            let_commit()
            await sent

        async def committed() -> bool:
            found = await deps.db.transaction(lambda s: _ledger_of(s, company_id, ids))
            return bool(found[1]["charge"] < 0)

        await eventually(committed, "the settlement commits once its COMMIT may")
        await _ledger_counted_once(app, company_id, ids, money, within=5)
        settled = _webhook_counts(app)["settled"] - answers["settled"]
        assert settled == len(ids)


async def test_a_sweep_whose_commit_finishes_after_its_cut_connection_is_counted_once(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweeper releases an expired hold; its COMMIT waits, its connection is cut
    (the pass fails), what it released is read back; then PostgreSQL commits. Every
    later pass finds the hold done: only the read-back can count it."""
    async with _served(settings) as (app, client):
        deps = app.state.deps
        _, company_id, init = await _new_init(client)
        reservation_id = init["reservation_id"]
        hold = _micro(init["reserved_credits"])

        def expire(session: Any) -> None:
            session.execute(
                update(Reservation)
                .where(col(Reservation.id) == reservation_id)
                .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
            )

        await deps.db.transaction(expire)
        money = _money_counters(app)
        looked = _looks(monkeypatch, lost_settlements, "marked_amounts")
        conninfo = _conninfo(settings)
        async with _cut_while_blocked(
            conninfo,
            _commits_wait(conninfo, [reservation_id]),
            lambda: sweeper.sweep_expired_holds(deps.db, deps.store, deps.metrics),
            "the release's COMMIT waits",
            "advisory",
        ) as (swept, let_commit):
            with pytest.raises(DBAPIError):
                await swept
            await _looked_while_it_waits(
                looked, "marked_amounts: {}", "the lost release is read back"
            )
            let_commit()

        def status(session: Any) -> str | None:
            found = session.get(Reservation, reservation_id)
            return None if found is None else str(found.status)

        async def released() -> bool:
            return bool(await deps.db.transaction(status) == "released")

        await eventually(released, "the release commits once its COMMIT may")

        def moved() -> dict[str, int]:
            now = _money_counters(app)
            return {k: now[k] - money[k] for k in now}

        expected = {"reserved": 0, "charged": 0, "released": hold}
        await eventually(lambda: moved() == expected, f"counted: {moved()} vs {expected}", 5)
        # A later pass finds it done and counts nothing more.
        await sweeper.sweep_expired_holds(deps.db, deps.store, deps.metrics)
        assert moved() == expected
        assert await deps.db.transaction(lambda s: check_books(s, company_id)) == []


@contextlib.contextmanager
def _refusing(conninfo: str) -> Iterator[Callable[[], None]]:
    """Yields what makes the database refuse every connection, its open ones cut (a
    restart, a failover); it accepts them again on the way out."""
    url = make_url(conninfo)
    name = sql.Identifier(str(url.database))
    admin_url = url.set(database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin_url, autocommit=True) as admin:

        def refuse() -> None:
            admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(name))
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (url.database,),
            )

        try:
            yield refuse
        finally:
            admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(name))


async def test_a_settlement_whose_answer_was_lost_in_an_outage_is_counted_once_it_ends(
    settings: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The settlement commits, then the database goes away (a restart): its answer
    is lost and the read-back of what it settled finds the database refusing
    connections too. Once it is back, the settlement must still be counted."""
    caplog.set_level(logging.INFO, logger="control_plane.lost_settlements")
    async with _served(settings) as (app, client):
        _, company_id, init = await _new_init(client)
        event = usage_event(init, company_id, output_tokens=3)
        body, headers = _signed(app, event)
        money = _money_counters(app)
        with _refusing(_conninfo(settings)) as refuse:
            real_end = db_module._PooledUnit.end

            def commit_then_outage(unit: Any, commit: bool) -> None:
                real_end(unit, commit)
                refuse()
                lost = psycopg.OperationalError("server closed the connection unexpectedly")
                exc = DBAPIError.instance("COMMIT", None, lost, psycopg.Error)
                # As `end` names it when its COMMIT's answer is lost (`db.lost_backend`).
                db_module.note_backend(exc, unit.backend())
                raise exc from lost

            monkeypatch.setattr(db_module._PooledUnit, "end", commit_then_outage)
            r = await client.post("/v1/webhooks/usage", content=body, headers=headers)
            monkeypatch.undo()
            assert r.status_code == 503, r.text

            def read_back_failed() -> bool:
                return any(
                    "could not read back" in m or "unreachable after a lost answer" in m
                    for m in caplog.messages
                )

            await eventually(read_back_failed, "the read-back meets the outage")
        # The database is back: the edge's retry is a duplicate.
        r = await client.post("/v1/webhooks/usage", content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["data"] == {"duplicate": True}

        await _ledger_counted_once(app, company_id, [init["reservation_id"]], money, within=5)


async def test_webhooks_refused_a_connection_leave_no_read_back_retrying_the_outage(
    settings: Any,
) -> None:
    """The database refuses connections (a restart, a failover): each usage webhook's
    checkout fails before anything was sent, so nothing it could have settled is
    unknown. Its read-back must not retry through the outage (as a lost answer's,
    whose connection the outage cut, does): every edge's redelivery would otherwise
    leave one more task asking for a connection once a second for a minute, and the
    database coming back would meet them all beside the traffic."""
    async with _served(settings) as (app, client):
        deps = app.state.deps
        _, company_id, inits = await _new_inits(client, 5)
        calls = [0]
        real_transaction = deps.db.transaction

        async def counted(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            return await real_transaction(*args, **kwargs)

        deps.db.transaction = counted
        try:
            with _refusing(_conninfo(settings)) as refuse:
                refuse()
                for init in inits:
                    event = usage_event(init, company_id, output_tokens=3)
                    body, headers = _signed(app, event)
                    r = await client.post("/v1/webhooks/usage", content=body, headers=headers)
                    assert r.status_code == 503, r.text

                def retrying() -> list[asyncio.Task[Any]]:
                    return [t for t in asyncio.all_tasks() if t.get_name() == "lost-settlement"]

                asked = calls[0]
                await eventually(
                    lambda: not retrying(), f"{len(retrying())} read-backs still retrying", 5
                )
                # One look each at most, as before the outage retries: not one a second.
                assert calls[0] - asked <= len(inits), calls[0] - asked
        finally:
            deps.db.transaction = real_transaction


async def test_a_session_deleted_as_its_turn_settles_with_a_reply_is_no_deadlock(
    settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A turn's settlement holds its reservation's row and appends the reply to the
    session; the session's deletion holds the session's row and records its turns'
    revoked tokens on their reservations (``revoked_at``). Taken in opposite orders,
    PostgreSQL broke the cycle after its ``deadlock_timeout`` (1 s) by failing one:
    here the deletion (measured: 503 database_unavailable, "deadlock detected" in the
    server's log). An operator's transaction holding the reservation's row lines
    them up; the race needs none."""
    caplog.set_level(logging.INFO)
    async with _served(settings) as (app, client):
        auth, company_id, init = await _new_init(client)
        event = usage_event(init, company_id, output_tokens=3, content="the reply")
        body, headers = _signed(app, event)
        conninfo = _conninfo(settings)
        with (
            psycopg.connect(conninfo, autocommit=True) as watcher,
            psycopg.connect(conninfo) as operator,
        ):
            operator.execute(
                "SELECT 1 FROM reservations WHERE id = %s FOR UPDATE", (init["reservation_id"],)
            )

            def waiters() -> int:
                row = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                ).fetchone()
                return int(row[0]) if row else 0

            settling = asyncio.create_task(
                client.post("/v1/webhooks/usage", content=body, headers=headers)
            )
            await eventually(lambda: waiters() == 1, "the settlement waits on the row")
            deleting = asyncio.create_task(
                client.delete(f"/v1/sessions/{init['session_id']}", headers=auth)
            )
            await eventually(lambda: waiters() == 2, "the deletion waits on the row too")
            operator.rollback()
            settled, deleted = await settling, await deleting
        assert settled.status_code == 200, settled.text
        assert settled.json()["data"]["settled"] is True
        assert deleted.status_code == 204, deleted.text
        assert not [m for m in caplog.messages if "deadlock" in m.lower()]


def test_a_backend_whose_activity_is_not_tracked_is_not_waited_for(settings: Any) -> None:
    """With ``track_activities`` off (a server setting, or a role's), PostgreSQL shows
    the backend's state as `disabled`: nothing tells when its transaction ends. Before,
    that read as a transaction still running, and every read-back after a lost answer
    waited the whole `OVER_WAIT` (60 s). Now it is as unknown as a gone backend: read
    at once, as before the wait existed. A tracked one in a transaction is waited for."""
    engine = create_engine(str(settings.database_url))
    try:
        with psycopg.connect(_conninfo(settings), autocommit=True) as other:
            other.execute("SET track_activities = off")
            other.execute("BEGIN")
            other.execute("SELECT 1")
            with Session(engine) as session:
                assert lost_settlements.backend_state(session, other.info.backend_pid) is None
            other.execute("ROLLBACK")
            other.execute("SET track_activities = on")
            other.execute("BEGIN")
            other.execute("SELECT 1")
            with Session(engine) as session:
                state = lost_settlements.backend_state(session, other.info.backend_pid)
            assert state == "idle in transaction"
    finally:
        engine.dispose()
