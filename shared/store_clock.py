"""The shared store's clock, read without a round trip.

Fixed windows are named by their start (``rl:init:user:<id>:<start>``, the TPM and
login windows): processes sharing a store must agree on the minute, or each counts
in a window of its own and a caller spreading its requests over replicas whose clocks
disagree gets each one's limit (measured: two control planes ten minutes apart let a
member make 8 inits a minute past a limit of 4). Every process reads the store's
time (Redis's ``TIME``) now and then and runs it on here on its own monotonic clock,
so the hosts' wall clocks do not matter; until the first reading, and whenever the
store cannot answer, the last reading goes on (the host's wall clock before any).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("shared.store_clock")

# How often the reading is renewed: a monotonic clock drifts by parts per million,
# but a paused VM's stands still while it is paused, until the next reading.
SYNC_SECONDS = 15.0
# How often a process that has no reading yet (its store was down when it started)
# asks again: until then it runs on its host's clock, which may be minutes off.
FIRST_READING_RETRY_SECONDS = 0.5


class TimeSource(Protocol):
    async def server_time(self) -> float: ...


class StoreClock:
    """`now()`: the store's time as of the latest reading plus the time passed since on
    `monotonic`. `wall`: the time before any reading."""

    def __init__(
        self,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._monotonic = monotonic
        self._wall = wall
        self._reading: tuple[float, float] | None = None  # (store time, monotonic then)
        self._read = asyncio.Event()
        self._warned_at: float | None = None  # (monotonic) the last failure logged

    def now(self) -> float:
        if self._reading is None:
            return self._wall()
        at, then = self._reading
        return at + (self._monotonic() - then)

    def learn(self, store_time: float, sent: float, received: float) -> None:
        """A reading of the store's clock, asked at `sent` and answered at `received`
        (both on `monotonic`): taken as of halfway, the round trip's error halved."""
        self._reading = (store_time, (sent + received) / 2)
        self._read.set()

    @property
    def has_reading(self) -> bool:
        return self._reading is not None

    async def first_reading(self) -> None:
        """Return once the store's clock has been read (`run` keeps asking)."""
        await self._read.wait()

    async def sync(self, store: TimeSource) -> bool:
        """Read the store's clock once; False (the last reading kept) when it fails."""
        sent = self._monotonic()
        try:
            store_time = await store.server_time()
        except Exception as exc:
            # At most once a period, as before the retries: a store down at start is
            # asked twice a second; one that refuses TIME alone (an ACL) keeps the
            # edge's deliverer waiting and must stay in the logs.
            if self._warned_at is None or sent - self._warned_at >= SYNC_SECONDS:
                log.warning("could not read the store's clock: %r", exc)
                self._warned_at = sent
            return False
        self._warned_at = None
        self.learn(store_time, sent, self._monotonic())
        return True

    async def run(self, store: TimeSource, every: float = SYNC_SECONDS) -> None:
        """Read now, then keep the reading fresh until cancelled (a lifespan's task:
        a store slow to answer at start never holds the start up). Without a first
        reading, ask again soon: a store that was down at start and answers again
        must not be written times on the host's clock until the next full period
        (the edge's deliverer waits for it, `first_reading`)."""
        while True:
            await self.sync(store)
            await asyncio.sleep(every if self._read.is_set() else FIRST_READING_RETRY_SECONDS)
