"""Reconciliation: settle holds whose stream never reported (DESIGN §5: "a hold whose
stream never reports (the edge died) is settled after its deadline from the edge's
last usage checkpoint, or released if none").

Every ``LLMGW_SWEEP_INTERVAL_SECONDS`` the sweeper makes two passes over holds, and
deletes expired sign-outs (`sweep_signed_out`, `logout.purge_expired`), budget threshold
events past their retention (`sweep_budget_events`, `budgets.prune_events`) and the
counters of budget periods long ended (`sweep_budget_periods`, `budgets.prune_periods`).

**Silent streams** (`sweep_silent_streams`, issue 11.5). A running stream's edge
rewrites its checkpoint every 2 s. A checkpoint that has not changed for
`shared.checkpoints.silent_after` seconds (16 s by default, measured on this
process's clock by `liveness.SilenceWatch`) belongs to a dead edge: its hold is
settled from that checkpoint at once, not 20 minutes later, and the stream's
``jti`` is revoked. If the edge was only stalled, not dead, the revocation ends its
stream within about a second of it waking, and its own report then arrives as a
duplicate (200, nothing charged twice): it is billed input plus the output up to
its last checkpoint, so what it relayed while silent and until it saw the
revocation goes unbilled (a token admitted with no checkpoint yet is watched through
its used mark, `admitted_streams`), an error that favours the customer and is bounded by
the silence limit (an edge cut off from the store altogether can neither
checkpoint, nor see the revocation, nor enqueue its report: what it relays after
its last checkpoint goes unbilled). The stream's concurrency slots go back then too
(`shared.stream_slots`): the edge gives them back with its report, which a dead
edge never sends, so they stayed taken until their expiry
(``LLMGW_MAX_STREAM_SECONDS``, 15 minutes), the user (or the company, for an edge
that carried many of its streams) refused 429 ``too_many_streams`` all that while
after the edge was gone. A stalled edge's own release, later, removes nothing
more. A store outage the sweeper sees too is not
silence: the edges could not write either, so the watch starts again once the
store answers; nor is the time a read waits for a store answering late (frozen),
which holds the edges' heartbeats queued behind it: a reading counts from when it
was asked. An ``ended`` checkpoint (the stream is over,
its report on its way to the outbox) is left to that report for
`ENDED_MARGIN_SECONDS` (60 s) more, and for as long as the report waits in the
outbox (a control plane that was down); past that, unchanged, with no report
queued, its edge died between the two (after the client's last events) and it is
settled from it as a silent one: it carries the usage the report would have billed.
A report in an edge's local spool (the store refused it) is out of sight: if it
comes after, it is a duplicate of the same usage.
A pass reads at most `MAX_BATCHES` pages of active reservations and goes on from
the id the last one read last, round from the first, so with more running than that
every stream is still read every few passes (`SilenceWatch.resume_after`).

**Expired holds** (`sweep_expired_holds`). A reservation's deadline is its token's
expiry plus ``LLMGW_HOLD_GRACE_SECONDS``, which `ControlPlaneSettings` keeps longer than the
longest stream (issue 11.4). The sweeper lists active reservations past their
deadline and, for each, reads the edge's checkpoint from the store
(`shared.checkpoints`):

* a checkpoint for this stream → settled through `settlement.settle_usage`, the same
  exactly-once path as a webhook, as status ``failed`` with usage source
  ``estimated``: input plus the output relayed so far, nothing when no output token
  was relayed, capped at the hold (DESIGN §9 "What is billed"), each part of the
  usage the checkpoint carries (cache reads and writes) at its own rate, as the
  edge's report would have been (DESIGN §11 "Prices");
* none (or one that is unreadable or belongs to another stream) → released; but
  one past its deadline by more than a checkpoint lives, only after the sweeper has
  seen the database and the store for a while (`reports_wait`: a stream that ended
  during a long outage has its report on the way and its checkpoint expired).

Each reservation is its own conditional transaction, so several control planes may
sweep at once, and a webhook that arrives afterwards finds the reservation no longer
active: a harmless duplicate (200, nothing charged). One that fails is skipped for the
pass, never the pass's end (`sweep_failures`): a poison pill holds up no other
company's holds. When the store cannot be read
the sweep stops and retries next time: releasing a hold because Redis blinked would
give away usage that a checkpoint recorded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import budgets, company_webhooks, logout, lost_settlements
from control_plane.admitted_streams import admitted_without_checkpoint
from control_plane.audit import SWEEPER_ACTOR
from control_plane.background import finish, in_background
from control_plane.db import Database, lost_backend, outcome_unknown
from control_plane.errors import ModelNotInChain
from control_plane.fallbacks import served_price
from control_plane.ledger import (
    active_reservations,
    expired_reservations,
    release_reservation,
)
from control_plane.liveness import SilenceWatch
from control_plane.metrics import Metrics
from control_plane.reports_wait import ReportsWait
from control_plane.revoking import revocation_ttl
from control_plane.settings import ControlPlaneSettings
from control_plane.settlement import Usage, settle_usage
from control_plane.stream_revocations import mark_revoked
from control_plane.sweep_failures import PassFailures
from control_plane.tables import Reservation, utcnow
from control_plane.usage_events import parse_time
from shared.catalog import Price
from shared.checkpoints import (
    ENDED_MARGIN_SECONDS,
    KEPT_PAST_DEADLINE_SECONDS,
    UsageCheckpoint,
    checkpoint_key,
    silent_after,
)
from shared.revocations import revoke
from shared.store import AdmissionStore, KeyValueStore, OutboxStore, SlotRelease
from shared.stream_slots import slot_keys
from shared.webhooks import MAX_TOKENS_REPORTED, usage_webhook_id

log = logging.getLogger("control_plane.sweeper")

RELEASE_REASON = "hold expired without a usage report"
BATCH = 100
MAX_BATCHES = 50  # per sweep; the rest wait for the next one


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What one reservation's reconciliation did: ``settled`` (from a checkpoint),
    ``released``, or ``none`` (already settled or released by someone else)."""

    action: str
    charged_micro: int = 0
    released_micro: int = 0
    company_id: str = ""  # of a settled reservation: its revocation key's hash tag
    user_id: str = ""  # of a settled reservation: its stream slots' key


