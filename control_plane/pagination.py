"""Keyset pagination for every listing (DESIGN §11: ``?limit=`` default 50, max
200; ``?cursor=`` a previous answer's ``next_cursor``).

A page is read newest first by a (moment, id) pair, and `limit + 1` rows are
fetched: the extra row is never shown, it only says another page exists. Keyset
rather than OFFSET, so a deep page costs what the first one does and rows written
meanwhile neither repeat nor go missing on the pages still to come. Except where
the moment itself moves: chat sessions are listed by `updated_at`, so one continued
during a walk jumps ahead of the cursor and shows on a new first page, not on the
rest of that walk (`test_pagination_walks.py` checks the rest).

Apart from `read_page`, which runs the statement it builds on the session it is
given, everything here is pure: the cursor codec, the statement, the cut.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import orjson
from sqlalchemy import Select, and_, or_, select, union_all
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


def encode_cursor(moment: datetime, row_id: str) -> str:
    return _b64([moment.isoformat(), row_id])


def decode_cursor(raw: str | None) -> Cursor | None:
    """The (moment, id) position a `next_cursor` stands for; 422 when mangled."""
    if raw is None or raw == "":
        return None
    try:
        doc = _unb64(raw)
        moment = datetime.fromisoformat(doc[0])
        row_id = doc[1]
        if moment.tzinfo is None or not isinstance(row_id, str) or NUL in row_id:
            raise ValueError
        # In UTC here, as the columns hold it: an offset that moves the moment past
        # year 1 or 9999 (a forged cursor) is then a 422, not an OverflowError when
        # the moment is bound to the query.
        moment = moment.astimezone(UTC)
    except (
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        OverflowError,
        binascii.Error,
        orjson.JSONDecodeError,
    ):
        raise ValidationFailed("cursor", _NOT_OURS) from None
    return moment, row_id


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
    """What a listing's query asks for: how many rows, and after which one."""

    limit: int
    after: Cursor | None = None


def page_request(query: Mapping[str, str]) -> PageRequest:
    """``?limit=`` and ``?cursor=`` from a query string (422 naming the bad one)."""
    return PageRequest(page_limit(query.get("limit")), decode_cursor(query.get("cursor")))


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None

    def public(self, shape: Callable[[T], Any]) -> dict[str, Any]:
        """The listing's answer: ``{"items", "next_cursor"}``."""
        return {"items": [shape(item) for item in self.items], "next_cursor": self.next_cursor}


def newest_first(
    stmt: Select[T],
    moment: Mapped[datetime],
    row_id: Mapped[str],
    req: PageRequest,
) -> Select[T]:
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
