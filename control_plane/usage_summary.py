"""Aggregates over usage records for the console (DESIGN §11), computed in SQL.

* `summary`: streams, tokens and cost grouped by any of day, model, user, API key
  (and company, across companies, for the platform admin), ordered by the keys or
  by cost (the "top users / keys" lists).
* `ttft`: time to first token p50 / p95 per model, nearest-rank percentiles from
  window functions (``row_number`` / ``count`` over the model), integer arithmetic
  only, so SQLite and PostgreSQL give the same numbers without ``percentile_cont``.

The query parameters are parsed by pure functions (`parse_query`); the SQL runs
in the caller's session. A day is a UTC calendar day.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, or_, select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane.errors import ValidationFailed
from control_plane.tables import ApiKey, UsageRecord, User
from control_plane.validation import parse_day
from shared.pricing import format_credits

GROUP_KEYS = ("day", "model", "user", "api_key", "company")
ORDERS = ("keys", "cost")
DEFAULT_DAYS = 30
MAX_DAYS = 366
PERCENTILES = (50, 95)


@dataclass(frozen=True, slots=True)
class SummaryQuery:
    group_by: tuple[str, ...]
    start: date  # inclusive
    end: date  # inclusive
    order: str = "keys"

    @property
    def since(self) -> datetime:
        return datetime.combine(self.start, time(), tzinfo=UTC)

    @property
    def until(self) -> datetime:
        """Exclusive upper bound: the start of the day after `end`."""
        return datetime.combine(self.end + timedelta(days=1), time(), tzinfo=UTC)


def parse_range(raw_from: str | None, raw_to: str | None, today: date) -> tuple[date, date]:
    """`from`..`to` inclusive; defaults: the last 30 days up to today (UTC)."""
    end = parse_day(raw_to, "to") or today
    start = parse_day(raw_from, "from") or end - timedelta(days=DEFAULT_DAYS - 1)
    if start > end:
        raise ValidationFailed("from", "must not be after to")
    if (end - start).days >= MAX_DAYS:
        raise ValidationFailed("from", f"the range may span at most {MAX_DAYS} days")
    return start, end


def parse_group_by(raw: str | None, *, across_companies: bool) -> tuple[str, ...]:
    if raw is None or raw == "":
        return ()
    keys = tuple(part.strip() for part in raw.split(","))
    allowed = GROUP_KEYS if across_companies else GROUP_KEYS[:-1]
    for key in keys:
        if key not in allowed:
            raise ValidationFailed("group_by", f"must be a list of {', '.join(allowed)}")
    if len(set(keys)) != len(keys):
        raise ValidationFailed("group_by", "names a key twice")
    return keys


def parse_query(params: dict[str, str], today: date, *, across_companies: bool) -> SummaryQuery:
    group_by = parse_group_by(params.get("group_by"), across_companies=across_companies)
    start, end = parse_range(params.get("from"), params.get("to"), today)
    order = params.get("order") or "keys"
    if order not in ORDERS:
        raise ValidationFailed("order", f"must be one of {', '.join(ORDERS)}")
    return SummaryQuery(group_by=group_by, start=start, end=end, order=order)


def _day(dialect: str) -> ColumnElement[Any]:
    """The record's UTC day as text YYYY-MM-DD. SQLite stores the naive UTC text
    (`tables.UTCDateTime`); PostgreSQL a timestamptz, read in UTC."""
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", col(UsageRecord.created_at)), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", col(UsageRecord.created_at))


def _in_scope(
    query: SummaryQuery, company_id: str | None, as_of: datetime | None = None
) -> list[ColumnElement[bool]]:
    where = [
        col(UsageRecord.created_at) >= query.since,
        col(UsageRecord.created_at) < query.until,
    ]
    if as_of is not None:
        where.append(col(UsageRecord.created_at) <= as_of)
    if company_id is not None:
        where.append(col(UsageRecord.company_id) == company_id)
    return where


@dataclass(frozen=True, slots=True)
class After:
    """Where a summary page ends: the last group's cost (micro-credits) and keys,
    in `group_by`'s order (None for a key a record lacks, such as an API key)."""

    cost_micro: int
    keys: tuple[str | None, ...]


def _after(parts: list[tuple[ColumnElement[Any], Any, bool]]) -> ColumnElement[bool]:
    """Rows after a position in a lexicographic order of (expression, value,
    descending) parts: the first part that differs decides."""
    clauses = []
    for i, (expr, value, descending) in enumerate(parts):
        equal = [e == v for e, v, _ in parts[:i]]
        clauses.append(and_(*equal, expr < value if descending else expr > value))
    return or_(*clauses)


