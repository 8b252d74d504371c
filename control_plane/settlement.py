"""Usage → settlement, exactly once (DESIGN §7, §9), a batch at a time (issue 14.2).

`settle_usages` is the one settlement path, shared by the webhooks
(`webhook_settlement`) and the reconciliation sweeper: price each usage (DESIGN §9
"What is billed", capped at the hold), flip the reservations from ``active`` to
``settled`` with one conditional UPDATE, move the money, write the ledger rows,
their audit events and the usage records, all in the caller's transaction
(`ledger.settle_reservations`). One reservation (`settle_usage`, the sweeper's) is a
batch of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy import Table, bindparam, exists, select
from sqlalchemy.orm import Session

from control_plane import hot_statements, raw_pg, tpm
from control_plane.hot_statements import table_of
from control_plane.ledger import (
    AlsoRows,
    Held,
    Settled,
    ToSettle,
    charge_for,
    reservation_price,
    settle_reservations,
)
from control_plane.reservation_row import ReservationTerms
from control_plane.tables import ReservationBudget, new_id
from shared.catalog import Price
from shared.webhooks import USAGE_DETAILS


@dataclass(frozen=True, slots=True)
class Usage:
    """What a stream used, from a webhook or the edge's last checkpoint."""

    status: str
    input_tokens: int
    output_tokens: int
    usage_source: str
    finish_reason: str | None = None
    ttft_ms: int | None = None  # time to first token, when the sender measured it
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    duplicate: bool
    charged_micro: int = 0
    released_micro: int = 0
    # For the tokens-per-minute correction (`tpm.correct`): who, the hold's token
    # estimate, when it was counted (the init's instant on the store's clock, which
    # its reservation's id carries: `tpm.counted_at`; None for an older id).
    user_id: str = ""
    held_tokens: int = 0
    held_at: float | None = None


DUPLICATE = Outcome(duplicate=True)


@dataclass(frozen=True, slots=True)
class HeldRow(ReservationTerms):
    """A reservation's values as a settlement batch reads them (`ledger.Held`):
    plain values from one SELECT, no ORM object, identity map or events.
    `budgeted`: whether init counted its hold against any budget (its
    ``reservation_budgets`` rows, written with the reservation and never after), so
    that settling a company without budgets skips the budgets' SELECT."""

    created_at: datetime
    api_key_id: str | None
    fallbacks: list[dict[str, str]] | None
    budgeted: bool = True


_RESERVATIONS = hot_statements.RESERVATIONS
_COUNTED = table_of(ReservationBudget)
_HELD_COLUMNS = [name for name in HeldRow.__dataclass_fields__ if name != "budgeted"]
_HELD = select(
    *(_RESERVATIONS.c[name] for name in _HELD_COLUMNS),
    exists().where(_COUNTED.c.reservation_id == _RESERVATIONS.c.id).label("budgeted"),
).where(_RESERVATIONS.c.id.in_(bindparam("p_ids", expanding=True)))
# PostgreSQL: the same SELECT as psycopg SQL, the ids as one binary array.
_HELD_PG = (
    f"SELECT {', '.join(f'r.{name}' for name in _HELD_COLUMNS)}, "
    "EXISTS (SELECT 1 FROM reservation_budgets AS b WHERE b.reservation_id = r.id) "
    "FROM reservations AS r WHERE r.id = ANY(CAST(%(ids)b AS varchar[]))"
)
_HELD_ONE_PG = raw_pg.substituted(
    _HELD_PG, "ANY(CAST(%(ids)b AS varchar[]))", "CAST(%(ids)s AS varchar)"
)  # a lone delivery's: a scalar (`settle_statements.SCALAR_ROWS`)
_CREATED_AT = _HELD_COLUMNS.index("created_at")


def _lock_waits_bounded(sql: str) -> str:
    """`sql` that also bounds the row-lock waits of the rest of its transaction
    (``lock_timeout``, as ``SET LOCAL`` does), with no round trip of its own: the
    setting is made once, before the first row (a materialized CTE joined to every
    row). With no row found there is nothing to settle, nor lock to wait for."""
    bound = "WITH bound AS MATERIALIZED (SELECT set_config('lock_timeout', %(lock_ms)s, true)) "
    return bound + raw_pg.substituted(
        sql, "FROM reservations AS r", "FROM bound, reservations AS r"
    )


_HELD_BOUNDED_PG = _lock_waits_bounded(_HELD_PG)
_HELD_ONE_BOUNDED_PG = _lock_waits_bounded(_HELD_ONE_PG)


