"""The console's heavy reads (usage aggregates, TTFT percentiles, audit searches): a
bounded and fair share of the database for each company.

A heavy read scans up to a year of one company's rows: seconds of a database thread
for a large company (a million usage records: 1.5 s for a year's summary on an idle
machine, 3 to 5 s under load). Three rules keep one owner from starving the rest:

* at most `THREADS` heavy reads take a database thread at once in a process (the
  others of `db.POOL_SIZE` stay free for inits, settlements and logins);
* at most `RUNNING_PER_COMPANY` of them belong to one company, and at most
  `WAITING_PER_COMPANY` more of that company wait for their turn (on the company's
  own gate, not in the shared queue): past that, 429 `too_many_heavy_reads` with
  ``Retry-After``. So the shared queue holds at most one read per company, and a
  company's burst never stands between another company and a thread (measured
  before: ten summaries from one owner made another owner's empty summary wait 10 s);
* on PostgreSQL each statement of a heavy read is cancelled after
  `STATEMENT_TIMEOUT_MS` (``SET LOCAL statement_timeout``, so it ends with the
  transaction and suits PgBouncer's transaction mode); the caller gets 503
  `query_timeout` with ``Retry-After``, never a 500. SQLite has no statement timeout:
  it is the single-process development database.

The gates are per process, as the database threads they protect are; a company
served by N control planes runs at most N heavy reads at once.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import psycopg
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from control_plane.db import Database
from control_plane.errors import QueryTimeout, TooManyHeavyReads
from control_plane.policy import Principal

T = TypeVar("T")

THREADS = 2
RUNNING_PER_COMPANY = 1
# The console's dashboard asks for four aggregates at once (console.js): they wait
# their turn rather than fail.
WAITING_PER_COMPANY = 7
# A year's summary of a million records by day, model, user and key: 1.5 s measured
# on an idle machine, 3 to 5 s under load; twice that is still an answer.
STATEMENT_TIMEOUT_MS = 10_000
BUSY_RETRY_AFTER_S = 2
# The platform admin token has no company: its reads share one gate of their own.
PLATFORM = "platform"


def caller_key(principal: Principal) -> str:
    """Whose share a heavy read counts against: the caller's company."""
    return principal.company_id or PLATFORM


@dataclass
class _Company:
    gate: asyncio.Semaphore
    callers: int = 0  # running or waiting


@dataclass
class HeavyReads:
    """Runs the heavy reads of every company through the rules above."""

    db: Database
    threads: int = THREADS
    running_per_company: int = RUNNING_PER_COMPANY
    waiting_per_company: int = WAITING_PER_COMPANY
    timeout_ms: int = STATEMENT_TIMEOUT_MS
    _shared: asyncio.Semaphore = field(init=False)
    _companies: dict[str, _Company] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._shared = asyncio.Semaphore(self.threads)

    @asynccontextmanager
    async def _turn(self, key: str) -> AsyncIterator[None]:
        company = self._companies.get(key)
        if company is None:
            company = self._companies[key] = _Company(asyncio.Semaphore(self.running_per_company))
        elif company.callers >= self.running_per_company + self.waiting_per_company:
            raise TooManyHeavyReads(
                "Your company already has as many console queries running or waiting as "
                "it may; retry when they have answered.",
                BUSY_RETRY_AFTER_S,
            )
        company.callers += 1
        try:
            # The company's gate first: the shared queue then holds one read per company.
            async with company.gate, self._shared:
                yield
        finally:
            company.callers -= 1
            if company.callers == 0:
                del self._companies[key]

    async def run(self, key: str, fn: Callable[[Session], T]) -> T:
        """``fn(session)`` in one transaction on a database thread, once `key`'s
        company and the process have a place for it, under the statement timeout."""
        async with self._turn(key):
            try:
                # Its own statement timeout answers first (`query_timeout`); the
                # database's bound, past it, is for a database gone silent.
                return await self.db.transaction(
                    functools.partial(_timed, self.timeout_ms, fn),
                    timeout=self.timeout_ms / 1000 + self.db.timeout,
                )
            except DBAPIError as exc:
                if isinstance(exc.orig, psycopg.errors.QueryCanceled):
                    raise QueryTimeout(
                        "The query took too long and was stopped; narrow the date range or "
                        "the grouping, or retry later.",
                        retry_after=-(-self.timeout_ms // 1000),
                    ) from None
                raise


def _timed(timeout_ms: int, fn: Callable[[Session], T], session: Session) -> T:
    if session.get_bind().dialect.name == "postgresql":
        # `set_config(…, true)` is SET LOCAL with a bound value: it lasts until the
        # transaction ends, so the pooled connection goes back with its default.
        session.execute(select(func.set_config("statement_timeout", str(timeout_ms), True)))
    return fn(session)
