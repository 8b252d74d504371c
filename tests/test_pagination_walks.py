"""Every keyset listing walked through the real app (SQLite and PostgreSQL) under
what breaks keyset pagination: many rows sharing one moment, rows written or
deleted between two page reads, pages of 1 and of 200, and cursors that are not
the list's own (another list's, another company's, the member's used by the owner
and the reverse, forged, truncated). Each walk must show every item once, newest
first with the id breaking ties; a foreign cursor is only a position in the
caller's own list, a mangled one a 422."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
from sqlalchemy import update
from sqlmodel import SQLModel

from control_plane.db import create_sync_engine
from control_plane.tables import (
    ApiKey,
    AuditEvent,
    ChatSession,
    Company,
    LedgerEntry,
    Revocation,
    UsageRecord,
    User,
)
from tests.test_control_plane import CP, cp, data_of, error_of, usage_event
from tests.token_claims import jti_of

__all__ = ["cp"]  # the fixture (sqlite, postgres) shared with test_control_plane

# One moment, microseconds and all, for every row of a table: the id alone orders them.
T0 = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)

TIED: list[tuple[type[SQLModel], str]] = [
    (Company, "created_at"),
    (User, "created_at"),
    (ApiKey, "created_at"),
    (UsageRecord, "created_at"),
    (LedgerEntry, "created_at"),
    (ChatSession, "updated_at"),
    (AuditEvent, "created_at"),
    (Revocation, "created_at"),
]


def tie(cp: CP, only: list[tuple[type[SQLModel], str]] | None = None) -> None:
    """Every row of the tables given the same moment, through the columns' own type
    (SQLite stores text: a raw string would not compare as the app's do)."""
    engine = create_sync_engine(cp.settings.database_url)
    try:
        with engine.begin() as conn:
            for model, column in only or TIED:
                table = model.__table__  # type: ignore[attr-defined]
                conn.execute(update(table).values({column: T0}))
    finally:
        engine.dispose()


def walk(
    client: httpx.Client,
    path: str,
    limit: int,
    params: dict[str, str] | None = None,
    key: str = "items",
    between: Callable[[int], None] | None = None,
) -> list[str]:
    """Every id `client` is shown, page after page of `limit`; `between(n)` runs
    after the n-th page."""
    seen: list[str] = []
    cursor = None
    for pages in range(1, 1000):
        query: dict[str, Any] = {**(params or {}), "limit": limit}
        if cursor is not None:
            query["cursor"] = cursor
        doc = data_of(client.get(path, params=query))
        assert len(doc[key]) <= limit
        seen += [item["id"] for item in doc[key]]
        cursor = doc["next_cursor"]
        if cursor is None:
            return seen
        if between is not None:
            between(pages)
    raise AssertionError(f"{path}: no end after 1000 pages")


class Tenant:
    """A company with an owner and two members, each of whose streams was settled."""

    def __init__(self, cp: CP, streams: int = 3) -> None:
        self.owner, self.company_id = cp.owner_client("10")
        self.member_ids = [cp.user(self.company_id, role="member")["id"] for _ in range(2)]
        self.members = [cp.client(cp.api_key(user_id)) for user_id in self.member_ids]
        self.inits: list[dict[str, Any]] = []
        for i in range(streams):
            for client in (*self.members, self.owner):
                init = data_of(client.post("/v1/chat/init", json={"query": f"q{i}"}), 201)
                event = usage_event(init, self.company_id, output_tokens=1)
                assert cp.webhook(event).status_code == 200
                self.inits.append(init)


def lists(cp: CP, t: Tenant) -> list[tuple[httpx.Client, str, dict[str, str], str]]:
    """(caller, path, query, key) of every keyset listing, as the owner, a member and
    the platform admin read them."""
    c = {"company_id": t.company_id}
    member = t.members[0]
    return [
        (cp.admin, "/v1/admin/companies", {}, "items"),
        (cp.admin, "/v1/admin/users", c, "items"),
        (t.owner, "/v1/admin/users", {}, "items"),
        (cp.admin, "/v1/admin/api-keys", c, "items"),
        (t.owner, "/v1/admin/api-keys", {}, "items"),
        (t.owner, "/v1/usage", {}, "items"),
        (member, "/v1/usage", {}, "items"),
        (t.owner, "/v1/credits", {}, "entries"),
        (member, "/v1/credits", {}, "entries"),
        (t.owner, "/v1/sessions", {}, "items"),
        (member, "/v1/sessions", {}, "items"),
        (cp.admin, "/v1/admin/audit", c, "items"),
        (t.owner, "/v1/admin/audit", {}, "items"),
        (cp.admin, "/v1/admin/revocations", {}, "items"),
        (t.owner, "/v1/admin/revocations", {}, "items"),
    ]


def test_every_listing_walks_rows_sharing_one_moment_once_each_by_id(cp: CP) -> None:
    t = Tenant(cp)
    Tenant(cp, streams=1)  # a neighbour whose rows must never show
    for init in t.inits[:3]:
        body = {"jti": jti_of(init["stream_token"]), "reason": "test"}
        data_of(cp.admin.post("/v1/admin/revocations", json=body), 201)
    tie(cp)
    for client, path, params, key in lists(cp, t):
        whole = walk(client, path, 200, params, key)
        assert len(whole) >= 2, (path, params)
        assert whole == sorted(set(whole), reverse=True), (path, params)  # once each, by id
        for limit in (1, 2):
            assert walk(client, path, limit, params, key) == whole, (path, params, limit)


def test_rows_written_and_deleted_between_pages_neither_repeat_nor_hide_others(cp: CP) -> None:
    """Between two pages of the owner's sessions (all sharing one moment), a session
    not yet shown and the one the cursor stands on are deleted, and new users and
    sessions are written; between pages of the company's users, users are added
    at the same moment as the rest: each row there from the start is shown once,
    none that was deleted before its page is shown, nothing twice."""
    t = Tenant(cp, streams=2)
    for _ in range(4):
        cp.user(t.company_id, role="member", password=None)
    tie(cp)
    sessions = walk(t.owner, "/v1/sessions", 200)
    assert len(sessions) == 6
    gone: list[str] = []

    def churn(page: int) -> None:
        if page == 1:
            for sid in (sessions[1], sessions[4]):  # the cursor's row and one not yet shown
                assert t.owner.delete(f"/v1/sessions/{sid}").status_code == 204
                gone.append(sid)
            data_of(t.members[0].post("/v1/chat/init", json={"query": "new"}), 201)

    seen = walk(t.owner, "/v1/sessions", 2, between=churn)
    assert seen == [s for s in sessions if s != sessions[4]]

    users = walk(t.owner, "/v1/admin/users", 200)
    assert len(users) == 7

    def grow(page: int) -> None:
        for _ in range(3):
            cp.user(t.company_id, role="member", password=None)
        tie(cp, [(User, "created_at")])

    seen = walk(t.owner, "/v1/admin/users", 2, between=grow)
    assert len(seen) == len(set(seen))
    assert set(users) <= set(seen)
    assert seen == sorted(seen, reverse=True)


def _b64(doc: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(doc)).decode().rstrip("=")


def test_a_foreign_cursor_is_only_a_position_in_the_callers_own_list(cp: CP) -> None:
    """A cursor from another list, another company's list, or the member's page used
    by the owner (and the reverse): the answer is the caller's own list after that
    position, never a row of another company or another member."""
    a, b = Tenant(cp), Tenant(cp)
    tie(cp)
    mine = {
        (id(client), path, tuple(params.items())): walk(client, path, 200, params, key)
        for client, path, params, key in lists(cp, a) + lists(cp, b)
    }
    cursors = []
    for client, path, params, _key in lists(cp, a) + lists(cp, b):
        doc = data_of(client.get(path, params={**params, "limit": 1}))
        if doc["next_cursor"]:
            cursors.append(doc["next_cursor"])
    assert len(cursors) >= 20
    # Each list takes every fourth cursor, in a rotation: each cursor still meets
    # lists of both companies and of other kinds, at a quarter of the product's cost.
    for n, (client, path, params, key) in enumerate(lists(cp, a) + lists(cp, b)):
        own = mine[(id(client), path, tuple(params.items()))]
        for cursor in cursors[n % 4 :: 4]:
            doc = data_of(client.get(path, params={**params, "cursor": cursor, "limit": 200}))
            shown = [item["id"] for item in doc[key]]
            # The tail of the caller's own list (all share a moment: after the id).
            assert shown == own[len(own) - len(shown) :], (path, cursor)


TAMPERED = [
    "!!",
    "%00",
    "a",
    "=" * 8,
    _b64(["2026-11-30T12:00:00Z", "x"])[:-3],  # truncated
    _b64(["seq", 3]),
    _b64(["2026-11-30T12:00:00Z", None]),
    _b64(["2026-11-30T12:00:00Z", ["x"]]),
    _b64(["2026-11-30T12:00:00Z", "x\u0000"]),
    _b64(["9999-12-31T23:59:59.999999-14:00", "x"]),
    _b64(["not a time", "x"]),
    _b64("2026-11-30T12:00:00Z"),
    _b64({"0": "2026-11-30T12:00:00Z", "1": "x"}),
    _b64(None),
    _b64(12),
    base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(),
    "x" * 5000,
]


def test_a_mangled_cursor_is_a_422_on_every_listing(cp: CP) -> None:
    t = Tenant(cp, streams=1)
    sid = t.inits[0]["session_id"]
    targets = [(c, p, q) for c, p, q, _ in lists(cp, t)]
    targets += [
        (t.owner, f"/v1/sessions/{sid}", {}),
        (t.owner, "/v1/usage/summary", {}),
    ]
    for client, path, params in targets:
        for cursor in TAMPERED:
            r = client.get(path, params={**params, "cursor": cursor})
            if path.startswith("/v1/sessions/") or path == "/v1/usage/summary":
                if cursor == _b64(["seq", 3]):
                    assert r.status_code == 200, (path, r.text)
                    continue
            assert "cursor" in error_of(r, 422, "validation_error"), (path, cursor)
        for limit in ("0", "201", "-1", "1.5", "", "99999999999999999999"):
            r = client.get(path, params={**params, "limit": limit})
            assert r.status_code in (200, 422), (path, limit, r.text)
            if limit != "":
                error_of(r, 422, "validation_error")


def test_a_session_continued_during_a_walk_is_shown_once_all_the_same(cp: CP) -> None:
    """Sessions are listed most recently active first, a moment a new turn moves:
    between two pages the owner's session not yet shown and the one just shown are
    continued. The rest of the walk still shows each session that existed when it
    started exactly once, in the order they had then; a new first page shows the
    continued ones first."""
    t = Tenant(cp, streams=2)
    before = walk(t.owner, "/v1/sessions", 200)
    assert len(before) == 6
    callers = (*t.members, t.owner)  # who started each of `t.inits`, in turn
    owner_of = {init["session_id"]: callers[i % 3] for i, init in enumerate(t.inits)}

    def continue_two(page: int) -> None:
        if page == 1:
            for sid in (before[0], before[-1]):  # shown on page 1, and not yet shown
                init = data_of(
                    owner_of[sid].post("/v1/chat/init", json={"query": "again", "session_id": sid}),
                    201,
                )
                assert cp.webhook(usage_event(init, t.company_id)).status_code == 200

    seen = walk(t.owner, "/v1/sessions", 2, between=continue_two)
    assert seen == before
    assert walk(t.owner, "/v1/sessions", 200)[:2] == [before[-1], before[0]]


def test_a_usage_summary_walk_shows_each_group_once_while_streams_settle(cp: CP) -> None:
    """The summary by user, top spenders first, walked one group a page: between two
    pages the last user outspends the rest, and a new user's stream settles. The
    walk is the summary as it stood when it began: every user once, none twice,
    their totals unchanged."""
    t = Tenant(cp, streams=1)
    params = {"group_by": "user", "order": "cost"}
    whole = data_of(t.owner.get("/v1/usage/summary", params={**params, "limit": 200}))["items"]
    assert len(whole) == 3
    late = cp.user(t.company_id, role="member")["id"]
    late_client = cp.client(cp.api_key(late))

    def spend(page: int) -> None:
        if page == 1:
            last = whole[-1]["user_id"]
            member = t.members[t.member_ids.index(last)] if last in t.member_ids else t.owner
            for client in (member, late_client):
                init = data_of(client.post("/v1/chat/init", json={"query": "more"}), 201)
                event = usage_event(init, t.company_id, output_tokens=5000)
                assert cp.webhook(event).status_code == 200

    seen: list[dict[str, Any]] = []
    cursor = None
    for page in range(1, 10):
        query: dict[str, Any] = {**params, "limit": 1}
        if cursor is not None:
            query["cursor"] = cursor
        doc = data_of(t.owner.get("/v1/usage/summary", params=query))
        seen += doc["items"]
        cursor = doc["next_cursor"]
        if cursor is None:
            break
        spend(page)
    assert seen == whole


# --- forged walk cursors: type-checked positions, never a 500, never a scope -------


def _raw(json_text: str) -> str:
    """A cursor of JSON text as given (a number orjson would not write, such as 2^70)."""
    return base64.urlsafe_b64encode(json_text.encode()).decode().rstrip("=")


def _ago(**delta: float) -> str:
    return (datetime.now(UTC) - timedelta(**delta)).isoformat()


def test_a_forged_usage_summary_cursor_is_a_422_or_a_page_never_a_500(cp: CP) -> None:
    """The summary's cursor is (walk start, last group's cost, its keys), all read from
    the client: each is checked before it reaches SQL. A wrong count or type, a cost
    no column holds, a key no id is, a walk moment at the calendar's ends (its default
    days overflowed) or older than a walk may last is a 422; a well-typed position is
    only a place in the caller's own summary."""
    t = Tenant(cp, streams=1)
    params = {"group_by": "user", "order": "cost"}
    mine = {
        item["user_id"]
        for item in data_of(t.owner.get("/v1/usage/summary", params=params))["items"]
    }
    now = _ago(seconds=0)
    refused = [
        _b64(["sum", now, 0, []]),  # fewer keys than `group_by`
        _b64(["sum", now, 0, ["a", "b"]]),  # more
        _b64(["sum", now, 0, "a"]),
        _b64(["sum", now, 0, [1]]),  # a key that is not text
        _b64(["sum", now, 0, [True]]),
        _b64(["sum", now, 0, [["a"]]]),
        _b64(["sum", now, 0, [{"a": 1}]]),
        _b64(["sum", now, 0, ["a\u0000b"]]),
        _b64(["sum", now, 0, ["k" * 600]]),
        _b64(["sum", now, True, ["a"]]),  # a cost that is not a count of micro-credits
        _b64(["sum", now, -1, ["a"]]),
        _b64(["sum", now, 2**63, ["a"]]),
        _raw(f'["sum", "{now}", 1180591620717411303424, ["a"]]'),  # 2^70
        _b64(["sum", now, 1.5, ["a"]]),
        _b64(["sum", now, "10", ["a"]]),
        _b64(["sum", now, None, ["a"]]),
        _b64(["sum", "0001-01-01T00:00:00+00:00", 0, ["a"]]),  # the calendar's ends
        _b64(["sum", "9999-12-31T23:59:59+00:00", 0, ["a"]]),
        _b64(["sum", "0001-01-01T00:00:00+14:00", 0, ["a"]]),
        _b64(["sum", "2026-11-30T12:00:00", 0, ["a"]]),  # naive
        _b64(["sum", True, 0, ["a"]]),
        _b64(["sum", _ago(hours=2), 0, ["a"]]),  # a walk begun too long ago
        _b64(["sum", _ago(days=-1), 0, ["a"]]),  # one not begun yet
        _b64(["sum", now, 0, ["a"], "extra"]),
        _b64(["other", now, 0, ["a"]]),
    ]
    for cursor in refused:
        r = t.owner.get("/v1/usage/summary", params={**params, "cursor": cursor})
        assert "cursor" in error_of(r, 422, "validation_error"), cursor
    shown = [
        _b64(["sum", now, 0, ["k" * 512]]),
        _b64(["sum", now, 2**63 - 1, [""]]),
        _b64(["sum", now, 2**63 - 1, [None]]),  # a group without the key (an API key)
        _b64(["sum", _ago(minutes=30), 0, ["a"]]),
        _b64(["sum", _ago(minutes=-1), 0, ["a"]]),  # a clock a minute ahead
    ]
    for cursor in shown:
        doc = data_of(t.owner.get("/v1/usage/summary", params={**params, "cursor": cursor}))
        assert {item["user_id"] for item in doc["items"]} <= mine, cursor


def test_another_companys_usage_summary_cursor_shows_only_the_callers_groups(cp: CP) -> None:
    """A cursor is a position, never a scope: one from another company's summary (its
    users' ids as keys) walks the caller's own groups after that position."""
    a, b = Tenant(cp, streams=1), Tenant(cp, streams=2)
    for params in ({"group_by": "user", "order": "cost"}, {"group_by": "user,model"}):
        whole = data_of(a.owner.get("/v1/usage/summary", params={**params, "limit": 200}))
        mine = [orjson.dumps(item) for item in whole["items"]]
        theirs = data_of(b.owner.get("/v1/usage/summary", params={**params, "limit": 1}))
        assert theirs["next_cursor"] is not None
        doc = data_of(
            a.owner.get("/v1/usage/summary", params={**params, "cursor": theirs["next_cursor"]})
        )
        shown = [orjson.dumps(item) for item in doc["items"]]
        assert shown == mine[len(mine) - len(shown) :], params  # a tail of the caller's own
        assert {item["user_id"] for item in doc["items"]}.isdisjoint(b.member_ids)
    other_keys = data_of(b.owner.get("/v1/usage/summary", params={"group_by": "user", "limit": 1}))
    r = a.owner.get(
        "/v1/usage/summary",
        params={"group_by": "user,model", "cursor": other_keys["next_cursor"]},
    )
    assert "cursor" in error_of(r, 422, "validation_error")


def test_a_sessions_cursor_whose_walk_moment_is_forged_is_a_422(cp: CP) -> None:
    """The sessions cursor carries the moment its walk began (`as_of`), which orders
    the pages. Not a moment, or one at the calendar's ends, is a 422; so is one more
    than an hour old (a forged old one sent most sessions through the slower
    "continued" query: its cost grew with every session of the company, 4.8 ms a
    page of 2,000 sessions read as of now against 17.8 ms as of two hours ago) or
    ahead of the clock past a small skew, each saying to start the walk again."""
    t = Tenant(cp, streams=1)
    first = data_of(t.owner.get("/v1/sessions", params={"limit": 1}))
    moment, row_id, _as_of = orjson.loads(
        base64.urlsafe_b64decode(first["next_cursor"] + "=" * (-len(first["next_cursor"]) % 4))
    )
    mine = walk(t.owner, "/v1/sessions", 200)

    def cursor(as_of: Any) -> str:
        return _b64([moment, row_id, as_of])

    refused = [
        cursor("x"),
        cursor("NaN"),
        cursor(True),
        cursor(None),
        cursor(-1),
        cursor(1.5),
        cursor(["2026-11-30T12:00:00+00:00"]),
        _raw(f'["{moment}", "{row_id}", 1180591620717411303424]'),  # 2^70
        cursor("2026-11-30T12:00:00"),  # naive
        cursor("0001-01-01T00:00:00+14:00"),
        cursor("0001-01-01T00:00:00+00:00"),
        cursor("9999-12-31T23:59:59+00:00"),
        cursor(_ago(hours=2)),
        cursor(_ago(days=-1)),
        _b64([moment, row_id, _ago(seconds=0), "extra"]),
    ]
    for forged in refused:
        message = error_of(
            t.owner.get("/v1/sessions", params={"cursor": forged}), 422, "validation_error"
        )
        assert "cursor" in message, forged
    assert "start" in error_of(
        t.owner.get("/v1/sessions", params={"cursor": cursor(_ago(hours=2))}),
        422,
        "validation_error",
    )
    # Within the window, a page as of then: sessions created since wait for a new walk.
    for as_of, shown in ((_ago(minutes=30), []), (_ago(minutes=-1), mine[1:])):
        doc = data_of(t.owner.get("/v1/sessions", params={"cursor": cursor(as_of), "limit": 200}))
        assert [item["id"] for item in doc["items"]] == shown, as_of
