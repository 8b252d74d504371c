"""Keyset pagination for every listing (DESIGN §11: ``?limit=`` default 50, max
200; ``?cursor=`` a previous answer's ``next_cursor``).

A page is read newest first by a (moment, id) pair, and `limit + 1` rows are
fetched: the extra row is never shown, it only says another page exists. Keyset
rather than OFFSET, so a deep page costs what the first one does and rows written
meanwhile neither repeat nor go missing on the pages still to come. Where the
moment itself moves (chat sessions, listed by `updated_at`, which a new turn
moves ahead of the cursor), the cursor also carries the moment its walk began
(`PageRequest.as_of`) and the listing orders every page as things stood then
(`chat_sessions.list_sessions`); `test_pagination_walks.py` checks both.

A cursor is only a position: every listing still filters by its caller, so one
from another company's list, or forged, shows nothing but the caller's own rows.

Apart from `read_page`, which runs the statement it builds on the session it is
given, everything here is pure: the cursor codec, the statement, the cut.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

import orjson
from sqlalchemy import ColumnElement, Select, and_, or_, select, union_all
from sqlalchemy.orm import Mapped, QueryableAttribute, Session, aliased

from control_plane.errors import ValidationFailed
from control_plane.validation import NUL, page_limit

T = TypeVar("T")

Cursor = tuple[datetime, str]
"""The last row a page showed: its moment (``created_at`` or ``updated_at``) and id."""

_NOT_OURS = "is not a cursor this API returned"


def _b64(doc: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(doc)).decode("ascii").rstrip("=")


def _unb64(raw: str) -> Any:
    return orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))


def encode_cursor(moment: datetime, row_id: str, as_of: datetime | None = None) -> str:
    doc = [moment.isoformat(), row_id]
    return _b64(doc if as_of is None else [*doc, as_of.isoformat()])


def _utc_moment(raw: Any) -> datetime:
    """A cursor's ISO moment, in UTC; ValueError (or another the callers catch) when
    it is not one."""
    moment = datetime.fromisoformat(raw)
    if moment.tzinfo is None:
        raise ValueError
    # In UTC here, as the columns hold it: an offset that moves the moment past
    # year 1 or 9999 (a forged cursor) is then a 422, not an OverflowError when
    # the moment is bound to the query.
    return moment.astimezone(UTC)


_BAD_CURSOR = (
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    OverflowError,
    binascii.Error,
    orjson.JSONDecodeError,
)


def decode_cursor(raw: str | None) -> Cursor | None:
    """The (moment, id) position a `next_cursor` stands for; 422 when mangled."""
    if raw is None or raw == "":
        return None
    try:
        doc = _unb64(raw)
        moment = _utc_moment(doc[0])
        row_id = doc[1]
        if not isinstance(row_id, str) or NUL in row_id:
            raise ValueError
    except _BAD_CURSOR:
        raise ValidationFailed("cursor", _NOT_OURS) from None
    return moment, row_id


def decode_as_of(raw: str | None) -> datetime | None:
    """The moment a walk began, when its cursor carries one (a third element);
    422 when that element is there but not a moment."""
    if raw is None or raw == "":
        return None
    try:
        doc = _unb64(raw)
        if isinstance(doc, list) and len(doc) > 3:
            raise ValueError
        return _utc_moment(doc[2]) if isinstance(doc, list) and len(doc) > 2 else None
    except _BAD_CURSOR:
        raise ValidationFailed("cursor", _NOT_OURS) from None


# How long a walk may last, and how far ahead of this clock another process's may
# be. A walk's moment comes back from the client: a forged one far back sent every
# session active since through the listing's slower query (its cost grew with the
# company's sessions), and one at the calendar's ends overflowed the summary's days.
WALK_MAX_AGE = timedelta(hours=1)
CLOCK_SKEW = timedelta(minutes=5)


def walk_began(as_of: datetime | None, now: datetime) -> datetime:
    """The moment a walk reads as of: its cursor's, else `now` (a first page); 422
    when that moment is over `WALK_MAX_AGE` old or ahead of `now` past `CLOCK_SKEW`."""
    if as_of is None:
        return now
    if as_of < now - WALK_MAX_AGE or as_of > now + CLOCK_SKEW:
        raise ValidationFailed(
            "cursor", "is of a walk begun over an hour ago (or ahead of this clock); start again"
        )
    return as_of


SEQ_CURSOR = "seq"
# A position is a message's `seq` or a summary's row offset: both within PostgreSQL's
# `integer`, which a forged larger one overflowed as it was bound (a 500, review 5).
MAX_SEQ = 2**31 - 1


def encode_seq_cursor(seq: int) -> str:
    """A position in a list ordered by an integer (a session's messages, a summary's rows)."""
    return _b64([SEQ_CURSOR, seq])


def decode_seq_cursor(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    try:
        doc = _unb64(raw)
        if not isinstance(doc, list) or len(doc) != 2 or doc[0] != SEQ_CURSOR:
            raise ValueError
        seq = doc[1]
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
            raise ValueError
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise ValidationFailed("cursor", _NOT_OURS) from None
    return seq


@dataclass(frozen=True)
class PageRequest:
    """What a listing's query asks for: how many rows, after which one, and (for a
    listing whose order moves, read as of a moment) when its walk began."""

    limit: int
    after: Cursor | None = None
    as_of: datetime | None = None


def page_request(query: Mapping[str, str]) -> PageRequest:
    """``?limit=`` and ``?cursor=`` from a query string (422 naming the bad one)."""
    raw = query.get("cursor")
    return PageRequest(page_limit(query.get("limit")), decode_cursor(raw), decode_as_of(raw))


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None

    def public(self, shape: Callable[[T], Any]) -> dict[str, Any]:
        """The listing's answer: ``{"items", "next_cursor"}``."""
        return {"items": [shape(item) for item in self.items], "next_cursor": self.next_cursor}