class SweepStore(KeyValueStore, AdmissionStore, OutboxStore, Protocol):
    """What the sweeper uses of the store: checkpoints, revocations, stream slots,
    whether a stream's report is in the outbox."""


NOTHING = Reconciled("none")


@dataclass(frozen=True, slots=True)
class SweepResult:
    settled: int = 0
    released: int = 0


def _usable(checkpoint: UsageCheckpoint | None, reservation: Reservation) -> bool:
    return (
        checkpoint is not None
        and checkpoint.reservation_id == reservation.id
        and checkpoint.jti == reservation.jti
        and 0 <= checkpoint.input_tokens <= MAX_TOKENS_REPORTED
        and 0 <= checkpoint.output_tokens <= MAX_TOKENS_REPORTED
    )


def reconcile(
    session: Session,
    reservation_id: str,
    checkpoint: UsageCheckpoint | None,
    *,
    silent: bool = False,
    running: bool = False,
    attempt: str | None = None,
) -> Reconciled:
    """One reservation's use case (one transaction): settle it from `checkpoint`,
    or release it. A `silent` stream is before its deadline: it is settled only
    from a checkpoint of its own, never released. `running`: the silence watch saw
    `checkpoint` change and not fall silent, so a checkpoint of the stream's own is
    left to its report, past the deadline or not (`sweep_expired_holds`). `attempt`:
    this transaction's mark on its audit events, by which a commit whose answer was
    lost is read back (`lost_settlements.count_reconciled`)."""
    mark = {} if attempt is None else {"attempt": attempt}
    reservation = session.get(Reservation, reservation_id)
    if reservation is None or reservation.status != "active":
        return NOTHING
    if silent and (checkpoint is None or not _usable(checkpoint, reservation)):
        return NOTHING
    if running and _usable(checkpoint, reservation):
        return NOTHING
    if checkpoint is not None and _usable(checkpoint, reservation):
        outcome = settle_usage(
            session,
            reservation,
            Usage(
                status="failed",
                input_tokens=checkpoint.input_tokens,
                output_tokens=checkpoint.output_tokens,
                usage_source="estimated",
                # Priced by `settle_usage` at their own rates, as a webhook's are.
                cached_input_tokens=checkpoint.cached_input_tokens,
                cache_write_tokens=checkpoint.cache_write_tokens,
                reasoning_tokens=checkpoint.reasoning_tokens,
            ),
            actor=SWEEPER_ACTOR,
            request_id=reservation.request_id,
            details={
                "source": "silent checkpoint" if silent else "checkpoint",
                "checkpoint_updated_at": checkpoint.updated_at,
                **mark,
            },
            served=checkpoint_served(reservation, checkpoint),
        )
        if outcome.duplicate:
            return NOTHING
        if silent:
            # Its token is revoked once this commits (`_end_silent`); recorded here, so
            # a store that loses the key gets it back (`revocation_republish`).
            mark_revoked(session, reservation.company_id, [reservation.jti], utcnow())
        return Reconciled(
            "settled",
            outcome.charged_micro,
            outcome.released_micro,
            reservation.company_id,
            reservation.user_id,
        )
    details = {
        "source": "no checkpoint" if checkpoint is None else "checkpoint of another stream",
        **mark,
    }
    released = release_reservation(
        session, reservation_id, RELEASE_REASON, actor=SWEEPER_ACTOR, details=details
    )
    return NOTHING if released is None else Reconciled("released", 0, released)


