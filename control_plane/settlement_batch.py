"""Usage webhooks that arrive together settle together (issue 14.2), still exactly once.

`SettlementBatcher.settle` queues one verified delivery and awaits its own
`Outcome`. One drain task at a time takes everything queued (up to `MAX_BATCH`) and
settles it in ONE transaction on the database threads with
`webhook_settlement.settle_webhooks` (a webhook that arrives alone takes
`webhook_settlement.settle_delivery`, the same checks and statements): a single commit,
thread hop and connection checkout for the batch, and a handful of set-based
statements whatever its size. A webhook is answered only after its batch has
committed. When idle nothing waits: the first webhook starts a drain on the loop's
next turn; the webhooks that arrive while a batch commits form the next one.

Exactly once, inside a batch too: the batch's webhook ids are recorded in one
statement, where the first delivery of an id claims it and the others get what a
redelivery gets (DUPLICATE, or 409 for another reservation); the first claiming
delivery of a reservation settles it, later ones are DUPLICATE. A refused event
(unknown reservation, mismatch, a served model outside the chain…) answers its own
error and writes nothing; the others settle. If the transaction itself fails (a
deadlock, the database gone, a unique key lost to another process, the commit),
nothing of it was kept, and each of its events is then settled alone by
`webhook_settlement.settle_delivery`, exactly as without batching. The batch and
those events wait at most `LOCK_WAIT_SECONDS` for a row lock: one company's row
held by a long transaction fails its own events only.

A company whose settlement met its row held (a lock given up, or the database's
bound passed on a webhook settled alone) settles on a lane of its own for
`APART_SECONDS`: its queue, its drain, in its share of the database threads
(`db_shares`), side by side with the shared one. Otherwise each of its webhooks
reaching the shared queue held up every other company's again (a lone webhook's
path waits for a lock up to the database's bound). Every other company keeps
batching together: lanes per company for all would cost a transaction per company
per batch.

A batch takes the queue's companies in turn (each one's events in their order) and
holds at most `MAX_BATCH_CHARS` of transcripts (at least one event): each is written
into its session, so a company whose streams end together with long answers (up to
its 200 streams, up to 1 MiB of transcript each) queued batches of 64 large
transcripts, seconds of the database each, and another company's webhook behind
them waited for all of them (measured: batches of 3.1-4.3 s, 11.5 s for the other
company's webhook against 0.02 s alone). Now it settles in the next batch.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import psycopg
import sqlalchemy.exc

from control_plane import db_shares, lost_settlements
from control_plane.db import Database, DatabaseTimeout, lost_backend, outcome_unknown
from control_plane.errors import AppError, DatabaseUnavailable
from control_plane.settlement import Outcome
from control_plane.webhook_settlement import (
    Delivery,
    Late,
    settle_delivery,
    settle_webhooks,
    settled_late,
    transcript_weight,
)

log = logging.getLogger("control_plane.settlement_batch")

MAX_BATCH = 64  # events per transaction: bounds how long one batch holds its locks
# Characters of transcripts per transaction: 64 answers of 64 K, a few hundred ms of
# the database; a batch of 64 at 900 K each took 3 to 4 s. Weighed as the sessions
# store them (`webhook_settlement.transcript_weight`): text and tool calls alike, an
# answer of tool calls alone being as long to write as one of text.
MAX_BATCH_CHARS = 4 * 1024 * 1024
# How long a batch (and each of its events settled alone after it failed) may wait
# for a row lock, at most; half the database's bound when that is shorter. A batch
# holds every company's rows it has updated while it waits for the next: one company
# row held by a long transaction (an admin's, an operator's psql) made the batch
# wait past its bound, so every company's webhook in it was a 503, and the batch's
# statement, waiting on, kept the other companies' rows from their own inits. A
# settlement waits for a row a few milliseconds when all is well.
LOCK_WAIT_SECONDS = 1.0
# How long a company whose settlement met its row held settles apart (renewed at
# each such meeting): an owner's burst of long transactions lasts seconds to minutes.
APART_SECONDS = 60.0

# A queued delivery, the future its webhook awaits, and its `late`.
_Queued = tuple[Delivery, asyncio.Future[Outcome], Late | None]


class SettlementBatcher:
    """The webhook route's way to settle (one per app, made by the lifespan)."""

    def __init__(
        self,
        db: Database,
        *,
        max_batch: int = MAX_BATCH,
        lock_wait: float | None = LOCK_WAIT_SECONDS,
    ) -> None:
        self._db = db
        self._max_batch = max_batch
        # None: lock waits bounded by the database's bound only.
        self._lock_wait = None if lock_wait is None else min(lock_wait, db.timeout / 2)
        # The shared lane (None) and each apart company's: its queue and its drain.
        self._queues: dict[str | None, list[_Queued]] = {}
        self._drains: dict[str | None, asyncio.Task[None]] = {}
        self._apart_until: dict[str, float] = {}  # company -> the loop's time

    async def settle(self, delivery: Delivery, late: Late | None = None) -> Outcome:
        """`delivery` settled in its lane's next batch; returns once that batch has
        committed, or raises its refusal. ``late`` gets its Outcome if it settles
        after the 503 (`webhook_settlement.Late`) or after this call was cancelled."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        lane = self._lane(delivery.event.company_id, loop.time())
        self._queues.setdefault(lane, []).append((delivery, future, late))
        drain = self._drains.get(lane)
        if drain is None or drain.done():
            self._drains[lane] = asyncio.create_task(self._run(lane), name="settlement-batch")
        # Shielded: a client that goes away does not cancel a settlement under way.
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # Its request cut off (the server's shutdown): a commit nobody awaits,
            # which goes to `late` as a call's cancelled on the database threads does.
            if late is not None:
                future.add_done_callback(functools.partial(_left_late, late))
            raise

    def _lane(self, company_id: str, now: float) -> str | None:
        """The company's own lane while it settles apart, else the shared one. (The
        event's company: one naming another than its reservation's is refused in its
        batch and touches no row.)"""
        until = self._apart_until.get(company_id)
        if until is None:
            return None
        if until <= now:
            del self._apart_until[company_id]
            return None
        return company_id

    def _stalled(self, company_id: str) -> None:
        """`company_id`'s settlement met its row held: it settles apart for a while."""
        if company_id not in self._apart_until:
            log.warning(
                "company %s's settlement waited for its row past the bound; it settles"
                " apart for %.0f s",
                company_id,
                APART_SECONDS,
            )
        self._apart_until[company_id] = asyncio.get_running_loop().time() + APART_SECONDS

    async def _run(self, lane: str | None) -> None:
        # This task's own context: an apart lane's calls are its company's, the
        # shared lane's nobody's (`db_shares`), whichever request started it.
        db_shares.acting_for(lane)
        queue = self._queues[lane]
        batch: list[_Queued] = []
        try:
            while queue:
                batch = next_batch(queue, self._max_batch)
                await self._settle(batch)
        finally:
            # Cancelled (shutdown) or broken: whoever still waits gets a 503, which
            # the edge retries, rather than a request that never ends: the one any
            # database outage answers (`database_unavailable`, ``Retry-After: 1``),
            # since it is one to the caller. A batch cut off mid-transaction rolled
            # back; one cut off mid-commit is found settled by the retry (a duplicate).
            for _, future, _ in [*batch, *queue]:
                if not future.done():
                    future.set_exception(DatabaseUnavailable())
            queue.clear()
            # Nothing is queued between the loop's end and here (no await): the
            # lane's next webhook finds no drain and starts one.
            del self._queues[lane]
            del self._drains[lane]

    async def _settle(self, batch: list[_Queued]) -> None:
        deliveries = [delivery for delivery, _, _ in batch]
        lates = [late for _, _, late in batch]
        results: list[Outcome | BaseException] = []
        silent: DatabaseTimeout | None = None
        batched = len(deliveries) > 1  # a lone webhook takes its own path, unbounded
        attempt = lost_settlements.marked(deliveries)
        try:
            if batched:
                results.extend(
                    await self._db.transaction(
                        functools.partial(
                            settle_webhooks,
                            deliveries=attempt.deliveries,
                            lock_wait=self._lock_wait,
                        ),
                        late=functools.partial(_settled_late, lates),
                    )
                )
        except DatabaseTimeout as exc:
            silent = exc
        except Exception as exc:
            if outcome_unknown(exc):
                # Its COMMIT's answer lost: it may have committed, and each event
                # on its own is then a duplicate. What it settled goes to the
                # deliveries' `late`s once read back (`lost_settlements`).
                lost_settlements.read_back(self._db, attempt, lates, lost_backend(exc))
            # Rolled back as a whole (or committed: its events are duplicates now).
            # Each event on its own.
            log.info("settlement batch of %d rolled back (%r); one by one", len(batch), exc)
        if not results:
            # In its own transaction: a failing one answers its error, others settle.
            for delivery, late in zip(deliveries, lates, strict=True):
                if silent is not None:
                    # The database went silent: the rest would each wait the whole
                    # bound again, one after the other. All get the 503 the edge
                    # retries (a settlement that commits late is then a duplicate,
                    # and its commit goes to its `late`).
                    results.append(silent)
                    continue
                try:
                    # Its lock waits bounded too: the event whose company's row is
                    # held fails alone (503, retried), the others settle.
                    lock_wait = self._lock_wait if batched else None
                    results.append(
                        await settle_delivery(self._db, delivery, late, lock_wait=lock_wait)
                    )
                except DatabaseTimeout as settle_error:
                    silent = settle_error
                    results.append(settle_error)
                    # Alone, past the bound: a held row (or a silent database, when
                    # settling apart costs nothing).
                    self._stalled(delivery.event.company_id)
                except Exception as settle_error:
                    results.append(settle_error)
                    if _lock_given_up(settle_error):
                        self._stalled(delivery.event.company_id)
        for (_, future, _), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Outcome):
                future.set_result(result)
            else:
                future.set_exception(result)

    async def close(self) -> None:
        """Let the batches under way (and what is queued) finish."""
        await asyncio.gather(*self._drains.values(), return_exceptions=True)


