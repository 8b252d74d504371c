"""The producer's resume log writes at most once per `FLUSH_DELAY`, in order.

A slow store (a round trip as long as the gap between chunks, as under load) used to
turn the batching into one write per chunk or two: the frames that arrived during a
write went out straight after it. The store here holds each write open on a gate, so
what happens while a write is in flight is decided by the test, not by a clock.
"""

from __future__ import annotations

import asyncio

import pytest

from shared.store_memory import MemoryStore
from stream_edge import resume
from stream_edge.resume import ResumeLog


class GatedLog(MemoryStore):
    """The in-memory store, each log write held open until `release`; records each
    batch as written."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[bytes]] = []
        self.writing = asyncio.Event()
        self.release = asyncio.Event()

    async def log_append(self, key: str, items: list[bytes], ttl_seconds: float) -> int:
        self.writing.set()
        await self.release.wait()
        self.batches.append(list(items))
        return await super().log_append(key, items, ttl_seconds)


async def _first_write_in_flight(
    monkeypatch: pytest.MonkeyPatch, jti: str
) -> tuple[GatedLog, ResumeLog]:
    store = GatedLog()
    log = ResumeLog(store, jti, 60)
    monkeypatch.setattr(resume, "FLUSH_DELAY", 0)
    log.append(b"1")
    await store.writing.wait()
    return store, log


async def _settle() -> None:
    for _ in range(20):  # let every ready task run
        await asyncio.sleep(0)


async def test_frames_that_arrive_during_a_write_wait_for_the_next_delay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, log = await _first_write_in_flight(monkeypatch, "jti-1")
    monkeypatch.setattr(resume, "FLUSH_DELAY", 3600)  # no second write within the test
    log.append(b"2")
    log.append(b"3")
    store.release.set()
    await _settle()
    assert store.batches == [[b"1"]]  # 2 and 3 wait for the delay, not for the write

    await log.close()  # the flusher was asleep: close writes the rest at once
    assert store.batches == [[b"1"], [b"2", b"3"]]


async def test_close_during_a_write_lets_it_land_first_and_keeps_the_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, log = await _first_write_in_flight(monkeypatch, "jti-2")
    log.append(b"2")
    closing = asyncio.create_task(log.close())
    await _settle()
    assert not closing.done()  # it waits for the write in flight
    store.release.set()
    await closing
    assert store.batches == [[b"1"], [b"2"]]
    assert await store.log_range(resume.events_key("jti-2"), 0, 10) == [b"1", b"2"]