def checkpoint_served(
    reservation: Reservation, checkpoint: UsageCheckpoint
) -> tuple[str, str, Price] | None:
    """The fallback a checkpoint says served, at its price from the reservation's chain
    (issue 16.2); None — the reservation's own model and price — for anything else."""
    if checkpoint.model is None:
        return None
    try:
        found = served_price(reservation, checkpoint.model)
    except ModelNotInChain:
        return None
    return (checkpoint.model, found[0], found[1]) if found is not None else None


def _decode(reservation_id: str, raw: bytes | None) -> UsageCheckpoint | None:
    if raw is None:
        return None
    try:
        return UsageCheckpoint.loads(raw)
    except ValueError:
        log.warning("unreadable usage checkpoint for reservation %s", reservation_id)
        return None


async def sweep_expired_holds(
    db: Database,
    store: KeyValueStore,
    metrics: Metrics,
    *,
    now: datetime | None = None,
    watch: SilenceWatch | None = None,
    reports: ReportsWait | None = None,
    clock: Callable[[], float] = time.time,
) -> SweepResult:
    """Reconcile every active reservation whose deadline is before `now`. One that
    fails is skipped and the pass goes on; the pass then raises its first failure
    (`sweep_failures`). `reports`: told whether the pass saw the database and the
    store; until its wait is over, a hold past its deadline by more than a
    checkpoint lives, with none, is left for its report (None: released at once).

    Except a stream still running: the deadline (the token's expiry on the clock of
    the process that minted it, plus the grace) is read on this process's wall
    clock, and an edge starts a stream by its own: with clocks minutes apart (a host
    without time sync, a VM resumed from a pause) the deadline passed mid-stream,
    the hold was settled from the checkpoint of the moment, unrevoked, and the rest
    of the answer went unbilled, its report a duplicate. A checkpoint that `watch`
    (the silent-stream pass's, on this process's monotonic clock) saw change and has
    not found silent since is left to the stream's report, or to that pass once it
    falls silent, which settles it and revokes its token. One seen once or never
    changing is settled at the deadline as before (a dead edge's)."""
    moment = now or utcnow()
    settled = released = running = waiting = 0
    failures = PassFailures("hold sweep")
    after: tuple[datetime, str] | None = None
    if reports is not None and not reports.over():
        # Those past their deadline by more than a checkpoint lives are left for their
        # reports meanwhile. Listed first (oldest deadline first), thousands of them
        # (a long outage) filled the pass's pages, and the holds whose checkpoints
        # still live, behind them, went unread until their checkpoints expired (a
        # dead edge's stream then released, unbilled): the pass starts after them.
        after = (moment - timedelta(seconds=KEPT_PAST_DEADLINE_SECONDS), "")
        try:  # whether any wait, for the log
            older = functools.partial(expired_reservations, now=after[0], limit=1)
            waiting = len(await db.transaction(older))
        except Exception:
            reports.lost()
            raise
    for _ in range(MAX_BATCHES):
        try:
            page = await db.transaction(
                functools.partial(expired_reservations, now=moment, after=after, limit=BATCH)
            )
        except Exception:
            if reports is not None:
                reports.lost()
            raise
        if reports is not None:
            reports.seen()
        for _, reservation_id, company_id in page:
            if failures.skips(company_id):
                continue
            try:
                raw = await store.get(checkpoint_key(reservation_id))
            except Exception:
                log.warning("store unreachable; reconciliation retries next sweep", exc_info=True)
                if reports is not None:
                    reports.lost()
                return SweepResult(settled, released)
            checkpoint = _decode(reservation_id, raw)
            live = (
                watch is not None
                and checkpoint is not None
                and not checkpoint.ended
                and watch.seen_alive(reservation_id)
            )
            running += live
            attempt, began = lost_settlements.new_mark()
            try:
                done = await db.transaction(
                    functools.partial(
                        reconcile,
                        reservation_id=reservation_id,
                        checkpoint=checkpoint,
                        running=live,
                        attempt=attempt,
                    ),
                    late=functools.partial(_counted_late, metrics),
                )
            except Exception as exc:
                failures.failed(reservation_id, company_id, exc)
                if outcome_unknown(exc):
                    # It may have committed, its answer lost: every later pass finds
                    # the hold done and counts nothing. Counted if it did.
                    lost = lost_settlements.Reconciliation(
                        reservation_id, company_id, attempt, began, lost_backend(exc)
                    )
                    lost_settlements.count_reconciled(db, metrics, lost)
                if failures.stops:
                    break
                continue
            if done.action == "none":
                continue
            metrics.settled(done.charged_micro, done.released_micro)
            if done.action == "settled":
                settled += 1
                _observe_lag(metrics, checkpoint, clock())
            else:
                released += 1
        if len(page) < BATCH or failures.stops:
            break
        after = page[-1][:2]
    if settled or released:
        log.warning(
            "reconciled expired holds: %d settled from checkpoints, %d released", settled, released
        )
    if running:
        log.warning(
            "%d holds past their deadline belong to streams still running: do this host's"
            " clock and the edges' agree (time sync)?",
            running,
        )
    if waiting:
        log.warning(
            "holds past their deadline by over an hour have no checkpoint: their reports"
            " may still come (an outage); released %.0f s after the database and the store"
            " answer again",
            reports.wait if reports is not None else 0.0,
        )
    failures.raise_first()
    return SweepResult(settled, released)


