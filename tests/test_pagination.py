"""`control_plane.pagination`: the pure cut and cursor as tables of cases, and one
real PostgreSQL walk through rows that share a moment (the id must break ties)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import orjson
import pytest
from sqlalchemy import create_engine
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session
from sqlmodel import col, select

from control_plane import audit
from control_plane.errors import ValidationFailed
from control_plane.pagination import (
    PageRequest,
    cut,
    decode_cursor,
    decode_seq_cursor,
    encode_seq_cursor,
    newest_first,
    page_request,
)
from control_plane.tables import AuditEvent, ChatSession, Company

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
CREATED, ID = col(AuditEvent.created_at), col(AuditEvent.id)


def _rows(n: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(id=f"r{n - i}", created_at=T0 - timedelta(seconds=i)) for i in range(n)]


@pytest.mark.parametrize(
    ("fetched", "limit", "shown", "more"),
    [(0, 3, 0, False), (2, 3, 2, False), (3, 3, 3, False), (4, 3, 3, True), (2, 1, 1, True)],
)
def test_cut_shows_limit_rows_and_a_cursor_only_when_more_exist(
    fetched: int, limit: int, shown: int, more: bool
) -> None:
    rows = _rows(fetched)
    page = cut(rows, PageRequest(limit), CREATED, ID)
    assert page.items == rows[:shown]
    if more:
        assert decode_cursor(page.next_cursor) == (rows[shown - 1].created_at, rows[shown - 1].id)
    else:
        assert page.next_cursor is None


def test_cut_reads_the_moment_the_listing_orders_by() -> None:
    later = T0 + timedelta(hours=1)
    rows = [SimpleNamespace(id=i, created_at=T0, updated_at=later) for i in ("b", "a")]
    page = cut(rows, PageRequest(1), col(ChatSession.updated_at), col(ChatSession.id))
    assert decode_cursor(page.next_cursor) == (later, "b")


def test_page_public_shapes_items_and_keeps_the_cursor() -> None:
    page = cut(_rows(3), PageRequest(2), CREATED, ID)
    assert page.public(lambda r: r.id) == {"items": ["r3", "r2"], "next_cursor": page.next_cursor}


def _forged(moment: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([moment, "a"])).decode().rstrip("=")


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"cursor": "!!"}, "cursor"),
        ({"cursor": _forged("2026-11-30T12:00:00")}, "cursor"),  # naive
        # Aware, but past year 1 or 9999 once in UTC: an OverflowError (a 500) at the query.
        ({"cursor": _forged("0001-01-01T00:00:00+14:00")}, "cursor"),
        ({"cursor": _forged("9999-12-31T23:59:59-14:00")}, "cursor"),
    ],
)
def test_page_request_refuses_bad_queries(query: dict[str, str], error: str) -> None:
    with pytest.raises(ValidationFailed, match=error):
        page_request(query)


def test_a_cursor_is_read_in_utc() -> None:
    moment, _ = decode_cursor(_forged("2026-11-30T14:00:00+02:00")) or (None, None)
    assert moment == T0 and moment.tzinfo is UTC


def test_page_request_defaults_and_round_trip() -> None:
    assert page_request({}) == PageRequest(50, None)
    cursor = cut(_rows(2), PageRequest(1), CREATED, ID).next_cursor
    assert cursor is not None
    assert page_request({"limit": "7", "cursor": cursor}) == PageRequest(7, (T0, "r2"))


def test_seq_cursor_round_trip_and_not_a_time_cursor() -> None:
    assert decode_seq_cursor(encode_seq_cursor(42)) == 42
    time_cursor = cut(_rows(2), PageRequest(1), CREATED, ID).next_cursor
    with pytest.raises(ValidationFailed, match="cursor"):
        decode_seq_cursor(time_cursor)


def test_newest_first_orders_by_moment_then_id_and_fetches_one_more() -> None:
    stmt = newest_first(select(AuditEvent), CREATED, ID, PageRequest(10, (T0, "x")))
    sql = str(stmt.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
    assert "ORDER BY audit_events.created_at DESC, audit_events.id DESC" in sql
    assert "LIMIT 11" in sql
    assert "audit_events.created_at = " in sql and "audit_events.id < 'x'" in sql


@pytest.fixture
def session(pg_database_url: str) -> Iterator[Session]:
    engine = create_engine(pg_database_url)
    tables = [Company.__table__, AuditEvent.__table__]  # type: ignore[attr-defined]
    AuditEvent.metadata.create_all(engine, tables=tables)
    try:
        with Session(engine) as s:
            yield s
    finally:
        engine.dispose()


def test_pages_walk_rows_sharing_a_moment_once_each(session: Session) -> None:
    ids = [f"e{i}" for i in range(7)]
    for event_id in ids:
        session.add(
            AuditEvent(
                id=event_id, actor="t", action="admin.x", company_id=None, details={}, created_at=T0
            )
        )
    session.flush()
    seen: list[str] = []
    req = PageRequest(3)
    for _ in range(len(ids)):
        page = audit.page(session, None, req)
        seen += [e.id for e in page.items]
        if page.next_cursor is None:
            break
        req = PageRequest(3, decode_cursor(page.next_cursor))
    assert seen == sorted(ids, reverse=True)
