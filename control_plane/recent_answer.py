"""An answer computed at most once per interval, shared by everyone who asks.

The anonymous routes that read the database (`/.well-known/jwks.json`, `/readyz`,
and `/metrics`' hold count) would otherwise give a flood of requests one database
transaction each, on the threads that logins, inits and settlements wait for. With
this, however many ask, one computation runs at a time and its answer serves every
request for `max_age` seconds (a second: no client can tell, the JWKS is served
with `max-age=60` anyway).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class RecentAnswer(Generic[T]):
    def __init__(
        self,
        compute: Callable[[], Awaitable[T]],
        max_age: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._compute = compute
        self._max_age = max_age
        self._clock = clock
        self._answer: tuple[float, T] | None = None
        self._inflight: asyncio.Future[T] | None = None
        self._generation = 0  # bumped by `forget`: an answer begun before is not kept

    async def get(self) -> T:
        """The last answer if it is recent; else the one being computed, or a new
        computation. A failure is not kept: the next caller computes again."""
        if self._answer is not None and self._clock() - self._answer[0] < self._max_age:
            return self._answer[1]
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._run(self._generation))
        # Shielded: a caller that leaves must not cancel the others' answer.
        return await asyncio.shield(self._inflight)

    def forget(self) -> None:
        """The next caller computes afresh (what the answer reads has just changed
        here: a signing key rotated by this process)."""
        self._answer = None
        self._inflight = None
        self._generation += 1

    async def _run(self, generation: int) -> T:
        started = self._clock()
        answer = await self._compute()
        if generation == self._generation:
            self._answer = (started, answer)
        return answer
