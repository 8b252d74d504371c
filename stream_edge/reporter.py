"""A stream's usage report, made once whatever ended it: the stream's metrics and
log line, then the webhook event into the outbox together with the stream's slots."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from shared.retry import Backoff
from shared.store import SlotRelease
from shared.tokens import StreamGrant
from stream_edge import thought_signatures
from stream_edge.attempts import Backend
from stream_edge.cancellation import despite_cancellation
from stream_edge.limits import slot_keys
from stream_edge.state import EdgeState
from stream_edge.usage_report import usage_event

# The stream's log lines keep the job's logger name: operators filter on it.
log = logging.getLogger("llmgw.edge.jobs")

# A store hiccup is retried briefly; past that the report goes to the local spool
# (see `Outbox.keep`), so a longer wait here would only hold the stream's end up.
ENQUEUE_ATTEMPTS = 3
# Full jitter under ceilings of 0.2 s and 0.4 s: on average the 0.1 s and 0.2 s the
# waits were before they were jittered, without every stream retrying at once.
ENQUEUE_BACKOFF = Backoff(base=0.2, cap=1.0)
# All the attempts together: a store that stops answering (a partition, a failover to
# a silent address) fails a command only after the pipelined connection's 20 s
# reply timeout, and the stream's end runs under a 10 s limit
# (`EventStream.finish_timeout`) that would cancel the report before the spool. Past
# this budget the report goes to the spool: an enqueue that did land meanwhile is
# a second delivery of one webhook id, which the receiver charges once.
ENQUEUE_BUDGET_SECONDS = 4.0
# Giving the slots back apart, once the report is spooled (which gives them back
# when the store takes it): a try, not a wait on a store that is failing.
RELEASE_BUDGET_SECONDS = 1.0


@dataclass(slots=True)
class Reporter:
    """One stream's report: `started` when it opens, `report` once it ends (or fails
    before it could open); later calls of `report` do nothing."""

    state: EdgeState
    grant: StreamGrant
    accepted_at: float
    backoff: Backoff = ENQUEUE_BACKOFF
    enqueue_budget: float = ENQUEUE_BUDGET_SECONDS
    _reported: bool = field(default=False, init=False)
    _counted_active: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        # Made once the stream's slots are taken: owed a report from here on.
        self.state.reports_owed += 1

    def started(self) -> None:
        """The stream counts as active from here until its report."""
        self.state.metrics.streams_active.inc()
        self._counted_active = True

    async def report(self, backend: Backend, status: str) -> None:
        """Release the stream's slots and enqueue the usage webhook, once: `backend`
        is what served (or was last tried), `status` the webhook's."""
        if self._reported:
            return
        self._reported = True
        # Run to its end whatever cancels the caller: it is made once, so a report cut
        # off (the server cancelling the request once its graceful time is over, which
        # anyio's shields do not stop) was never stored, nor spooled, nor made again.
        # Bounded: the enqueue's budget, then the spool.
        reporting = asyncio.ensure_future(self._report(backend, status))
        try:
            await asyncio.shield(reporting)
        except asyncio.CancelledError:
            await despite_cancellation(reporting)
            raise
        finally:
            self.state.reports_owed -= 1

    async def _report(self, backend: Backend, status: str) -> None:
        grant = self.grant
        event = usage_event(
            grant,
            backend.provider.name,
            backend.meter,
            status,
            backend.model.id,
            ended=self.state.store_clock(),
        )
        metrics = self.state.metrics
        if self._counted_active:
            metrics.streams_active.dec()
        metrics.streams_total.labels(status).inc()
        duration = time.perf_counter() - self.accepted_at
        metrics.duration.observe(duration)
        metrics.tokens.labels("input").inc(event.input_tokens)
        metrics.tokens.labels("output").inc(event.output_tokens)
        log.info(
            "stream %s",
            status,
            extra={
                "company_id": grant.company_id,
                "model": backend.model.id,
                "provider": backend.provider.name,
                "status": status,
                "input_tokens": event.input_tokens,
                "output_tokens": event.output_tokens,
                "usage_source": event.usage_source,
                "duration_ms": round(duration * 1000, 1),
            },
        )
        if backend.meter.signatures:
            # Before the report: a session's next turn starts once it is settled, and
            # then finds them (bounded by the module's own budget; a failure is logged).
            await thought_signatures.save(
                self.state.store, grant.company_id, backend.meter.signatures
            )
        # The slots go back in the same round trip as the report is stored.
        release = SlotRelease(slot_keys(grant), grant.jti)
        outbox = self.state.outbox
        try:
            async with asyncio.timeout(self.enqueue_budget):
                for attempt in range(ENQUEUE_ATTEMPTS):
                    try:
                        await outbox.enqueue(event, release)
                        return
                    except Exception as exc:  # the store is overloaded or briefly down
                        log.warning("enqueueing usage failed (%s)", type(exc).__name__)
                        if attempt + 1 < ENQUEUE_ATTEMPTS:
                            await asyncio.sleep(self.backoff.delay(attempt))
        except TimeoutError:
            log.warning("the store did not take the usage report in %g s", self.enqueue_budget)
        # Still refused: the report waits in the local spool (and is posted at once),
        # and the slots go back on their own — not held until the stream's maximum
        # life for want of the outbox write they normally share.
        await outbox.keep(event, release)
        try:
            # Bounded: a store that did not take the report may not answer at all.
            async with asyncio.timeout(RELEASE_BUDGET_SECONDS):
                await self.state.store.release_slots(release)
        except Exception as exc:  # the spooled report releases them once stored
            log.warning("could not release the stream's slots: %s", type(exc).__name__)