def summary(
    session: Session,
    query: SummaryQuery,
    company_id: str | None,
    limit: int,
    offset: int = 0,
    after: After | None = None,
    as_of: datetime | None = None,
) -> list[tuple[dict[str, Any], After]]:
    """One item per group (a single item without `group_by`), each with its position,
    `limit + 1` of them after `after` (or from `offset`, the old cursors' way) so the
    caller sees whether more exist. Only records written by `as_of` count: a walk
    reads the summary as it stood when it began, so groups neither move nor change
    between its pages. `company_id` None: every company (platform admin only; the
    caller checks)."""
    dialect = session.get_bind().dialect.name
    columns: dict[str, ColumnElement[Any]] = {
        "day": _day(dialect).label("day"),
        "model": col(UsageRecord.model).label("model"),
        "user": col(UsageRecord.user_id).label("user_id"),
        "api_key": col(UsageRecord.api_key_id).label("api_key_id"),
        "company": col(UsageRecord.company_id).label("company_id"),
    }
    keys = [columns[k] for k in query.group_by]
    cost = func.coalesce(func.sum(col(UsageRecord.cost_micro)), 0)
    stmt = select(
        *keys,
        func.count().label("streams"),
        func.coalesce(func.sum(col(UsageRecord.input_tokens)), 0).label("input_tokens"),
        func.coalesce(func.sum(col(UsageRecord.output_tokens)), 0).label("output_tokens"),
        cost.label("cost_micro"),
    ).where(*_in_scope(query, company_id, as_of))
    if keys:
        stmt = stmt.group_by(*keys)
        # Each key as (is it missing, its text): one order in SQLite and PostgreSQL
        # (which put NULL at opposite ends), and a position a cursor can compare to.
        parts: list[tuple[ColumnElement[Any], Any, bool]] = []
        for i, key in enumerate(keys):
            element = key.element
            value = after.keys[i] if after is not None else None
            parts.append((case((element.is_(None), 1), else_=0), int(value is None), False))
            parts.append((func.coalesce(element, ""), value or "", False))
        if query.order == "cost":
            parts.insert(0, (cost, after.cost_micro if after is not None else 0, True))
        stmt = stmt.order_by(*(e.desc() if d else e for e, _, d in parts))
        if after is not None:
            stmt = stmt.having(_after(parts))
    rows = session.execute(stmt.offset(offset).limit(limit + 1)).mappings().all()
    items = [_item(row, query.group_by) for row in rows]
    return [
        (item, After(int(row["cost_micro"]), tuple(row[k.name] for k in keys)))
        for item, row in zip(items, rows, strict=True)
    ]


def _item(row: Any, group_by: tuple[str, ...]) -> dict[str, Any]:
    item: dict[str, Any] = {}
    for key in group_by:
        name = {"user": "user_id", "api_key": "api_key_id", "company": "company_id"}.get(key, key)
        item[name] = row[name]
    item.update(
        streams=int(row["streams"]),
        input_tokens=int(row["input_tokens"]),
        output_tokens=int(row["output_tokens"]),
        cost=format_credits(int(row["cost_micro"])),
    )
    return item


def labels(session: Session, items: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """What a person reads for the items' ids: users' emails, keys' prefixes (both
    within the caller's scope: the records are). Beside the items, not in them: an
    item holds only its grouped keys and totals (DESIGN §11)."""
    found: dict[str, dict[str, str]] = {}
    user_ids = {i["user_id"] for i in items if i.get("user_id")}
    if user_ids:
        rows = session.execute(
            select(col(User.id), col(User.email)).where(col(User.id).in_(user_ids))
        )
        found["user_id"] = {str(user_id): str(email) for user_id, email in rows}
    key_ids = {i["api_key_id"] for i in items if i.get("api_key_id")}
    if key_ids:
        rows = session.execute(
            select(col(ApiKey.id), col(ApiKey.prefix)).where(col(ApiKey.id).in_(key_ids))
        )
        found["api_key_id"] = {str(key_id): str(prefix) for key_id, prefix in rows}
    return found


def ttft(session: Session, query: SummaryQuery, company_id: str | None) -> list[dict[str, Any]]:
    """Per model: streams with a measured TTFT and its p50 / p95 in milliseconds
    (nearest rank: the smallest value with at least p% of the values at or below)."""
    ranked = (
        select(
            col(UsageRecord.model).label("model"),
            col(UsageRecord.ttft_ms).label("ttft_ms"),
            func.row_number()
            .over(partition_by=col(UsageRecord.model), order_by=col(UsageRecord.ttft_ms))
            .label("rn"),
            func.count().over(partition_by=col(UsageRecord.model)).label("n"),
        )
        .where(*_in_scope(query, company_id), col(UsageRecord.ttft_ms).is_not(None))
        .subquery()
    )
    percentiles = [
        func.min(case((ranked.c.rn * 100 >= ranked.c.n * p, ranked.c.ttft_ms))).label(f"p{p}_ms")
        for p in PERCENTILES
    ]
    stmt = (
        select(ranked.c.model, func.count().label("streams"), *percentiles)
        .group_by(ranked.c.model)
        .order_by(ranked.c.model)
    )
    return [
        {
            "model": row["model"],
            "streams": int(row["streams"]),
            **{f"p{p}_ms": int(row[f"p{p}_ms"]) for p in PERCENTILES},
        }
        for row in session.execute(stmt).mappings()
    ]