def _observe_lag(metrics: Metrics, checkpoint: UsageCheckpoint | None, now: float) -> None:
    """`now` on the store's clock, which the edges date their checkpoints by: on the
    hosts' clocks, an edge 10 minutes behind made every settlement of its streams look
    10 minutes late (LLMGWReconciliationLagHigh), and one ahead hid the real lag."""
    last = parse_time(checkpoint.updated_at) if checkpoint else None
    if last is not None:
        metrics.reconciliation_lag.observe(max(now - last.timestamp(), 0.0))


async def sweep_silent_streams(
    db: Database,
    store: SweepStore,
    metrics: Metrics,
    watch: SilenceWatch,
    *,
    revoke_ttl: float,
    clock: Callable[[], float] = time.time,
) -> SweepResult:
    """Settle every running stream whose checkpoint `watch` finds silent, revoke its
    token so that an edge that was only stalled stops relaying, and give its stream
    slots back (its dead edge never will)."""
    settled = 0
    running: list[str] = []
    failures = PassFailures("silent-stream sweep")
    # Past the last pass's last id, then from the first id up to there: with more
    # running than a pass reads, every pass read the same oldest ones and a dead
    # edge's newer streams were never checked (their holds left to the deadline).
    start = after = watch.resume_after
    up_to: str | None = None  # once wrapped: `start`, so no id is read twice a pass
    for _ in range(MAX_BATCHES):
        page = await db.transaction(
            functools.partial(active_reservations, after_id=after, limit=BATCH, up_to=up_to)
        )
        # Taken before the read: a store that answers late (frozen, less than its
        # client's timeout) also held the edges' heartbeats queued behind it, so
        # the wait must not count as silence (`liveness.SilenceWatch`).
        sent_at = watch.now()
        try:
            keys = [checkpoint_key(rid) for rid, _, _ in page]
            raws = await store.get_many(keys) if page else []
            # An edge that died between a token's admission and the stream's first
            # checkpoint left only the token's used mark (`admitted_streams`).
            admitted = await admitted_without_checkpoint(
                store, [hold for hold, raw in zip(page, raws, strict=True) if raw is None]
            )
        except Exception:
            log.warning("store unreachable; silence check retries next sweep", exc_info=True)
            # The edges could not write their checkpoints either (the stream relays
            # on), and Redis back with its data may still hold the last one before
            # the outage: counted from before it, a live stream would be settled
            # from that checkpoint and revoked, its answer since then unbilled.
            # What this sweeper saw before it was blind counts from the next read.
            watch.keep_only(())
            return SweepResult(settled=settled)
        for (reservation_id, company_id, _), raw in zip(page, raws, strict=True):
            checkpoint = _decode(reservation_id, raw) or admitted.get(reservation_id)
            if checkpoint is None:
                continue  # not started: the deadline handles it
            running.append(reservation_id)
            # An ended stream's report is coming: given longer, and never while the
            # report waits in the outbox (a control plane that was down).
            limit = watch.silent_after + ENDED_MARGIN_SECONDS if checkpoint.ended else None
            if not watch.is_silent(reservation_id, checkpoint.marker(), sent_at, limit):
                continue
            if checkpoint.ended and await _report_queued(store, checkpoint.jti):
                continue
            if failures.skips(company_id):
                continue  # the database failed on its company: the next pass
            attempt, began = lost_settlements.new_mark()
            try:
                done = await db.transaction(
                    functools.partial(
                        reconcile,
                        reservation_id=reservation_id,
                        checkpoint=checkpoint,
                        silent=True,
                        attempt=attempt,
                    ),
                    late=functools.partial(
                        _revoked_late, metrics, store, checkpoint.jti, revoke_ttl
                    ),
                )
            except Exception as exc:
                failures.failed(reservation_id, company_id, exc)
                if outcome_unknown(exc):
                    # Its settlement may have committed, its answer lost: every later
                    # pass would find the hold settled and neither revoke the stream
                    # nor give its slots back. Silent either way: ended now (a stream
                    # whose settlement did not commit is settled by the next pass).
                    in_background(
                        _end_lost(
                            db, store, checkpoint.jti, reservation_id, company_id, revoke_ttl
                        ),
                        "lost-silent-revocation",
                    )
                    lost = lost_settlements.Reconciliation(
                        reservation_id, company_id, attempt, began, lost_backend(exc)
                    )
                    lost_settlements.count_reconciled(db, metrics, lost)
                if failures.stops:
                    break
                continue
            if done.action != "settled":
                continue
            settled += 1
            metrics.settled(done.charged_micro, done.released_micro)
            _observe_lag(metrics, checkpoint, clock())
            # Runs to its end even if the sweeper is stopped meanwhile (a deploy's
            # SIGTERM): the settlement has committed, and unrevoked, an edge that was
            # only cut off relays on unbilled. The lifespan waits for it
            # (`background.drain`) before it closes the store.
            await finish(_end_silent(store, checkpoint.jti, done, revoke_ttl), "silent-revocation")
        if failures.stops:
            break  # not read through: the watch forgets nothing, the next pass retries
        if page:
            after = page[-1][0]
        if len(page) == BATCH:
            continue
        if up_to is not None or not start:
            watch.keep_only(running)  # a full scan: forget what stopped running
            watch.resume_after = ""
            break
        up_to, after = start, ""  # the ids' end: round from the first to where it began
    else:
        # Every page read (more running than a pass reads): what stopped running
        # among those read is forgotten all the same, or the watch kept every
        # stream it ever saw for as long as that lasted; the rest, unread, are
        # kept as they were, for the next pass, which starts here.
        watch.keep_only_read(start, after, running)
        watch.resume_after = after
    if settled:
        log.warning("settled %d silent streams from their checkpoints", settled)
    failures.raise_first()
    return SweepResult(settled=settled)


