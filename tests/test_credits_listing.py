"""`GET /v1/credits`'s ledger page (`billing.credits_page`): what a member and an owner
see of a company's ledger, page after page, and that a page reads about its own size
of the ledger however large the company's is.

The rule a member's page keeps (DESIGN §9, `test_control_plane.py::
test_a_member_reads_its_own_streams_in_the_ledger_not_its_colleagues`): the company's
own entries (grants, adjustments) and the holds, charges and releases of its own
streams, never a colleague's. `_visible` states it from the reservations, as the
listing read it before entries carried their user."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from alembic import command
from sqlalchemy import event, select, text
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from control_plane.billing import credits_page
from control_plane.books import check_books
from control_plane.db import create_sync_engine
from control_plane.grants import move
from control_plane.ledger import release_reservation, settle_reservation, take_hold
from control_plane.migrate import alembic_config, upgrade
from control_plane.pagination import PageRequest, decode_cursor
from control_plane.policy import Principal, scopes_for_role
from control_plane.tables import Company, LedgerEntry, Reservation, User, new_id, utcnow
from tests.ledger_db import migrated_sessions
from tests.test_control_plane import CP, cp, data_of, error_of

__all__ = ["cp"]  # the fixture (sqlite, postgres) shared with test_control_plane

T = TypeVar("T")


class Ledger:
    """A company with an owner and two members, on a migrated database."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self.company_id = new_id()
        self.users = {role: new_id() for role in ("owner", "alice", "bob")}

        def setup(s: Session) -> None:
            s.add(Company(id=self.company_id, name=self.company_id, created_at=utcnow()))
            s.flush()
            for name, user_id in self.users.items():
                role = "owner" if name == "owner" else "member"
                s.add(User(id=user_id, company_id=self.company_id, email=f"{user_id}@x.io",
                           role=role, created_at=utcnow()))  # fmt: skip
            s.flush()
            self._grant(s, 1_000_000)

        self.tx(setup)

    def tx(self, fn: Callable[[Session], T]) -> T:
        with self.sessions.begin() as session:
            return fn(session)

    def _grant(self, s: Session, amount: int) -> None:
        move(s, self.company_id, amount, kind="grant", reason=None, actor="t", request_id=None)

    def grant(self, amount: int = 1_000) -> None:
        self.tx(lambda s: self._grant(s, amount))

    def hold(self, user: str) -> Reservation:
        now = utcnow()
        reservation = Reservation(
            id=new_id(), company_id=self.company_id, user_id=self.users[user], jti=new_id(),
            session_id=new_id(), request_id="r", model="m", provider="p", hold_micro=1_000,
            input_estimate=10, max_tokens=100, price_input_per_mtok="1",
            price_output_per_mtok="2", status="active", created_at=now,
            expires_at=now + timedelta(minutes=5),
        )  # fmt: skip
        self.tx(lambda s: take_hold(s, reservation))
        return reservation

    def principal(self, user: str) -> Principal:
        role = "owner" if user == "owner" else "member"
        return Principal(self.users[user], self.company_id, role,
                         frozenset(scopes_for_role(role)), "api_key")  # fmt: skip

    def walk(self, user: str, limit: int) -> list[str]:
        """Every entry id `user` is shown, page after page of `limit`."""
        seen: list[str] = []
        req = PageRequest(limit)
        while True:
            _, page = self.tx(
                lambda s, r=req: credits_page(s, self.principal(user), self.company_id, r)
            )
            assert len(page.items) <= limit
            seen += [e.id for e in page.items]
            if page.next_cursor is None:
                return seen
            req = PageRequest(limit, decode_cursor(page.next_cursor))

    def visible(self, user: str) -> list[str]:
        """What `user` may see, newest first: the rule, read from the reservations."""

        def read(s: Session) -> list[str]:
            owners = dict(s.execute(select(col(Reservation.id), col(Reservation.user_id))).all())
            entries = s.scalars(
                select(LedgerEntry)
                .where(col(LedgerEntry.company_id) == self.company_id)
                .order_by(col(LedgerEntry.created_at).desc(), col(LedgerEntry.id).desc())
            )
            return [
                e.id
                for e in entries
                if user == "owner"
                or e.reservation_id is None
                or owners[e.reservation_id] == self.users[user]
            ]

        return self.tx(read)