def newest_first(
    stmt: Select[Any],
    moment: Mapped[datetime] | ColumnElement[datetime],
    row_id: Mapped[str],
    req: PageRequest,
) -> Select[Any]:
    """`stmt` narrowed to the rows after `req.after`, newest first, `limit + 1` of them.
    The id breaks ties between rows written in the same microsecond."""
    if req.after is not None:
        last_moment, last_id = req.after
        stmt = stmt.where(
            # The bound an index on the moment seeks to: PostgreSQL makes none of the
            # OR below, and walked every newer row to reach a deep page (an owner's
            # ledger at 450,000 entries down: 0.3 to 0.6 s a page, measured).
            moment <= last_moment,
            or_(moment < last_moment, and_(moment == last_moment, row_id < last_id)),
        )
    return stmt.order_by(moment.desc(), row_id.desc()).limit(req.limit + 1)


def cut(
    rows: Sequence[T],
    req: PageRequest,
    moment: Mapped[datetime],
    row_id: Mapped[str],
) -> Page[T]:
    """The page `limit + 1` rows make: at most `limit` of them, and a cursor at the
    last one shown when the extra row proves there is more."""
    items = list(rows[: req.limit])
    if len(rows) <= req.limit:
        return Page(items, None)
    last = items[-1]
    return Page(items, encode_cursor(getattr(last, _name(moment)), getattr(last, _name(row_id))))


def merged_page(placed: Sequence[tuple[T, datetime]], req: PageRequest, as_of: datetime) -> Page[T]:
    """The page of rows placed by a moment other than a column of theirs (each
    `(row, moment)`, `limit + 1` after the cursor from each of a listing's parts),
    newest first, id breaking ties; its cursor carries `as_of` for the next page."""
    ordered = sorted(placed, key=lambda pair: (pair[1], _id_of(pair[0])), reverse=True)
    items = [row for row, _ in ordered[: req.limit]]
    if len(ordered) <= req.limit:
        return Page(items, None)
    row, moment = ordered[req.limit - 1]
    return Page(items, encode_cursor(moment, _id_of(row), as_of))


def _id_of(row: Any) -> str:
    return str(row.id)


def _name(column: Mapped[Any]) -> str:
    """The attribute a mapped column is read through on its rows."""
    assert isinstance(column, QueryableAttribute)  # what `sqlmodel.col` hands over
    return column.key


def read_page(
    session: Session,
    stmt: Select[T],
    moment: Mapped[datetime],
    row_id: Mapped[str],
    req: PageRequest,
) -> Page[T]:
    """One page of `stmt`'s rows, newest first by (`moment`, `row_id`)."""
    rows = session.scalars(newest_first(stmt, moment, row_id, req)).all()
    return cut(rows, req, moment, row_id)


def read_merged_page(
    session: Session,
    model: type[T],
    branches: Sequence[Select[T]],
    moment: Mapped[datetime],
    row_id: Mapped[str],
    req: PageRequest,
) -> Page[T]:
    """One page of the union of `branches` (statements on `model`'s rows that never
    share a row), newest first: each branch stops at its own `limit + 1` rows after
    the cursor (an index range each), and the page is the newest of those. One
    statement whose OR spans both ranges would have to read every row of the wider
    one to find the newest."""
    parts = [select(newest_first(b, moment, row_id, req).subquery()) for b in branches]
    merged = aliased(model, union_all(*parts).subquery())
    newest = newest_first(
        select(merged), getattr(merged, _name(moment)), getattr(merged, _name(row_id)),
        PageRequest(req.limit),
    )  # fmt: skip
    return cut(session.scalars(newest).all(), req, moment, row_id)


