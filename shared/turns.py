"""Slots shared by owners (companies) taking turns: a freed slot goes to the waiting
owner whose latest slot is oldest, so one owner's queue never stands in front of
another's whole (the password checks of `control_plane.password_checks`, the edge's
direct report posts of `stream_edge.outbox`)."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Turns:
    """`slots` slots handed out by turns: a freed slot goes to the waiting owner whose
    latest slot is oldest, so one owner's queue never stands in front of another's
    whole. An owner that comes with none joins the round just before the owner
    served last: ahead of those served since it came, behind those served before.
    Ahead of every owner that had a slot (as it was), a steady stream of newcomers,
    one check each as fast as the slots served them, kept an owner's second check
    waiting for as long as they came (measured: 49 newcomers served, it still waiting)."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        # Owners with a waiter, in the order their first waiter came.
        self._waiting: dict[str | None, deque[asyncio.Future[None]]] = {}
        self._holding: dict[str | None, int] = {}
        # When each owner with a waiter or a slot got its latest slot (a newcomer:
        # just before the latest slot handed out when it came).
        self._latest: dict[str | None, float] = {}
        self._stamps = itertools.count()
        self._last_stamp = -1

    def count(self, owner: str | None) -> int:
        """`owner`'s slots held and waiters queued now."""
        return self._holding.get(owner, 0) + len(self._waiting.get(owner, ()))

    async def acquire(self, owner: str | None) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            self._granted(owner)
            return
        turn = asyncio.get_running_loop().create_future()
        self._latest.setdefault(owner, self._last_stamp - 0.5)
        queue = self._waiting.setdefault(owner, deque())
        queue.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release(owner)  # handed a slot as it was cancelled: pass it on
            else:
                if turn in queue:  # not yet skipped by a `release`
                    queue.remove(turn)
                if not queue and self._waiting.get(owner) is queue:
                    del self._waiting[owner]
                self._forget(owner)
            raise

    def release(self, owner: str | None) -> None:
        held = self._holding.pop(owner) - 1
        if held:
            self._holding[owner] = held
        self._forget(owner)
        while self._waiting:
            # `min` keeps the first of equals: the owner waiting longest.
            nxt = min(self._waiting, key=lambda o: self._latest[o])
            queue = self._waiting[nxt]
            turn = queue.popleft()
            if not queue:
                del self._waiting[nxt]
            if not turn.done():
                turn.set_result(None)
                self._granted(nxt)
                return
            self._forget(nxt)
        self._free += 1

    def _granted(self, owner: str | None) -> None:
        self._holding[owner] = self._holding.get(owner, 0) + 1
        self._last_stamp = next(self._stamps)
        self._latest[owner] = self._last_stamp

    def _forget(self, owner: str | None) -> None:
        if owner not in self._holding and owner not in self._waiting:
            self._latest.pop(owner, None)

    @asynccontextmanager
    async def held(self, owner: str | None) -> AsyncIterator[None]:
        """A slot in `owner`'s turn for the block's length."""
        await self.acquire(owner)
        try:
            yield
        finally:
            self.release(owner)
