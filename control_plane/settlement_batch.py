"""Usage webhooks that arrive together settle together (issue 14.2), still exactly once.

`SettlementBatcher.settle` queues one webhook and awaits its own `Outcome`. One
drain task at a time takes everything queued (up to `MAX_BATCH`) and settles it in
ONE transaction on the database threads: a single commit, a single thread hop and
a single connection checkout for the batch instead of one per webhook. A webhook
is answered only after its batch has committed. When idle nothing waits: the first
webhook starts a drain on the loop's next turn; the webhooks that arrive while a
batch commits form the next one.

Exactly once, inside a batch too: each event runs the one settlement path
(`settlement.settle_webhook`) in arrival order, so a later event sees what an
earlier one wrote in the same transaction: the same webhook id twice finds its
`WebhookEvent` row (DUPLICATE), a second id for one reservation finds it no longer
active (DUPLICATE). No savepoint per event on this common path (two round trips
each): if any event is refused (unknown reservation, mismatch, a twin committed by
another process: IntegrityError) or anything fails (a deadlock, the database
gone, the commit), the whole batch rolls back, nothing of it kept, and each of its
events is then settled alone by `settlement.settle_event` in its own transaction,
exactly as without batching: the refused one answers its own error, the others
settle. A batch of one goes that way directly.

Lock order: events are taken by company, then reservation, so two batches (two
control-plane processes) lock companies in the same order and cannot deadlock each
other; within one event the order is `ledger`'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import hot_statements
from control_plane.chat_sessions import SessionLimits
from control_plane.db import Database
from control_plane.errors import ServiceUnavailable
from control_plane.settlement import Outcome, settle_event, settle_webhook
from control_plane.tables import Reservation
from shared.webhooks import UsageEvent

log = logging.getLogger("control_plane.settlement_batch")

MAX_BATCH = 64  # events per transaction: bounds how long one batch holds its locks


@dataclass(slots=True)
class Job:
    webhook_id: str
    event: UsageEvent
    transcripts: bool
    http_request_id: str | None = None
    signer_provider: str | None = None
    session_limits: SessionLimits | None = None
    result: Outcome | BaseException | None = field(default=None)


class BatchAborted(Exception):
    """One event of a batch was refused or failed: the batch's transaction rolls back
    as a whole and its events are settled one by one."""


def settle_batch(session: Session, jobs: Sequence[Job]) -> None:
    """Settle `jobs` in the caller's transaction; fills in each job's `result`.

    Raises (and the caller rolls the whole transaction back) as soon as one event is
    refused or fails: no savepoint per event on the common path, where every event
    settles or is a DUPLICATE. The reservations are read in one SELECT first, so the
    events find them in the session's identity map."""
    ordered = sorted(jobs, key=lambda j: (j.event.company_id, j.event.reservation_id))
    ids = sorted({j.event.reservation_id for j in ordered})
    # Held here: the identity map keeps its objects only while someone refers to them.
    loaded = list(session.scalars(select(Reservation).where(col(Reservation.id).in_(ids))))
    try:
        with hot_statements.deferred_inserts(session):
            for job in ordered:
                job.result = settle_webhook(
                    session,
                    job.webhook_id,
                    job.event,
                    transcripts=job.transcripts,
                    http_request_id=job.http_request_id,
                    signer_provider=job.signer_provider,
                    session_limits=job.session_limits,
                )
    except Exception as exc:
        raise BatchAborted() from exc
    del loaded


class SettlementBatcher:
    """The webhook route's way to settle (one per app, made by the lifespan)."""

    def __init__(self, db: Database, *, max_batch: int = MAX_BATCH) -> None:
        self._db = db
        self._max_batch = max_batch
        self._queue: list[tuple[Job, asyncio.Future[Outcome]]] = []
        self._drain: asyncio.Task[None] | None = None

    async def settle(self, job: Job) -> Outcome:
        """`job` settled in the next batch; returns once that batch has committed."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue.append((job, future))
        if self._drain is None or self._drain.done():
            self._drain = asyncio.create_task(self._run(), name="settlement-batch")
        # Shielded: a client that goes away does not cancel a settlement under way.
        return await asyncio.shield(future)

    async def _run(self) -> None:
        batch: list[tuple[Job, asyncio.Future[Outcome]]] = []
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._settle(batch)
        finally:
            # Cancelled (shutdown) or broken: whoever still waits gets a 503, which
            # the edge retries, rather than a request that never ends. A batch cut
            # off mid-transaction rolled back; one cut off mid-commit is found
            # settled by the retry (a duplicate).
            for _, future in [*batch, *self._queue]:
                if not future.done():
                    future.set_exception(
                        ServiceUnavailable("Settlement was interrupted; retry shortly.")
                    )
            self._queue.clear()

    async def _settle(self, batch: list[tuple[Job, asyncio.Future[Outcome]]]) -> None:
        jobs = [job for job, _ in batch]
        try:
            if len(jobs) == 1:
                raise BatchAborted()  # alone: its own transaction, as without batching
            await self._db.transaction(lambda s: settle_batch(s, jobs))
        except Exception as exc:
            # Rolled back as a whole: nothing of it was kept. Each event on its own,
            # in its own transaction (`settlement.settle_event`): a refused one
            # answers its error, the others settle.
            if not isinstance(exc, BatchAborted) or exc.__cause__ is not None:
                log.info("settlement batch of %d rolled back (%r); one by one", len(jobs), exc)
            for job in jobs:
                try:
                    job.result = await settle_event(
                        self._db,
                        job.webhook_id,
                        job.event,
                        transcripts=job.transcripts,
                        http_request_id=job.http_request_id,
                        signer_provider=job.signer_provider,
                        session_limits=job.session_limits,
                    )
                except Exception as settle_error:
                    job.result = settle_error
        for job, future in batch:
            if future.done():
                continue
            if isinstance(job.result, Outcome):
                future.set_result(job.result)
            else:
                future.set_exception(job.result or RuntimeError("not settled"))

    async def close(self) -> None:
        """Let the batch under way (and what is queued) finish."""
        if self._drain is not None:
            await asyncio.gather(self._drain, return_exceptions=True)