async def _report_queued(store: SweepStore, jti: str) -> bool:
    """Whether the stream's report is in the store's outbox (keyed by its webhook id,
    `shared.webhooks.usage_webhook_id`); a store that cannot say counts as yes: the
    deadline settles the hold all the same."""
    try:
        return await store.outbox_get(usage_webhook_id(jti)) is not None
    except Exception:
        log.warning("store unreachable; ended stream %s left to its report", jti, exc_info=True)
        return True


async def _end_silent(store: SweepStore, jti: str, done: Reconciled, ttl: float) -> None:
    """A silent stream settled: revoke its token (first: a stalled edge stops), then
    give its slots back (not when its user is unknown: `_end_lost`). Each best
    effort: a slot left taken still expires."""
    try:
        await revoke(store, "jti", jti, done.company_id, ttl)
    except Exception:
        log.warning("could not revoke silent stream %s", jti, exc_info=True)
    if not done.user_id:
        return
    try:
        await store.release_slots(SlotRelease(slot_keys(done.company_id, done.user_id), jti))
    except Exception:
        log.warning("could not free silent stream %s's slots", jti, exc_info=True)


async def _end_lost(
    db: Database, store: SweepStore, jti: str, reservation_id: str, company_id: str, ttl: float
) -> None:
    """`_end_silent` for a silent stream whose settlement's outcome is unknown (its
    answer lost): its user (its slots' key) read back first; without it, the
    revocation alone (the slots expire)."""

    def user_of(session: Session) -> str | None:
        stmt = select(col(Reservation.user_id)).where(col(Reservation.id) == reservation_id)
        return session.scalar(stmt)

    try:
        user_id = await db.transaction(user_of)
    except Exception:
        log.warning("could not read silent stream %s's user", jti, exc_info=True)
        user_id = None
    done = Reconciled("settled", company_id=company_id, user_id=user_id or "")
    await _end_silent(store, jti, done, ttl)


