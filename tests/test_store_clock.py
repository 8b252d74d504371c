"""`shared.store_clock`: the store's time, read now and then and run on locally."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from shared.store_clock import StoreClock


class Ticking:
    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


class Source:
    """A store whose clock reads `time`, each read taking `trip` of the monotonic
    clock; `fails`: it cannot answer."""

    def __init__(self, monotonic: Ticking, time: float, trip: float = 0.0) -> None:
        self.monotonic, self.time, self.trip, self.fails = monotonic, time, trip, False

    async def server_time(self) -> float:
        if self.fails:
            raise ConnectionError("store down")
        self.monotonic.at += self.trip
        return self.time


async def test_the_store_clock_runs_on_from_its_reading_whatever_the_hosts_wall_says() -> None:
    monotonic, wall = Ticking(100.0), Ticking(5_000.0)  # the host's wall clock far off
    clock = StoreClock(monotonic=monotonic, wall=wall)
    assert clock.now() == 5_000.0  # no reading yet: the host's
    store = Source(monotonic, 1_000.0, trip=0.2)
    assert await clock.sync(store)
    # read at 100.2, answered at 100.2 + 0: taken as of halfway through the trip
    assert clock.now() == pytest.approx(1_000.1)
    monotonic.at += 30
    wall.at += 3_600  # a wall clock stepped an hour on changes nothing
    assert clock.now() == pytest.approx(1_030.1)


async def test_a_store_that_cannot_answer_leaves_the_last_reading() -> None:
    monotonic = Ticking(0.0)
    clock = StoreClock(monotonic=monotonic, wall=lambda: 9_999.0)
    store = Source(monotonic, 1_000.0)
    assert await clock.sync(store)
    store.fails = True
    monotonic.at += 10
    assert not await clock.sync(store)
    assert clock.now() == 1_010.0


async def test_a_store_down_at_start_is_asked_again_before_the_full_period() -> None:
    """No reading yet: `run` asks again within a second, not after `SYNC_SECONDS`, and
    `first_reading` returns once it has one (the edge's deliverer waits on it)."""
    monotonic = Ticking(0.0)
    clock = StoreClock(monotonic=monotonic, wall=lambda: 9_999.0)
    store = Source(monotonic, 1_000.0)
    store.fails = True
    runs = asyncio.create_task(clock.run(store, every=3_600))
    try:
        await asyncio.sleep(0)  # the first reading, refused
        assert clock.now() == 9_999.0
        store.fails = False
        async with asyncio.timeout(10):  # a bound: the retry comes after 0.5 s
            await clock.first_reading()
        assert clock.now() == 1_000.0
    finally:
        runs.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runs
