"""Password hashing's share of the process: a few argon2 runs at once, a short queue
behind them, and a fast 503 past it.

One argon2id verify with argon2-cffi's defaults (t=3, m=64 MiB, p=4) costs ~200 ms of
CPU and 64 MiB, on four threads. `asyncio.to_thread` ran as many at once as the
default executor has threads (CPUs + 4) and queued the rest without bound, on the
CPUs that inits and settlements need (measured on 2 CPUs, `bench/login_load.py`:
eight clients looping logins took init from p50 6 ms / p95 12 ms to 61 / 177 ms and
the RSS from 122 to 507 MiB; 150 logins at once took 35 s to drain, a real login
waiting 13 s behind them).

Here a password check needs a *place* first: at most `slots` run and `waiting` more
wait their turn (in order); a login finding every place taken is refused at once
with 503 `logins_busy` and ``Retry-After``, before it costs a database lookup or a
hash. So the hashing never holds more than `slots` x 64 MiB, and a fresh login waits
behind at most `waiting` others. The bound is per process, as the CPUs it protects.

The places are shared by every company, so each check also names its *owner*: for
a sign-in, the client's address (`login_owner`), for a new user's hash the creating
caller's company. An owner holds at most
`share` of the places (half; its next check is the same fast 503), and the slots go
round the owners with a check waiting, one check each in turn. Before, one company's
members signing in with their right passwords, each far inside its own per-account
rate, held every place, and another company's member was refused 503 at every try
(measured on 2 CPUs, 40 members of one company looping: the other company's member
15 of 15 logins 503, 0.3 s each when alone). A sign-in's owner is read from the
request, never from the account found: owned by the account's company, an unknown
email's check was nobody's, so a prober holding that share of the places got 503 for
an unknown email and a check for a real account's (measured: 503 against a place).
Nor from the email's domain, which a company's owner chooses for each member it
creates: members at the victim company's domain held its share, members at a domain
each took every place, from one host with their right passwords (measured: the
victim's member 503 at once).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from control_plane import login_limits
from control_plane.errors import LoginsBusy
from shared.turns import Turns

T = TypeVar("T")

# Each check already runs its four argon2 lanes on four threads: one check per two
# CPUs leaves the other half (and more, between checks) to inits and settlements.
CPUS_PER_SLOT = 2
# A login waits behind at most this many checks per slot (~6 s on an idle 2-CPU box
# for one address's half, ~13 s for the whole queue) before it is told to come back.
# Waiting costs no CPU and no argon2 memory, so the queue is long enough for a burst
# of honest sign-ins (a team logging in at nine, a client's test suite signing users
# in at once); past it, waits only grow. Since an address holds at most half of the
# places (`OWNER_SHARE_PERCENT`), the queue is twice what one burst needs: one
# address's burst of 33 on 2 CPUs still waits its turn, as it did before the shares.
WAITING_PER_SLOT = 65
BUSY_RETRY_AFTER_S = 1
# The part of the places one owner (a client's address, a company) may hold: the
# rest stays for the others.
OWNER_SHARE_PERCENT = 50


def default_slots() -> int:
    """One check per `CPUS_PER_SLOT` CPUs this process may run on, at least one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // CPUS_PER_SLOT)


@dataclass
class PasswordChecks:
    """The process's password-hashing gate (`place`, then `run`)."""

    slots: int = field(default_factory=default_slots)
    waiting: int = -1  # -1: `WAITING_PER_SLOT` per slot
    _inside: int = field(init=False, default=0)
    _running_now: int = field(init=False, default=0)
    _turns: Turns = field(init=False)

    def __post_init__(self) -> None:
        if self.waiting < 0:
            self.waiting = WAITING_PER_SLOT * self.slots
        self._turns = Turns(self.slots)

    @property
    def share(self) -> int:
        """The checks one owner may have waiting or running at once."""
        return max(1, (self.slots + self.waiting) * OWNER_SHARE_PERCENT // 100)

    @property
    def inside(self) -> int:
        """Checks running or waiting now."""
        return self._inside

    @property
    def running(self) -> int:
        """Hashes on a thread now (a caller that stopped waiting counts until done)."""
        return self._running_now

    def owned(self, owner: str | None) -> int:
        """`owner`'s checks waiting or running now (at most `share`)."""
        return self._turns.count(owner)

    @property
    def full(self) -> bool:
        """Every place is taken: a login would get `LoginsBusy` from `place`."""
        return self._inside >= self.slots + self.waiting

    def refuses(self, owner: str) -> bool:
        """Whether a check of `owner`'s would be refused now: every place taken, or
        `owner` at its share. Asked before the counters and the lookup, so that a
        host's logins retrying at its share cost nothing (or they would hold
        places in their lookups, which the others need)."""
        return self.full or self._turns.count(owner) >= self.share

    @asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        """Hold a place for one login's check, or LoginsBusy (503) when all are taken.
        Taken before the login's database lookup, so a refused one costs nothing."""
        if self.full:
            raise LoginsBusy(BUSY_RETRY_AFTER_S)
        self._inside += 1
        try:
            yield
        finally:
            self._inside -= 1

    async def run(self, fn: Callable[..., T], *args: object, owner: str | None = None) -> T:
        """``fn(*args)`` (a hash or a verify) on a thread, once `owner`'s turn gives
        it one of the `slots`; LoginsBusy (503) at once when `owner` already has its
        `share` of checks waiting or running. A slot (and the owner's count) is freed
        when the thread is done, not when the caller stops waiting: a cancelled caller
        cannot let more than `slots` hashes run."""
        # The owner's count is its turns' (slots held, waiters queued): a slot is
        # released when the thread is done, so a running hash counts until then.
        if self._turns.count(owner) >= self.share:
            raise LoginsBusy(BUSY_RETRY_AFTER_S)
        await self._turns.acquire(owner)
        try:
            work = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except BaseException:
            self._turns.release(owner)
            raise
        self._running_now += 1
        work.add_done_callback(lambda _: self._done(owner))
        return await asyncio.shield(work)

    def _done(self, owner: str | None) -> None:
        self._running_now -= 1
        self._turns.release(owner)


def login_owner(host: str | None) -> str:
    """A sign-in's owner of checks: the client's address as its failures count it
    (`login_limits.client_bucket`; an IPv6 client's /48, where an attacker's /64s
    are free), the same whether an account has the email typed or not, and none a
    company's owner picks for its members, as it does their emails' domains."""
    return "address:" + (login_limits.site_bucket(host) or login_limits.client_bucket(host))


def company_owner(company_id: str | None) -> str:
    """A hash made for a company's caller (a new user's password); the platform
    admin's own company when it has none (the admin token)."""
    return "company:" + (company_id or "")
