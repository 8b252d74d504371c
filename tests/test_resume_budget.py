"""A stream's resume log is bounded by bytes, and a resume past what it kept says so.

Attack (measured before the fix): an in-house backend — or a model prompted to —
sends 1 MB deltas; the log was capped at 20,000 events only, so one stream put
200 MB in Redis for 200 such events (~21 GB at the cap), kept for the token's life.
Now the log keeps the stream's first `LOG_BUDGET_BYTES` (16 MiB); the live stream and
its bill are untouched; a follower that reaches the end of the kept events gets an
`error` event `resume_gap`, and a reconnect asking for events after them a 410
`resume_gap` — never a silent hole that passes for the end of the answer. Also: a
failed log write ends the log there (later frames would sit at the wrong index)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
import redis

from shared.sse import ServerSentEvent, SSEDecoder
from shared.store_memory import MemoryStore
from stream_edge import resume
from stream_edge.resume import Follower, ResumeLog, company_log_key, events_key, gap_key
from tests.conftest import REDIS_URL, fresh_redis_prefix
from tests.hostile_catalog import bulky_backend, hostile_backend_stack
from tests.stack import InProcessStack

BIG_DELTAS = 24
BIG = "x" * 1_000_000  # under the 1 MiB a backend's event may carry


_chat = bulky_backend(BIG_DELTAS, BIG)  # `BIG_DELTAS` deltas of 1 MB each


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InProcessStack, str]]:
    directory = tmp_path_factory.mktemp("bulky")
    with (
        fresh_redis_prefix() as prefix,
        hostile_backend_stack(directory, "bulky", _chat, redis_prefix=prefix) as gateway,
    ):
        yield gateway, prefix


def _events(response: httpx.Response) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    return [event for raw in response.iter_raw() for event in decoder.feed(raw)]


def test_one_streams_log_is_bounded_by_bytes_and_a_resume_past_it_is_told(
    stack: tuple[InProcessStack, str],
) -> None:
    gateway, prefix = stack
    c = gateway.client
    token = c.new_user(c.new_company("100"))
    grant = c.init_ok(token, {"model": "bulky-model", "query": "bulk"})
    with httpx.stream("GET", grant["stream_url"], timeout=60) as first:
        live = _events(first)
    # The live stream is whole: every delta, then `complete`.
    assert [e.event for e in live] == ["chunk"] * BIG_DELTAS + ["complete"]
    record = c.wait_usage(token, grant["reservation_id"])
    assert (record["status"], record["output_tokens"]) == ("completed", 500)

    server = redis.Redis.from_url(REDIS_URL)
    try:
        [key] = list(server.scan_iter(match=prefix + events_key("*")))
        jti = key.decode().removeprefix(prefix + "events:")
        held = server.memory_usage(key, samples=0)
        kept = int(server.get(prefix + gap_key(jti)) or b"-1")
    finally:
        server.close()
    assert held is not None and held <= resume.LOG_BUDGET_BYTES * 1.05  # was ~25 MB
    assert 0 < kept < BIG_DELTAS

    # Asking for events after the kept ones: a clear 410, EventSource stops there.
    past = c.http.get(grant["stream_url"], headers={"Last-Event-ID": str(kept)})
    assert past.status_code == 410, past.text
    assert past.json()["error"]["code"] == "resume_gap"
    # Resuming from the start: the kept events in order, then the gap said plainly
    # instead of a quiet end that passes for the whole answer.
    with httpx.stream(
        "GET", grant["stream_url"], headers={"Last-Event-ID": "0"}, timeout=60
    ) as again:
        assert again.status_code == 200
        resumed = _events(again)
    assert [e.id for e in resumed[:-1]] == [str(i) for i in range(1, kept + 1)]
    assert all(e.event == "chunk" for e in resumed[:-1])
    assert resumed[-1].event == "error"
    assert json.loads(resumed[-1].data)["code"] == "resume_gap"


class FailingOnce(MemoryStore):
    """The in-memory store, its second log write failing."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    async def log_append(self, key: str, items: list[bytes], ttl_seconds: float) -> int:
        self.writes += 1
        if self.writes == 2:
            raise ConnectionError("the store blinked")
        return await super().log_append(key, items, ttl_seconds)


async def test_a_failed_write_ends_the_log_where_it_was_whole() -> None:
    """Before: the lost batch left a hole and later frames sat at the wrong index, so
    a resume from event n silently skipped events (and got others' ids)."""
    store = FailingOnce()
    log = ResumeLog(store, "j", 60)
    log.append(b"1")
    log.append(b"2")
    await log._write_pending()  # written
    log.append(b"3")
    await log._write_pending()  # fails: event 3 is lost
    log.append(b"4")
    log.append(b"5")
    await log.close()
    assert log.kept == 2
    assert await store.log_range(events_key("j"), 0, 10) == [b"1", b"2"]
    assert await store.get(gap_key("j")) == b"2"


async def test_a_follower_stops_at_the_kept_events_with_a_gap_error() -> None:
    store = MemoryStore()
    frames = [f"id: {i}\nevent: chunk\ndata: {i}\n\n".encode() for i in range(1, 6)]
    log = ResumeLog(store, "j", 60, budget_bytes=3 * (len(frames[0]) + resume.ENTRY_OVERHEAD))
    for frame in frames:
        log.append(frame)
    await log.close()
    assert log.kept == 3
    got: list[bytes] = []

    async def emit(data: bytes) -> None:
        got.append(data)

    follower = Follower(store, "j", 0, give_up_after=60)
    await asyncio.wait_for(follower.run(emit), timeout=10)
    assert b"".join(got[:-1]) == b"".join(frames[: log.kept])
    assert b"event: error" in got[-1] and b"resume_gap" in got[-1]
    assert got[-1].startswith(f"id: {log.kept + 1}\n".encode())
    assert follower.final_frame("revoked", "x") == b""  # the stream's end already went out


async def test_a_short_streams_log_costs_no_round_trip_for_its_companys_budget() -> None:
    """A log's first `ALLOWANCE_CHUNK` is its own: a typical answer's log (a few KiB)
    takes nothing of its company's budget, so the budget costs the common stream no
    store round trip; a longer log takes it a chunk at a time."""
    store = MemoryStore()
    frame = b"id: 1\nevent: chunk\ndata: " + b"x" * 200 + b"\n\n"
    log = ResumeLog(store, "short", 60, company_id="c1")
    for _ in range(20):  # ~4.5 KiB
        log.append(frame)
    await log.close()
    assert log.kept is None  # whole
    assert await store.get(company_log_key("c1")) is None
    long = ResumeLog(store, "long", 60, company_id="c1")
    for _ in range(100):  # ~22 KiB: past its first chunk
        long.append(frame)
    await long.close()
    assert long.kept is None
    assert int(await store.get(company_log_key("c1")) or 0) >= resume.ALLOWANCE_CHUNK