def _counted_late(metrics: Metrics, done: Reconciled) -> None:
    """A reconciliation that committed after its sweep's call gave up on it (past the
    database's bound, `db_threads`): counted now, as the sweep counts one in time.
    The next sweep finds it settled and counts nothing, so without this its money
    never reached ``llmgw_cp_credits_charged_total`` / ``_released_total``."""
    if done.action != "none":
        metrics.settled(done.charged_micro, done.released_micro)


def _revoked_late(
    metrics: Metrics, store: SweepStore, jti: str, revoke_ttl: float, done: Reconciled
) -> None:
    """`_counted_late` for a silent stream, whose token is also revoked and its slots
    freed, as the sweep does for one settled in time: settled late and left
    unrevoked, a stream whose edge was only cut off would relay on, unbilled past
    its checkpoint."""
    _counted_late(metrics, done)
    if done.action != "settled":
        return
    in_background(_end_silent(store, jti, done, revoke_ttl), "late-revocation")


Prune = Callable[[Session, datetime, int], int]


async def _purge(db: Database, prune: Prune, now: datetime | None) -> int:
    """Run `prune` (delete at most a batch, say how many went) a transaction a batch,
    at most `MAX_BATCHES` a sweep, so one sweep's deletions never hold a lock long;
    how many went in all."""
    moment = now or utcnow()
    purged = 0
    for _ in range(MAX_BATCHES):
        count = await db.transaction(lambda s: prune(s, moment, BATCH))
        purged += count
        if count < BATCH:
            break
    return purged