def held_rows(
    on: Session | psycopg.Connection[Any], ids: Sequence[str], *, lock_wait: float | None = None
) -> dict[str, HeldRow]:
    """The reservations `ids` that exist, by id, in one SELECT (in a session's
    transaction, or on a psycopg connection itself). `lock_wait`: seconds each row
    lock the rest of the transaction waits for at most (PostgreSQL; SQLite has one
    writer at a time), then it fails (SQLSTATE 55P03: rolled back, a 503 to retry)."""
    if not ids:
        return {}
    driver = on if isinstance(on, psycopg.Connection) else raw_pg.driver_connection(on)
    rows: list[Any]
    if driver is None:
        assert isinstance(on, Session)
        rows = list(on.connection().execute(_HELD, {"p_ids": list(ids)}))
    else:
        one = len(ids) == 1
        sql, values = (_HELD_ONE_PG, ids[0]) if one else (_HELD_PG, list(ids))
        params: dict[str, Any] = {"ids": values}
        if lock_wait is not None:
            sql = _HELD_ONE_BOUNDED_PG if one else _HELD_BOUNDED_PG
            params["lock_ms"] = str(max(1, round(lock_wait * 1000)))
        rows = raw_pg.run(driver, sql, params)
        # As the column's type reads it (`tables.UTCDateTime`): in UTC.
        rows = [
            (*row[:_CREATED_AT], row[_CREATED_AT].astimezone(UTC), *row[_CREATED_AT + 1 :])
            for row in rows
        ]
    return {row[0]: HeldRow(*row) for row in rows}


@dataclass(frozen=True, slots=True)
class Settling:
    """One reservation's usage to settle: a webhook's or the sweeper's. `served`:
    (model, provider, price) of the fallback that served (issue 16.2), checked
    against the reservation's chain by the caller; None: the reservation's own."""

    reservation: Held
    usage: Usage
    actor: str
    request_id: str | None
    details: dict[str, Any] | None = None
    served: tuple[str, str, Price] | None = None


def settle_usage(
    session: Session,
    reservation: Held,
    usage: Usage,
    *,
    actor: str,
    request_id: str | None,
    details: dict[str, Any] | None = None,
    served: tuple[str, str, Price] | None = None,
) -> Outcome:
    """`settle_usages` for one reservation (the sweeper's)."""
    item = Settling(reservation, usage, actor, request_id, details, served)
    return settle_usages(session, [item])[0]


def settle_usages(
    session: Session, items: Sequence[Settling], *, claim: str | None = None
) -> list[Outcome]:
    """Charge each item's usage against its hold and release the rest, once;
    DUPLICATE for a reservation no longer active. Reservations must be distinct.
    The money moves in `ledger.settle_reservations` (set-based); the usage records
    of those settled go in its INSERT of the ledger rows. `claim`: a lone item's
    webhook id, recorded with the flip (DUPLICATE too if it was taken)."""
    settled = settle_reservations(
        session, [to_settle(item) for item in items], also=usage_rows(items), claim=claim
    )
    return [outcome_of(item, done) for item, done in zip(items, settled, strict=True)]


def to_settle(item: Settling) -> ToSettle:
    """What `ledger.settle_reservations` settles for `item`: its charge, capped at
    the hold, at the price of the model that served."""
    return ToSettle(
        item.reservation,
        charge_for(
            item.usage.status,
            item.usage.input_tokens,
            item.usage.output_tokens,
            item.served[2] if item.served is not None else reservation_price(item.reservation),
            item.reservation.hold_micro,
            cached_input_tokens=item.usage.cached_input_tokens,
            cache_write_tokens=item.usage.cache_write_tokens,
        ),
        item.actor,
        item.request_id,
        _context(item.usage, item.details),
        # The sweeper's ORM row does not say; its budgets' SELECT runs.
        item.reservation.budgeted if isinstance(item.reservation, HeldRow) else True,
    )


def usage_rows(items: Sequence[Settling]) -> AlsoRows:
    """The usage records of the items settled, for the ledger rows' statement."""

    def usage_records(
        settled: Sequence[Settled | None], now: datetime
    ) -> list[tuple[Table, Sequence[dict[str, Any]]]]:
        records = [
            _usage_record(item, done.charged_micro, now)
            for item, done in zip(items, settled, strict=True)
            if done is not None
        ]
        return [(hot_statements.USAGE, records)]

    return usage_records


def outcome_of(item: Settling, done: Settled | None) -> Outcome:
    if done is None:
        return DUPLICATE
    return Outcome(
        duplicate=False,
        charged_micro=done.charged_micro,
        released_micro=done.released_micro,
        user_id=item.reservation.user_id,
        held_tokens=item.reservation.input_estimate + item.reservation.max_tokens,
        held_at=tpm.counted_at(item.reservation.id),
    )


def _context(usage: Usage, details: dict[str, Any] | None) -> dict[str, Any]:
    """What the charge and release rows' audit events say of the usage."""
    return {
        "status": usage.status,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "usage_source": usage.usage_source,
        **{name: getattr(usage, name) for name in USAGE_DETAILS if getattr(usage, name)},
        **(details or {}),
    }


def _usage_record(item: Settling, cost_micro: int, now: datetime) -> dict[str, Any]:
    reservation, usage, served = item.reservation, item.usage, item.served
    return {
        "id": new_id(),
        "reservation_id": reservation.id,
        "jti": reservation.jti,
        "company_id": reservation.company_id,
        "user_id": reservation.user_id,
        "session_id": reservation.session_id,
        "model": served[0] if served is not None else reservation.model,
        "provider": served[1] if served is not None else reservation.provider,
        "status": usage.status,
        "finish_reason": usage.finish_reason,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "usage_source": usage.usage_source,
        "cost_micro": cost_micro,
        "created_at": now,
        "api_key_id": reservation.api_key_id,
        "ttft_ms": usage.ttft_ms,
    }