def next_batch(queue: list[_Queued], max_batch: int) -> list[_Queued]:
    """The next batch, taken out of `queue`: its companies in turn, in the order they
    first appear, each one's events in their order, up to `max_batch` events and
    `MAX_BATCH_CHARS` of transcripts (at least one event). Kept in queue order, so a
    redelivery still follows its first delivery."""
    turns: dict[str, list[int]] = {}
    for index, (delivery, _, _) in enumerate(queue):
        turns.setdefault(delivery.event.company_id, []).append(index)
    taken: list[int] = []
    chars = 0
    rounds = [iter(indexes) for indexes in turns.values()]
    while rounds and len(taken) < max_batch:
        for events in list(rounds):
            turn = next(events, None)
            if turn is None:
                rounds.remove(events)
                continue
            size = transcript_weight(queue[turn][0])
            if taken and chars + size > MAX_BATCH_CHARS:
                rounds.clear()
                break
            taken.append(turn)
            chars += size
            if len(taken) == max_batch:
                break
    chosen = set(taken)
    batch = [queue[index] for index in sorted(chosen)]
    queue[:] = [queued for index, queued in enumerate(queue) if index not in chosen]
    return batch


def _lock_given_up(exc: BaseException) -> bool:
    """A statement that waited for a row lock past its ``lock_timeout`` (55P03)."""
    cause = exc.orig if isinstance(exc, sqlalchemy.exc.DBAPIError) else exc
    return isinstance(cause, psycopg.errors.LockNotAvailable)


def _left_late(late: Late, future: asyncio.Future[Outcome]) -> None:
    """What a cancelled webhook's delivery settled, once its batch has committed; a
    refusal or an error (the 503's own `late`, `_settled_late`) is nobody's."""
    if not future.cancelled() and future.exception() is None:
        settled_late(late, future.result())


def _settled_late(lates: list[Late | None], results: list[Outcome | AppError]) -> None:
    """A batch that committed after its webhooks were told 503: what each settled
    delivery's commit implies (`webhook_settlement.Late`)."""
    for late, result in zip(lates, results, strict=True):
        if late is not None:
            settled_late(late, result)