@pytest.fixture(params=["sqlite", "postgres"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/ledger.db"
    else:
        url = request.getfixturevalue("migrated_pg_url")
    with migrated_sessions(url) as sessions:
        yield Ledger(sessions)


def test_each_user_pages_through_exactly_what_it_may_see(ledger: Ledger) -> None:
    """Holds, settlements (a charge and a release written at the same instant: the id
    breaks the tie), releases, grants and adjustments of two members, walked a page of
    1, 2 and 50 at a time: each member gets the company's entries and its own streams',
    none of its colleague's, each once and newest first; the owner gets every entry."""
    for i in range(9):
        r = ledger.hold(("alice", "bob")[i % 2])
        if i % 3 == 0:
            ledger.tx(lambda s, r=r: settle_reservation(s, r, 300, actor="edge", request_id=None))
        elif i % 3 == 1:
            ledger.tx(lambda s, r=r: release_reservation(s, r.id, "expired", actor="sweeper"))
    settled = ledger.hold("bob")
    ledger.tx(lambda s: settle_reservation(s, settled, 0, actor="edge", request_id=None))
    ledger.grant()
    ledger.tx(
        lambda s: move(s, ledger.company_id, -5, kind="adjustment", reason="fix", actor="t",
                       request_id=None)
    )  # fmt: skip
    ledger.hold("alice")  # still active
    assert ledger.tx(lambda s: check_books(s, ledger.company_id)) == []
    everything = ledger.visible("owner")
    assert len(everything) == 3 + 11 + 2 * 4 + 3  # grants and adjustment, holds, ...
    for user in ("alice", "bob", "owner"):
        expected = ledger.visible(user)
        for limit in (1, 2, 50):
            assert ledger.walk(user, limit) == expected, (user, limit)
    alice, bob = set(ledger.visible("alice")), set(ledger.visible("bob"))
    assert alice | bob == set(everything)
    assert len(alice & bob) == 3  # the two grants and the adjustment


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_migration_0013_gives_existing_stream_entries_their_user(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A ledger written before 0013 (its entries carry no user): the migration names
    each stream entry's user from its reservation and leaves the company's own
    entries without one, so every member's listing shows exactly what it showed."""
    url = (
        f"sqlite:///{tmp_path}/old.db"
        if backend == "sqlite"
        else request.getfixturevalue("migrated_pg_url")
    )
    with migrated_sessions(url) as sessions:
        ledger = Ledger(sessions)
        for i in range(4):
            r = ledger.hold(("alice", "bob")[i % 2])
            if i < 2:
                ledger.tx(lambda s, r=r: settle_reservation(s, r, 300, actor="e", request_id=None))
        ledger.grant()
    command.downgrade(alembic_config(url), "0012")  # the ledger as it was before
    with migrated_sessions(url) as sessions:
        ledger.sessions = sessions
        users_of = (
            select(col(LedgerEntry.user_id), col(Reservation.user_id))
            .select_from(LedgerEntry)
            .outerjoin(Reservation, col(Reservation.id) == col(LedgerEntry.reservation_id))
            .where(col(LedgerEntry.company_id) == ledger.company_id)
        )
        rows = ledger.tx(lambda s: s.execute(users_of).all())
        assert len(rows) == 2 + 4 + 2 * 2  # grants, holds, charges and releases
        assert all(entry_user == stream_user for entry_user, stream_user in rows)
        for user in ("alice", "bob", "owner"):
            assert ledger.walk(user, 2) == ledger.visible(user), user


# --- cost: a page of a huge company's ledger ----------------------------------------

STREAMS = 20_000  # three entries each: a ledger of 60,000 entries
LIMIT = 50


def _fill(s: Session, company_id: str, user_id: str) -> None:
    """`STREAMS` settled streams of `user_id`, a second apart, as init and settlement
    write them: a hold, then a charge and a release at the same instant."""
    s.execute(
        text(
            "INSERT INTO reservations (id, company_id, user_id, jti, session_id, request_id,"
            " model, provider, hold_micro, input_estimate, max_tokens, price_input_per_mtok,"
            " price_output_per_mtok, status, charged_micro, created_at, expires_at, settled_at)"
            " SELECT 'r' || g, :c, :u, 'j' || g, 's', 'q', 'm', 'p', 100, 1, 1, '1', '1',"
            " 'settled', 40, now() - g * interval '1 second', now(), now()"
            " FROM generate_series(1, :n) g"
        ),
        {"c": company_id, "u": user_id, "n": STREAMS},
    )
    s.execute(
        text(
            "INSERT INTO ledger_entries (id, company_id, kind, amount_micro, reservation_id,"
            " user_id, created_at)"
            " SELECT k || g, :c, kind, amount, 'r' || g, :u, now() - g * interval '1 second'"
            " FROM generate_series(1, :n) g, (VALUES ('h', 'hold', -100), ('c', 'charge', -40),"
            " ('l', 'release', 60)) AS kinds(k, kind, amount)"
        ),
        {"c": company_id, "u": user_id, "n": STREAMS},
    )
    s.execute(text("ANALYZE ledger_entries"))


def _ledger_rows_read(s: Session, statement: str, params: Any) -> int:
    """Rows PostgreSQL read from `ledger_entries` running `statement`: those its scans
    returned and those their filters dropped."""
    plan = (
        s.connection()
        .exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params)
        .scalar_one()
    )

    def read(node: dict[str, Any]) -> int:
        own = 0
        if node.get("Relation Name") == "ledger_entries":
            own = (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node[
                "Actual Loops"
            ]
        return own + sum(read(child) for child in node.get("Plans", []))

    return int(read(plan[0]["Plan"]))


def test_a_page_of_a_huge_companys_ledger_reads_about_a_page(migrated_pg_url: str) -> None:
    """A member's page was picked out of the company's whole ledger (a member with
    no streams read all 900,000 entries of a company of 300,000 streams: 0.55 s), and
    any deep page, an owner's too, walked every newer entry to reach its cursor.
    Now the first and a deep page read a few rows more than they show, for an
    owner, a member with no streams and a member whose streams fill the ledger."""
    upgrade(migrated_pg_url)
    engine = create_sync_engine(migrated_pg_url)
    try:
        ledger = Ledger(sessionmaker(engine, expire_on_commit=False))
        ledger.tx(lambda s: _fill(s, ledger.company_id, ledger.users["bob"]))
        ledger.grant()
        statements: list[tuple[str, Any]] = []

        def capture(_c: Any, _cur: Any, statement: str, params: Any, *_: Any) -> None:
            if "ledger_entries" in statement:
                statements.append((statement, params))

        deep = ledger.tx(lambda s: s.get(LedgerEntry, f"h{STREAMS // 2}"))
        assert deep is not None
        for user in ("owner", "alice", "bob"):
            for after in (None, (deep.created_at, deep.id)):
                req = PageRequest(LIMIT, after)
                statements.clear()
                event.listen(engine, "before_cursor_execute", capture)
                try:
                    shown = ledger.tx(
                        lambda s, u=user, r=req: credits_page(
                            s, ledger.principal(u), ledger.company_id, r
                        )[1]
                    )
                finally:
                    event.remove(engine, "before_cursor_execute", capture)
                [(statement, params)] = statements
                read = ledger.tx(lambda s, q=statement, p=params: _ledger_rows_read(s, q, p))
                assert read <= 2 * (LIMIT + 1) + 5, (user, after, read)
                # Alice has no streams: the two grants, both newer than the deep cursor.
                assert len(shown.items) == (LIMIT if user != "alice" else 0 if after else 2)
    finally:
        engine.dispose()


# --- the cursor over HTTP: tampered is a 422, forged is only a position -------------


def _b64(doc: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(doc)).decode().rstrip("=")


TAMPERED = [
    "!!",
    base64.urlsafe_b64encode(b"\xff\xfe not json").decode(),
    _b64({"at": "2026-01-01T00:00:00Z"}),
    _b64([]),
    _b64(["2026-01-01T00:00:00Z"]),
    _b64([20260101, "a"]),
    _b64(["2026-01-01T00:00:00", "a"]),  # naive
    _b64(["2026-01-01T00:00:00Z", 5]),
    _b64(["2026-01-01T00:00:00Z", "a\u0000"]),
    _b64(["seq", 3]),  # a session's message cursor
]


def test_a_tampered_ledger_cursor_is_a_422_and_a_forged_one_only_a_position(cp: CP) -> None:
    """For a member (two merged index ranges) and an owner alike: a cursor that is not
    one this API returned is 422 `validation_error` naming the cursor, never a 500; a
    well-formed one that it never returned (any moment, any id) is only a place in the
    newest-first order: it shows nobody else's entries and changes nothing."""
    owner, company_id = cp.owner_client("10")
    member = cp.client(cp.api_key(cp.user(company_id, role="member", password=None)["id"]))
    colleague = cp.client(cp.api_key(cp.user(company_id, role="member", password=None)["id"]))
    for chatter in (member, colleague):
        data_of(chatter.post("/v1/chat/init", json={"query": "hi"}), 201)
    # The member: the grant and its own hold; the owner: its colleague's hold too.
    for client, shown in ((member, 2), (owner, 3)):
        whole = data_of(client.get("/v1/credits", params={"limit": 200}))
        assert len(whole["entries"]) == shown
        for cursor in TAMPERED:
            r = client.get("/v1/credits", params={"cursor": cursor})
            assert "cursor" in error_of(r, 422, "validation_error"), cursor
        future = data_of(
            client.get(
                "/v1/credits",
                params={"cursor": _b64(["2999-01-01T00:00:00Z", "~" * 500]), "limit": 200},
            )
        )
        assert future["entries"] == whole["entries"] and future["next_cursor"] is None
        past = data_of(
            client.get("/v1/credits", params={"cursor": _b64(["2000-01-01T00:00:00+05:00", ""])})
        )
        assert past["entries"] == [] and past["next_cursor"] is None
        assert data_of(client.get("/v1/credits", params={"limit": 200})) == whole
