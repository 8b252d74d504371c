"""One sweep pass's failures, reservation by reservation: a poison pill stops no pass.

The sweeper's passes serve every company. Before, the first reservation whose
reconciliation raised (a row whose write the database refuses, a company row held
by a long transaction, a bug) ended the pass; the next pass listed the same
reservation first again (oldest deadline first), so no other company's expired hold
was ever released or settled for as long as that one kept failing.

Now a failing reservation is skipped for the rest of the pass and the pass goes on;
the pass then raises its first failure, so the sweeper's loop still logs it once,
with its traceback, and the next pass tries the reservation again. A failure of the
database itself (no answer within the bound, a lost connection, a lock it gave up
waiting for: `DATABASE_ERRORS`) also skips the rest of that reservation's company (a
lock held on its row would hold each of them: a thread each), and a second one ends
the pass: the database is then everyone's problem, and each call would wait its
bound again.
"""

from __future__ import annotations

import logging

import psycopg
import sqlalchemy.exc

from control_plane.db_threads import DatabaseTimeout

log = logging.getLogger("control_plane.sweeper")

# The database unable to run a call, rather than refusing this one reservation's.
DATABASE_ERRORS: tuple[type[Exception], ...] = (
    sqlalchemy.exc.OperationalError,
    psycopg.OperationalError,
    DatabaseTimeout,
)


class PassFailures:
    """What failed in one pass (`what`: the pass's name, for the log)."""

    def __init__(self, what: str) -> None:
        self._what = what
        self.first: Exception | None = None
        self.skipped = 0
        self._companies: set[str] = set()
        self._database_errors = 0

    def skips(self, company_id: str) -> bool:
        """Whether this company's reservations wait for the next pass (the database
        failed on one of them in this one)."""
        return company_id in self._companies

    def failed(self, reservation_id: str, company_id: str, exc: Exception) -> None:
        """`reservation_id` was not reconciled: skipped for the rest of the pass."""
        self.skipped += 1
        if self.first is None:
            self.first = exc
        if isinstance(exc, DATABASE_ERRORS):
            self._database_errors += 1
            self._companies.add(company_id)
        log.warning(
            "%s: reservation %s of company %s not reconciled (%s); skipped this pass",
            self._what,
            reservation_id,
            company_id,
            type(exc).__name__,
        )

    @property
    def stops(self) -> bool:
        """Whether the pass should end now: the database failed twice."""
        return self._database_errors >= 2

    def raise_first(self) -> None:
        """The pass is over: raise its first failure, if any (the loop logs it)."""
        if self.first is not None:
            log.error("%s: %d reservations skipped this pass", self._what, self.skipped)
            raise self.first