async def sweep_signed_out(db: Database, *, now: datetime | None = None) -> int:
    """Delete every sign-out past its expiry (`logout.purge_expired`)."""
    return await _purge(db, logout.purge_expired, now)


async def sweep_budget_events(db: Database, *, now: datetime | None = None) -> int:
    """Delete the threshold events past their retention (`budgets.prune_events`)."""

    def prune(session: Session, moment: datetime, limit: int) -> int:
        return budgets.prune_events(session, moment, limit, company_webhooks.GIVE_UP_AFTER)

    return await _purge(db, prune, now)


async def sweep_budget_periods(db: Database, *, now: datetime | None = None) -> int:
    """Delete the counters of periods long ended (`budgets.prune_periods`)."""
    return await _purge(db, budgets.prune_periods, now)


async def run_sweeper(
    db: Database,
    store: SweepStore,
    metrics: Metrics,
    settings: ControlPlaneSettings,
    clock: Callable[[], float] = time.time,
) -> None:
    """Sweep every ``LLMGW_SWEEP_INTERVAL_SECONDS`` until cancelled (the app's
    lifespan owns it). `clock`: the store's (`Deps.clock`)."""
    interval = settings.sweep_interval_seconds
    watch = SilenceWatch(silent_after(settings.resume_grace_seconds))
    reports = ReportsWait()
    while True:
        await asyncio.sleep(interval)
        await sweep_round(db, store, metrics, settings, watch, reports=reports, clock=clock)


async def sweep_round(
    db: Database,
    store: SweepStore,
    metrics: Metrics,
    settings: ControlPlaneSettings,
    watch: SilenceWatch,
    *,
    now: datetime | None = None,
    reports: ReportsWait | None = None,
    clock: Callable[[], float] = time.time,
) -> None:
    """One round of `run_sweeper`: every pass, `now` (None: this process's clock)
    for those that read the wall clock; `reports`: `sweep_expired_holds`'; `clock`:
    the store's, which the edges date their checkpoints by."""
    interval = settings.sweep_interval_seconds
    # Separately: one pass failing (a database blip) must not starve the others.
    # The silent streams first: the hold pass leaves to it those it sees running.
    try:
        await sweep_silent_streams(
            db, store, metrics, watch, revoke_ttl=revocation_ttl(settings), clock=clock
        )
    except Exception:
        log.exception("silent-stream sweep failed; retrying in %.1f s", interval)
    try:
        await sweep_expired_holds(
            db, store, metrics, now=now, watch=watch, reports=reports, clock=clock
        )
    except Exception:
        log.exception("hold sweep failed; retrying in %.1f s", interval)
    try:
        await sweep_signed_out(db, now=now)
    except Exception:
        log.exception("sign-out sweep failed; retrying in %.1f s", interval)
    try:
        await sweep_budget_events(db, now=now)
    except Exception:
        log.exception("budget event sweep failed; retrying in %.1f s", interval)
    try:
        await sweep_budget_periods(db, now=now)
    except Exception:
        log.exception("budget period sweep failed; retrying in %.1f s", interval)
