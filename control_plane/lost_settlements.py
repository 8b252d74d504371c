"""Settlements (a usage webhook's, the sweeper's) whose commit's answer was lost.

A settlement's connection may die after or while its COMMIT went out (a cut
network, a killed backend, a proxy restarting: `db.outcome_unknown`): the route
answers 503 and the edge's redelivery finds it settled, a duplicate, which counts
nothing. Before, such a settlement was never counted in
``llmgw_cp_credits_charged_total`` / ``_released_total`` (DESIGN §8: the ledger had
the money, the counters never did) nor its tokens-per-minute estimate corrected.

Each transaction that settles deliveries marks its ledger rows' audit events with an
attempt id of its own (`marked`): once its answer is lost, what it settled is read
back by that mark (`read_back`), never by the webhook id, which the redelivery
shares, and handed to each delivery's ``late``, as a commit past the database's
bound is. A redelivery that settled it instead (the lost one rolled back) carries
another mark and counts itself: each settlement is counted once. The sweeper's
reconciliations (a silent stream settled, an expired hold settled or released) are
marked and read back the same way (`count_reconciled`): the next pass finds them
done and counts nothing.

The connection is lost, not the transaction: PostgreSQL may still be running it
(its statement waiting on a lock, its COMMIT on a synchronous standby or the disk)
and commit it after a read made at once has found nothing; before, such a
settlement was never counted. So the read waits, bounded, until the backend that
ran it (`db.lost_backend`) has ended that transaction, gone or idle, and is tried
again while the database cannot be reached (`once_over`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import select, text
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import tpm
from control_plane.audit import SWEEPER_ACTOR, WEBHOOK_ACTOR
from control_plane.background import in_background
from control_plane.db import Database, DatabaseTimeout
from control_plane.metrics import Metrics
from control_plane.settlement import Outcome
from control_plane.tables import AuditEvent, Reservation, utcnow

if TYPE_CHECKING:  # it imports this module
    from control_plane.webhook_settlement import Delivery, Late

log = logging.getLogger("control_plane.lost_settlements")

# How far before its transaction began a settlement's rows may be dated: they carry
# this process's clock (`tables.utcnow`), read once the transaction has begun; the
# margin bounds the read to the company's recent audit events (their index).
MARGIN = timedelta(minutes=5)
# How long a read-back waits for the backend that ran a lost write to end it
# (`once_over`). A role's ``statement_timeout`` (docs/operations.md: 15 s)
# ends a statement stuck on a lock or a standby well before; past it, read anyway.
OVER_WAIT = timedelta(seconds=60)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """One transaction's deliveries, marked, and when it began."""

    deliveries: list[Delivery]
    began: datetime


def marked(deliveries: Sequence[Delivery]) -> Attempt:
    """`deliveries` marked with a new attempt id, for one transaction."""
    mark, began = new_mark()
    return Attempt([dataclasses.replace(d, attempt=mark) for d in deliveries], began)


