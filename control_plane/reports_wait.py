"""When a hold long past its deadline with no checkpoint may be released: not until
the sweeper has seen the database and the store for `REPORTS_WAIT_SECONDS`.

A stream's checkpoint outlives its hold's deadline by
`shared.checkpoints.KEPT_PAST_DEADLINE_SECONDS` (an hour), so a hold past its
deadline by less with no checkpoint had no stream: it is released at once (DESIGN
§5). A hold past it by more exists only when nothing could reconcile it for an hour
(PostgreSQL or the control plane away, the store away): its stream may have run and
ended during the outage, its report waiting in an edge's outbox (retried with
backoff, at most ``LLMGW_WEBHOOK_RETRY_CAP_SECONDS`` apart, 300 s by default) and its
checkpoint expired meanwhile. The sweeper's first pass comes seconds after the
database answers, before those reports; released then, the report that arrived a
minute later was a duplicate and the stream went unbilled (measured: 12 + 300 tokens
reported after the release, the balance untouched). Such a hold now waits until the
sweeper has seen the database and the store for `REPORTS_WAIT_SECONDS` without a
break (from the process's start too: it cannot tell a restart from a recovery); a
report that comes meanwhile settles it, else it is released then. Only after an
outage does this hold anything: holds that old are otherwise never left.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Two of the edge outbox's longest default waits: each report queued during the
# outage is retried at least once within it, with room for a backlog.
REPORTS_WAIT_SECONDS = 600.0


class ReportsWait:
    """How long the sweeper has seen the database and the store without a break, on
    this process's monotonic clock."""

    def __init__(
        self, wait: float = REPORTS_WAIT_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.wait = wait
        self._clock = clock
        self._since: float | None = None

    def seen(self) -> None:
        """A pass read the database and the store."""
        if self._since is None:
            self._since = self._clock()

    def lost(self) -> None:
        """A pass could not: the wait starts again once they answer."""
        self._since = None

    def over(self) -> bool:
        """Whether reports queued during an outage have had their time to arrive."""
        return self._since is not None and self._clock() - self._since >= self.wait