SUMMARY_CURSOR = "sum"
_KEY_MAX = 512
_MICRO_MAX = 2**63 - 1


def encode_summary_cursor(as_of: datetime, cost_micro: int, keys: Sequence[str | None]) -> str:
    """A position in a usage summary read as of `as_of`: its last group's cost and keys."""
    return _b64([SUMMARY_CURSOR, as_of.isoformat(), cost_micro, list(keys)])


def decode_summary_cursor(
    raw: str | None, key_count: int
) -> tuple[int, datetime | None, int, tuple[str | None, ...]] | None:
    """(offset, as_of, cost, keys) of a summary cursor: an old one (a row offset,
    still honoured) or a position; 422 when mangled or not of this query's keys."""
    if raw is None or raw == "":
        return None
    try:
        doc = _unb64(raw)
        if isinstance(doc, list) and doc[:1] == [SEQ_CURSOR]:
            return decode_seq_cursor(raw) or 0, None, 0, ()
        if not isinstance(doc, list) or len(doc) != 4 or doc[0] != SUMMARY_CURSOR:
            raise ValueError
        as_of, cost, keys = _utc_moment(doc[1]), doc[2], doc[3]
        if isinstance(cost, bool) or not isinstance(cost, int) or not 0 <= cost <= _MICRO_MAX:
            raise ValueError
        if not isinstance(keys, list) or len(keys) != key_count:
            raise ValueError
        for key in keys:
            if key is not None and (not isinstance(key, str) or NUL in key or len(key) > _KEY_MAX):
                raise ValueError
    except _BAD_CURSOR:
        raise ValidationFailed("cursor", _NOT_OURS) from None
    return 0, as_of, cost, tuple(keys)


# A company's own small listings (budgets, teams, agents, providers) keep the order
# they always had, by a key unique within the company (a name, an id), and page by
# it: `?cursor=` is the last key shown. Each is capped (10,000 budgets, 1,000 teams
# of up to 1,000 members, 200 agents): a page of them all was up to ~1 MB and a
# client reading §9 found no `next_cursor` to follow.
KEY_CURSOR = "key"


@dataclass(frozen=True)
class KeyPageRequest:
    limit: int
    after: str | None = None


def encode_key_cursor(key: str) -> str:
    return _b64([KEY_CURSOR, key])


def decode_key_cursor(raw: str | None) -> str | None:
    if raw is None or raw == "":
        return None
    try:
        doc = _unb64(raw)
        if not isinstance(doc, list) or len(doc) != 2 or doc[0] != KEY_CURSOR:
            raise ValueError
        key = doc[1]
        if not isinstance(key, str) or not 0 < len(key) <= _KEY_MAX or NUL in key:
            raise ValueError
    except _BAD_CURSOR:
        raise ValidationFailed("cursor", _NOT_OURS) from None
    return key


def key_page_request(query: Mapping[str, str]) -> KeyPageRequest:
    """``?limit=`` and ``?cursor=`` of a key-ordered listing (422 naming the bad one)."""
    return KeyPageRequest(page_limit(query.get("limit")), decode_key_cursor(query.get("cursor")))


def _key_cut(rows: Sequence[T], key: Callable[[T], str], limit: int) -> Page[T]:
    items = list(rows[:limit])
    return Page(items, encode_key_cursor(key(items[-1])) if len(rows) > limit else None)


def key_page(items: Sequence[T], key: Callable[[T], str], req: KeyPageRequest) -> Page[T]:
    """The page of a list held in memory, after the cursor in ascending `key` order
    (compared here, so the order is Python's, not a database collation's)."""
    ordered = sorted(items, key=key)
    return _key_cut([i for i in ordered if req.after is None or key(i) > req.after], key, req.limit)


def read_key_page(
    session: Session, stmt: Select[T], key: Mapped[str], req: KeyPageRequest
) -> Page[T]:
    """One page of `stmt`'s rows in ascending `key` order (the database compares and
    orders, under one collation), `limit + 1` fetched."""
    if req.after is not None:
        stmt = stmt.where(key > req.after)
    rows = session.scalars(stmt.order_by(key).limit(req.limit + 1)).all()
    name = _name(key)
    return _key_cut(rows, lambda row: str(getattr(row, name)), req.limit)
