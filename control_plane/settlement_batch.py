"""Usage webhooks that arrive together settle together (issue 14.2), still exactly once.

`SettlementBatcher.settle` queues one webhook and awaits its own `Outcome`. One
drain task at a time takes everything queued (up to `MAX_BATCH`) and settles it in
ONE transaction on the database threads: a single commit, a single thread hop and
a single connection checkout for the batch instead of one per webhook. A webhook
is answered only after its batch has committed. When idle nothing waits: the first
webhook starts a drain on the loop's next turn; the webhooks that arrive while a
batch commits form the next one.

Exactly once, inside a batch too: each event runs the one settlement path
(`settlement.settle_webhook`) in its own savepoint, in arrival order, so a later
event sees what an earlier one wrote in the same transaction: the same webhook id
twice finds its `WebhookEvent` row (DUPLICATE), a second id for one reservation
finds it no longer active (DUPLICATE). An event refused on its own (unknown
reservation, mismatch, a twin committed by another process: IntegrityError) rolls
back only its savepoint and answers its own request. Anything else (the database
gone, a deadlock, a failed commit) rolls the whole batch back, and each of its
events is then settled alone by `settlement.settle_event`, as without batching.

Lock order: events are taken by company, then reservation, so two batches (two
control-plane processes) lock companies in the same order and cannot deadlock each
other; within one event the order is `ledger`'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from control_plane.chat_sessions import SessionLimits
from control_plane.db import Database
from control_plane.errors import AppError
from control_plane.settlement import (
    DUPLICATE,
    Outcome,
    already_settled,
    settle_event,
    settle_webhook,
)
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


def _settle_one(session: Session, job: Job) -> Outcome | BaseException:
    try:
        with session.begin_nested():
            return settle_webhook(
                session,
                job.webhook_id,
                job.event,
                transcripts=job.transcripts,
                http_request_id=job.http_request_id,
                signer_provider=job.signer_provider,
                session_limits=job.session_limits,
            )
    except AppError as exc:  # refused on its own: 404, 409, 422…
        return exc
    except IntegrityError as exc:
        # A twin outside this batch (another process) committed the same webhook id
        # first; the savepoint rolled back only this event.
        if already_settled(session, job.webhook_id, job.event.reservation_id):
            return DUPLICATE
        return exc


def settle_batch(session: Session, jobs: Sequence[Job]) -> None:
    """Settle `jobs` in the caller's transaction, each in a savepoint; fills in each
    job's `result` (an `Outcome`, or the error that refused it alone). Raises, with
    nothing to keep, when the transaction itself fails."""
    for job in sorted(jobs, key=lambda j: (j.event.company_id, j.event.reservation_id)):
        job.result = _settle_one(session, job)


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
        while self._queue:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            await self._settle(batch)

    async def _settle(self, batch: list[tuple[Job, asyncio.Future[Outcome]]]) -> None:
        jobs = [job for job, _ in batch]
        try:
            await self._db.transaction(lambda s: settle_batch(s, jobs))
        except Exception:
            # Rolled back as a whole: nothing of it was kept. Each event on its own.
            log.warning("settlement batch of %d failed; settling one by one", len(jobs))
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
                except Exception as exc:
                    job.result = exc
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