async def once_over(
    db: Database,
    backend: int | None,
    fn: Callable[[Session], T],
    late: Callable[[T], None] | None = None,
) -> T:
    """``fn`` in a transaction once PostgreSQL's `backend`, whose answer was lost
    (`db.lost_backend`), runs no transaction any more: what it ran has committed or
    rolled back. At once when the backend is unknown or gone. A database that
    cannot be reached (the outage that cut the connection often lasts a moment) is
    tried again (``fn`` must be safe to run twice), as one past its bound is, unless
    it has a ``late`` (as `Database.transaction`'s: its commit may still come, and
    is handed to it). All within `OVER_WAIT`: past it ``fn`` runs anyway, or its
    last failure is raised.

    Tried once when the backend is unknown: mostly a write whose connection never
    opened (the database refusing them), which sent nothing. Retried, every
    webhook an edge redelivers through an outage left a task asking for a
    connection once a second for a minute (measured: 5 webhooks, 43 in 5 s)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + OVER_WAIT.total_seconds()
    pause = 0.02
    told = False
    waiting = backend is not None
    while True:
        try:
            if waiting and backend is not None:
                state = await db.transaction(functools.partial(backend_state, pid=backend))
                # Gone, or idle (its transaction ended): nothing more can commit.
                waiting = state is not None and state != "idle"
                if waiting and loop.time() >= deadline:
                    log.warning("backend %d still in a transaction after %s", backend, OVER_WAIT)
                    waiting = False
            if not waiting:
                return await db.transaction(fn, late=late)
        except Exception as exc:
            # ``fn`` past its bound with a `late`: it may still commit, and goes there.
            if (
                backend is None
                or loop.time() >= deadline
                or (not waiting and late is not None and isinstance(exc, DatabaseTimeout))
            ):
                raise
            if not told:  # once: an outage would log a line a second
                told = True
                log.info("database unreachable after a lost answer, trying again: %r", exc)
        await asyncio.sleep(pause)
        pause = min(pause * 2, 1.0)


def backend_state(session: Session, pid: int) -> str | None:
    """`pid`'s ``pg_stat_activity.state``: None when it is gone, or when nothing
    tells (``disabled``: its ``track_activities`` is off; no state: another role's),
    which `once_over` does not wait for: it would wait the whole `OVER_WAIT`."""
    state = session.scalar(
        text("SELECT state FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
    )
    return state if isinstance(state, str) and state != "disabled" else None


def read_back(
    db: Database, attempt: Attempt, lates: Sequence[Late | None], backend: int | None
) -> None:
    """In the background: each of `attempt`'s deliveries that its lost commit settled
    goes to its ``late``; nothing if it rolled back. Read once `backend`, which ran
    it, has ended it (`once_over`)."""
    if any(late is not None for late in lates):
        in_background(_read_back(db, attempt, list(lates), backend), "lost-settlement")


async def _read_back(
    db: Database, attempt: Attempt, lates: list[Late | None], backend: int | None
) -> None:
    try:
        outcomes = await once_over(db, backend, functools.partial(settled_by, attempt=attempt))
    except Exception as exc:  # the counters miss it, as they did before
        log.warning("could not read back a settlement whose answer was lost: %r", exc)
        return
    for delivery, late in zip(attempt.deliveries, lates, strict=True):
        outcome = outcomes.get(delivery.event.reservation_id)
        if outcome is not None and late is not None:
            late(outcome)


def settled_by(session: Session, attempt: Attempt) -> dict[str, Outcome]:
    """The Outcome of each reservation `attempt` settled (its mark on the charge and
    release rows' audit events), by reservation id."""
    deliveries = attempt.deliveries
    amounts = marked_amounts(
        session,
        actor=WEBHOOK_ACTOR,
        mark=deliveries[0].attempt or "",
        began=attempt.began,
        company_ids={d.event.company_id for d in deliveries},
        reservation_ids={d.event.reservation_id for d in deliveries},
    )
    if not amounts:
        return {}
    held = session.execute(
        select(
            col(Reservation.id),
            col(Reservation.user_id),
            col(Reservation.input_estimate),
            col(Reservation.max_tokens),
        ).where(col(Reservation.id).in_(sorted(amounts)))
    )
    return {
        reservation_id: Outcome(
            duplicate=False,
            charged_micro=-amounts[reservation_id].get("charge", 0),
            released_micro=amounts[reservation_id].get("release", 0),
            user_id=user_id,
            held_tokens=input_estimate + max_tokens,
            held_at=tpm.counted_at(reservation_id),
        )
        for reservation_id, user_id, input_estimate, max_tokens in held
    }


def marked_amounts(
    session: Session,
    *,
    actor: str,
    mark: str,
    began: datetime,
    company_ids: set[str],
    reservation_ids: set[str],
) -> dict[str, dict[str, int]]:
    """The charge and release amounts (as the ledger has them) that the transaction
    marked `mark` wrote, by reservation id: none if it rolled back. Read from the
    audit events written with the ledger rows, bounded by their company's index."""
    rows = session.execute(
        select(
            col(AuditEvent.reservation_id),
            col(AuditEvent.action),
            col(AuditEvent.amount_micro),
            col(AuditEvent.details),
        ).where(
            col(AuditEvent.company_id).in_(sorted(company_ids)),
            col(AuditEvent.created_at) >= began - MARGIN,
            col(AuditEvent.reservation_id).in_(sorted(reservation_ids)),
            col(AuditEvent.actor) == actor,
            col(AuditEvent.action).in_(["charge", "release"]),
        )
    )
    amounts: dict[str, dict[str, int]] = {}
    for reservation_id, action, amount, details in rows:
        if (details or {}).get("attempt") == mark:
            amounts.setdefault(reservation_id, {})[action] = amount or 0
    return amounts


def new_mark() -> tuple[str, datetime]:
    """A transaction's attempt id, and when it began (`marked_amounts`)."""
    return uuid.uuid4().hex, utcnow()


@dataclasses.dataclass(frozen=True, slots=True)
class Reconciliation:
    """A sweeper's reconciliation of one hold: its mark, when it began, and the
    backend that ran it, once its answer is lost (`db.lost_backend`)."""

    reservation_id: str
    company_id: str
    mark: str
    began: datetime
    backend: int | None = None


def count_reconciled(db: Database, metrics: Metrics, lost: Reconciliation) -> None:
    """In the background: what the sweeper's reconciliation marked `mark`, whose
    answer was lost, settled or released, counted as a pass counts one answered
    (``llmgw_cp_credits_charged_total`` / ``_released_total``); nothing if it rolled
    back, and the next pass reconciles (and counts) it then. Read once its backend
    has ended it (`once_over`)."""
    in_background(_count_reconciled(db, metrics, lost), "lost-reconciliation")


async def _count_reconciled(db: Database, metrics: Metrics, lost: Reconciliation) -> None:
    reservation_id, mark = lost.reservation_id, lost.mark
    read = functools.partial(
        marked_amounts,
        actor=SWEEPER_ACTOR,
        mark=mark,
        began=lost.began,
        company_ids={lost.company_id},
        reservation_ids={reservation_id},
    )
    try:
        amounts = (await once_over(db, lost.backend, read)).get(reservation_id)
    except Exception as exc:  # the counters miss it, as they did before
        log.warning("could not read back reconciliation %s whose answer was lost: %r", mark, exc)
        return
    if amounts is not None:
        metrics.settled(-amounts.get("charge", 0), amounts.get("release", 0))
