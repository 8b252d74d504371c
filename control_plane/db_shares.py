"""Each company's share of the database threads: at most `per_company` of a process's
`db.POOL_SIZE` threads hold one company's calls at once (review: locks).

Every init's hold and settlement update the company's row, and most of an owner's
admin writes (teams, budgets, agents, the webhook, providers, roles, owners) take
that row first: a company's calls wait for each other in PostgreSQL, each on a
database thread. An owner who keeps its row busy (a team of 1,000 members swapped:
1 to 1.4 s under the lock, measured; thirty such writes at once) while its own inits and
writes keep arriving had every thread of the process waiting on its one row, and
every other company's inits, logins and settlements waited for a thread in turn
(measured: another company's init waited 6 to 7 s; with the row held past the bound,
503 `database_unavailable`). A company's calls past its share wait in the event
loop, on its own gate, within the same bound (`LLMGW_DATABASE_TIMEOUT_SECONDS`,
503 past it): the shared queue never fills with one company's calls. A company
gets no faster with more threads than its share (its holds serialise on its row:
5 to 40 threads measured the same), so the share costs it nothing (one company's
inits, 32 at once, on a loaded 2-CPU machine: 192 to 300/s with it, 207 to 308/s
without).

Whose call it is: the company of the request's caller, set when it is
authenticated (`acting_for`) and read by `Database` on every call; a call of no
company (the platform admin, the edge's webhooks, logins before the password
check, the sweeper) is not counted. Work shared by callers of several companies
(the signing-key read every init may join) runs as no company's (`shared_task`), so
that no company's gate holds another company up. A slot is given back when the
thread is done with the call, not when its caller stops waiting: a call past its
bound still holds its thread. The gates are per process, as the threads are.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from control_plane.db_threads import DatabaseTimeout

T = TypeVar("T")

_company: contextvars.ContextVar[str | None] = contextvars.ContextVar("db_company", default=None)


def acting_for(company_id: str | None) -> None:
    """The rest of this request's database calls are `company_id`'s (None: nobody's)."""
    _company.set(company_id)


def current() -> str | None:
    return _company.get()


def shared_task(work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """`work` as a task whose database calls count against no company: callers of
    several companies wait on it, so no one company's gate may hold it."""
    context = contextvars.copy_context()
    context.run(_company.set, None)
    return asyncio.get_running_loop().create_task(work, context=context)


@dataclass
class _Company:
    gate: asyncio.Semaphore
    callers: int = 0  # holding a slot or waiting for one


class DbShares:
    """The gates of every company with a call in flight (none kept for the others)."""

    def __init__(self, per_company: int) -> None:
        self.per_company = per_company
        self._companies: dict[str, _Company] = {}

    def waiting(self, company_id: str) -> int:
        """How many of the company's calls wait for a slot (tests, metrics)."""
        company = self._companies.get(company_id)
        if company is None:
            return 0
        return max(0, company.callers - self.per_company)

    async def enter(self, company_id: str, timeout: float) -> Callable[[], None]:
        """A slot of `company_id`'s share, waited for at most `timeout` seconds
        (`DatabaseTimeout` past it); returns what gives it back (call it once). Free
        slot: no wait, no task, no timer (init's hot path)."""
        company = self._companies.get(company_id)
        if company is None:
            company = self._companies[company_id] = _Company(asyncio.Semaphore(self.per_company))
        company.callers += 1
        try:
            if company.gate.locked():
                try:
                    async with asyncio.timeout(timeout):
                        await company.gate.acquire()
                except TimeoutError:
                    raise DatabaseTimeout(
                        f"the company's database calls did not get a thread within {timeout:g} s"
                    ) from None
            else:
                await company.gate.acquire()  # free: returns without yielding
        except BaseException:
            self._left(company_id, company)
            raise
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                company.gate.release()
                self._left(company_id, company)

        return release

    def _left(self, company_id: str, company: _Company) -> None:
        company.callers -= 1
        if company.callers == 0:
            del self._companies[company_id]
