"""`init_writes` (issue 14.3): init's writes on PostgreSQL as one statement write
exactly what the separate statements (`ledger.take_hold`,
`chat_sessions.create_with_messages`: init's way on SQLite, run here on PostgreSQL
for the comparison) write, and nothing at all when the company cannot cover the
hold."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from control_plane import chat_sessions, hot_statements, init_writes
from control_plane.books import check_books
from control_plane.db import create_sync_engine
from control_plane.ledger import hold_entry, take_hold
from control_plane.migrate import upgrade
from control_plane.tables import Reservation, new_id, utcnow
from tests.ledger_db import FundedCompany, migrated_sessions

BALANCE = 10_000
LIMITS = chat_sessions.SessionLimits(max_messages=10, max_bytes=100)


def new_reservation(company_id: str, user_id: str, hold: int) -> init_writes.NewReservation:
    now = utcnow()
    return init_writes.NewReservation(
        id=new_id(),
        company_id=company_id,
        user_id=user_id,
        jti=new_id(),
        session_id=new_id(),
        request_id="r",
        model="m",
        provider="p",
        hold_micro=hold,
        input_estimate=10,
        max_tokens=100,
        price_input_per_mtok="1",
        price_output_per_mtok="2",
        price_cached_input_per_mtok=None,
        price_cache_write_per_mtok=None,
        status="active",
        charged_micro=None,
        created_at=now,
        expires_at=now + timedelta(minutes=5),
        settled_at=None,
        api_key_id=None,
        fallbacks=[{"model": "f", "provider": "p"}],
    )


class Tenant(FundedCompany):
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        super().__init__(sessions, BALANCE)

    def reservation(self, hold: int) -> init_writes.NewReservation:
        return new_reservation(self.company_id, self.user_id, hold)

    def rows(self, table: Any, **where: str) -> list[dict[str, Any]]:
        query = select(table).where(*(table.c[k] == v for k, v in where.items()))
        return self.tx(lambda s: [dict(r._mapping) for r in s.execute(query)])


@pytest.fixture
def company(migrated_pg_url: str) -> Iterator[Tenant]:
    with migrated_sessions(migrated_pg_url) as sessions:
        yield Tenant(sessions)


def test_the_statements_columns_are_what_their_rows_hold() -> None:
    r = new_reservation("c", "u", 1)
    entry, event = hold_entry(r, r.created_at)
    assert set(entry) == set(init_writes.LEDGER_COLUMNS)
    assert set(event) == set(init_writes.AUDIT_COLUMNS)
    columns = {c.name for c in hot_statements.RESERVATIONS.columns}
    # Every column but those only a later change sets, NULL until then: a token's
    # revocation without a `revocations` row (`stream_revocations.mark_revoked`).
    set_later = {"revoked_at"}
    assert set(init_writes.RESERVATION_COLUMNS) == columns - set_later
    # The session's rows come from `chat_sessions.new_session_rows`, as the separate
    # INSERTs' do: the one statement binds every column they fill, and only those.
    message = [{"role": "user", "content": "hi"}]
    turn = init_writes.first_turn("s", "c", "u", message, LIMITS, utcnow())
    assert turn is not None
    assert set(turn.session) == set(init_writes.SESSION_COLUMNS)
    assert set(turn.message) == set(init_writes.MESSAGE_COLUMNS)


def _without_ids(row: dict[str, Any]) -> dict[str, Any]:
    ids = (
        "id",
        "reservation_id",
        "ledger_entry_id",
        "jti",
        "created_at",
        "expires_at",
        "updated_at",
    )
    out = {k: v for k, v in row.items() if k not in ids}
    if isinstance(out.get("details"), dict):
        out["details"] = _without_ids(out["details"])
    return out


def test_one_statement_writes_what_the_separate_ones_write(company: Tenant) -> None:
    alone = company.reservation(1_000)
    company.tx(lambda s: take_hold(s, Reservation(**alone.row())))
    together = company.reservation(1_000)
    message = [{"role": "user", "content": "Hello\x00 there"}]
    turn = init_writes.first_turn(
        together.session_id, company.company_id, company.user_id, message, LIMITS, utcnow()
    )
    assert turn is not None
    assert company.tx(lambda s: init_writes.hold(s, together, turn))

    tables = (hot_statements.LEDGER, hot_statements.AUDIT)
    for table in tables:
        [a] = company.rows(table, reservation_id=alone.id)
        [b] = company.rows(table, reservation_id=together.id)
        assert _without_ids(a) == _without_ids(b)
    [a] = company.rows(hot_statements.RESERVATIONS, id=alone.id)
    [b] = company.rows(hot_statements.RESERVATIONS, id=together.id)
    assert _without_ids({**a, "session_id": "-"}) == _without_ids({**b, "session_id": "-"})
    [held] = company.rows(hot_statements.COMPANIES, id=company.company_id)
    assert held["held_micro"] == 2_000

    # Same builder, other statement: the CTEs put each value in its column.
    separate = new_id()
    company.tx(
        lambda s: chat_sessions.create_with_messages(
            s, separate, company.company_id, company.user_id, message, LIMITS, utcnow()
        )
    )
    [a] = company.rows(hot_statements.SESSIONS, id=separate)
    [b] = company.rows(hot_statements.SESSIONS, id=together.session_id)
    assert _without_ids(a) == _without_ids(b)
    assert b["title"] == "Hello\ufffd there" and b["message_count"] == 1
    [a] = company.rows(hot_statements.MESSAGES, session_id=separate)
    [b] = company.rows(hot_statements.MESSAGES, session_id=together.session_id)
    assert _without_ids({**a, "session_id": "-"}) == _without_ids({**b, "session_id": "-"})
    assert company.tx(lambda s: check_books(s, company.company_id)) == []


def test_a_hold_the_company_cannot_cover_writes_nothing(company: Tenant) -> None:
    too_much = company.reservation(BALANCE + 1)
    message = [{"role": "user", "content": "hi"}]
    turn = init_writes.first_turn(
        too_much.session_id, company.company_id, company.user_id, message, LIMITS, utcnow()
    )
    assert not company.tx(lambda s: init_writes.hold(s, too_much, turn))
    assert company.rows(hot_statements.RESERVATIONS, company_id=company.company_id) == []
    assert company.rows(hot_statements.SESSIONS, company_id=company.company_id) == []
    assert company.rows(hot_statements.LEDGER, reservation_id=too_much.id) == []
    [row] = company.rows(hot_statements.COMPANIES, id=company.company_id)
    assert row["held_micro"] == 0
    exact = replace(company.reservation(BALANCE), session_id=too_much.session_id)
    assert company.tx(lambda s: init_writes.hold(s, exact))  # no turn: the session waits


def test_only_a_single_message_within_the_caps_is_written_with_the_hold() -> None:
    def turn(messages: list[dict[str, Any]]) -> init_writes.FirstTurn | None:
        return init_writes.first_turn("s", "c", "u", messages, LIMITS, utcnow())

    # The cap counts every stored byte: the role's 4 and the text's.
    assert turn([{"role": "user", "content": "x" * 96}]) is not None
    assert turn([{"role": "user", "content": "x" * 97}]) is None  # "full": the usual way
    assert turn([{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]) is None


def test_the_hold_on_the_raw_connection_is_in_the_sessions_transaction(company: Tenant) -> None:
    # `raw_pg` runs the statement on the session's own psycopg connection: a later
    # failure in the same transaction takes the hold back with everything else.
    r = company.reservation(1_000)

    def hold_then_fail(s: Session) -> None:
        assert init_writes.hold(s, r)
        raise RuntimeError("after the hold")

    with pytest.raises(RuntimeError):
        company.tx(hold_then_fail)
    assert company.rows(hot_statements.RESERVATIONS, id=r.id) == []
    [row] = company.rows(hot_statements.COMPANIES, id=company.company_id)
    assert row["held_micro"] == 0


@pytest.mark.parametrize("pgbouncer", [False, True])
def test_behind_pgbouncer_the_hold_is_never_prepared(migrated_pg_url: str, pgbouncer: bool) -> None:
    upgrade(migrated_pg_url)
    engine = create_sync_engine(migrated_pg_url, pool_size=1, pgbouncer=pgbouncer)
    try:
        tenant = Tenant(sessionmaker(engine, expire_on_commit=False))
        for _ in range(7):  # past psycopg's prepare threshold (db.PG_PREPARE_THRESHOLD)
            assert tenant.tx(lambda s: init_writes.hold(s, tenant.reservation(1)))
        prepared = tenant.tx(
            lambda s: s.execute(
                text("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%held%'")
            ).scalar_one()
        )
        assert (prepared == 0) is pgbouncer
    finally:
        engine.dispose()
