"""The ledger's guards, one at a time, on a real SQLite database: the conditional
UPDATE that makes settlement and release happen once, the unique index behind it,
and `check_books`, which the other credit tests rely on to find bad books."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from control_plane.books import books_from_ledger, check_books
from control_plane.ledger import add_entry, release_reservation, settle_reservation, take_hold
from control_plane.sweeper import reconcile
from control_plane.tables import (
    AuditEvent,
    Company,
    LedgerEntry,
    Reservation,
    new_id,
    utcnow,
)
from shared.checkpoints import UsageCheckpoint
from tests.ledger_db import FundedCompany, migrated_sessions

HOLD = 1_000


class Books(FundedCompany):
    """A company with 10,000 micro-credits and one user, and a way to run a use case."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        super().__init__(sessions, 10_000)

    def hold(self) -> Reservation:
        now = utcnow()
        reservation = Reservation(
            id=new_id(),
            company_id=self.company_id,
            user_id=self.user_id,
            jti=new_id(),
            session_id=new_id(),
            request_id="r",
            model="m",
            provider="p",
            hold_micro=HOLD,
            input_estimate=10,
            max_tokens=100,
            price_input_per_mtok="1",
            price_output_per_mtok="2",
            status="active",
            created_at=now,
            expires_at=now + timedelta(minutes=5),
        )
        self.tx(lambda s: take_hold(s, reservation))
        return reservation

    def problems(self) -> list[str]:
        return self.tx(lambda s: check_books(s, self.company_id))


@pytest.fixture
def books(tmp_path: Path) -> Iterator[Books]:
    url = f"sqlite:///{tmp_path}/ledger.db"
    with migrated_sessions(url) as sessions:
        yield Books(sessions)


def _settle(reservation: Reservation, charge: int) -> Callable[[Session], Any]:
    return lambda s: settle_reservation(
        s, reservation, charge, actor="edge-webhook", request_id=None
    )


def test_a_settled_reservation_is_never_settled_or_released_again(books: Books) -> None:
    r = books.hold()
    first = books.tx(_settle(r, 300))
    assert (first.charged_micro, first.released_micro) == (300, 700)
    assert books.tx(_settle(r, 500)) is None
    assert books.tx(lambda s: release_reservation(s, r.id, "late", actor="sweeper")) is None
    point = UsageCheckpoint(r.jti, r.id, 10, 10, "2026-01-01T00:00:00Z")
    assert books.tx(lambda s: reconcile(s, r.id, point)).action == "none"
    ledger = books.tx(lambda s: books_from_ledger(s, books.company_id))
    assert (ledger.balance_micro, ledger.held_micro) == (9_700, 0)
    assert books.problems() == []


def test_a_released_reservation_is_never_settled(books: Books) -> None:
    r = books.hold()
    assert books.tx(lambda s: release_reservation(s, r.id, "expired", actor="sweeper")) == HOLD
    assert books.tx(_settle(r, 300)) is None
    assert books.tx(lambda s: release_reservation(s, r.id, "again", actor="sweeper")) is None
    ledger = books.tx(lambda s: books_from_ledger(s, books.company_id))
    assert (ledger.balance_micro, ledger.held_micro) == (10_000, 0)
    assert books.problems() == []


@pytest.mark.parametrize("kind", ["hold", "charge", "release"])
def test_the_database_refuses_a_second_row_of_a_kind_for_one_reservation(
    books: Books, kind: str
) -> None:
    """Behind the conditional UPDATE, the unique index (reservation_id, kind) stops
    any code path from charging or releasing a reservation twice."""
    r = books.hold()
    books.tx(_settle(r, 300))

    def again(s: Session) -> None:
        add_entry(
            s, books.company_id, kind, -1, actor="bug", reservation_id=r.id, user_id=r.user_id
        )
        s.flush()

    with pytest.raises(IntegrityError, match="UNIQUE constraint failed"):
        books.tx(again)
    assert books.problems() == []


def test_a_stream_row_must_name_its_reservations_user(books: Books) -> None:
    """A member's ledger is read by `user_id` (`billing.credits_page`): a stream row
    without it is refused by the database (it would vanish from its member's view),
    and one naming another user is a problem `check_books` lists."""
    r = books.hold()

    def unnamed(s: Session) -> None:
        add_entry(s, books.company_id, "release", HOLD, actor="bug", reservation_id=r.id)
        s.flush()

    with pytest.raises(IntegrityError, match="ck_ledger_entries_user"):
        books.tx(unnamed)
    problems = _tamper(
        books,
        lambda s: s.execute(
            update(LedgerEntry).where(col(LedgerEntry.reservation_id) == r.id).values(user_id="x")
        ),
    )
    assert problems == [f"reservation {r.id}: an entry names another user than {r.user_id}"]


def _tamper(books: Books, fn: Callable[[Session], Any]) -> list[str]:
    books.tx(fn)
    return books.problems()


def test_check_books_finds_a_company_row_out_of_step(books: Books) -> None:
    cid = books.company_id
    problems = _tamper(
        books,
        lambda s: s.execute(
            update(Company).where(col(Company.id) == cid).values(balance_micro=10_001)
        ),
    )
    assert any("company row" in p for p in problems)


def test_check_books_finds_a_held_amount_without_an_active_hold(books: Books) -> None:
    r = books.hold()
    problems = _tamper(
        books,
        lambda s: s.execute(
            update(Reservation).where(col(Reservation.id) == r.id).values(status="released")
        ),
    )
    assert any("Σ active holds" in p for p in problems)
    assert any(f"reservation {r.id}" in p for p in problems)


def test_check_books_finds_a_money_movement_without_its_audit_event(books: Books) -> None:
    r = books.hold()
    problems = _tamper(
        books,
        lambda s: s.execute(delete(AuditEvent).where(col(AuditEvent.reservation_id) == r.id)),
    )
    assert any("0 matching audit events" in p for p in problems)


def test_check_books_finds_a_charge_above_the_hold(books: Books) -> None:
    r = books.hold()
    books.tx(_settle(r, 300))
    problems = _tamper(
        books,
        lambda s: s.execute(
            update(Reservation).where(col(Reservation.id) == r.id).values(charged_micro=HOLD + 1)
        ),
    )
    assert any("charge + release != hold" in p for p in problems)
