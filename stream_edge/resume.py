"""Resumable EventSource streams, across edge processes, through the store.

The edge that runs a stream (the producer) appends every event frame to a log in
the store, in small batches so the hot path never waits on the store. When its
client drops, it keeps the backend going for `LLMGW_RESUME_GRACE_SECONDS`. A
reconnect with the same token and `Last-Event-ID: n` — on this edge or any other —
follows the log from event n+1 (`follow`), and announces itself with a heartbeat key
so the producer keeps going until the end; with no reconnect within the grace, the
producer cancels the backend and bills what was generated.

Event ids are 1, 2, 3… so event `n` sits at index `n - 1` of the log.

Who may resume (DESIGN §9 "Disconnects and resume"): only a request that carries
`Last-Event-ID` (a bare GET on a used token is a second use, 401), only until the
resume grace after the stream ended (then 204), and only one connection at a time:
each reconnect writes its own id under `live_key`, and the process's watcher
(revocation_watch.py) ends any connection whose id is no longer there — the
producer's client included, which has no id and yields to the first reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from shared.store import KeyValueStore, LogStore

log = logging.getLogger("llmgw.edge.resume")

MAX_EVENTS = 20_000  # bounds a stream's log; far above any model's output length
FLUSH_DELAY = 0.05  # batch frames written within 50 ms into one store round trip
POLL_INTERVAL = 0.05
HEARTBEAT_TTL = 3.0


# Our event ids never get near this; a longer Last-Event-ID is not one of ours (and
# `int()` of thousands of digits is slow, then refused).
MAX_EVENT_ID_DIGITS = 9


class ResumeStore(KeyValueStore, LogStore, Protocol):
    """What a follower needs: the stream's log and its attachment marker."""


def parse_last_event_id(raw: str | None) -> int | None:
    """The `Last-Event-ID` a reconnect sends, or None when there is none (a first
    use). Raise ValueError unless it is one of our ids: ASCII digits only
    (`str.isdigit` accepts '²', which `int()` refuses) and of a sane length."""
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > MAX_EVENT_ID_DIGITS:
        raise ValueError("Last-Event-ID must be an event number")
    return int(raw)


def within_grace(done_marker: bytes, now: float, grace: float) -> bool:
    """Whether a stream that ended (its `done:` marker holds the end's Unix time) may
    still be resumed: only for `grace` seconds after its end."""
    try:
        ended_at = float(done_marker)
    except ValueError:
        return False
    return now - ended_at <= grace


def events_key(jti: str) -> str:
    return f"events:{jti}"


def attached_key(jti: str) -> str:
    return f"attached:{jti}"


def done_key(jti: str) -> str:
    """Holds the stream's end time once its log is complete (see `within_grace`)."""
    return f"done:{jti}"


def live_key(jti: str) -> str:
    """Names the one connection that may serve the stream now (absent: the first)."""
    return f"live:{jti}"


class ResumeLog:
    """Producer side: frames go to memory at once and to the store in batches, at
    most one write per `FLUSH_DELAY`.

    Frames that arrive while a write is in flight wait for the next delay rather
    than going out straight after it: under load a store round trip lasts as long
    as the gap between chunks, and writing back to back turned into one write (four
    Redis commands: MULTI, RPUSH, PEXPIRE, EXEC) per one or two chunks — 73 writes
    for a 200-chunk answer paced 5 ms apart, where the delay allows ~20."""

    def __init__(self, store: LogStore, jti: str, ttl_seconds: float) -> None:
        self._store = store
        self._key = events_key(jti)
        self._ttl = ttl_seconds
        self._pending: list[bytes] = []
        self._count = 0
        self._flusher: asyncio.Task[None] | None = None
        self._writing = False
        self._closing = False

    def append(self, frame: bytes) -> None:
        if self._count >= MAX_EVENTS:
            return
        self._count += 1
        self._pending.append(frame)
        if not self._closing and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.create_task(self._flush_every_delay())

    async def _flush_every_delay(self) -> None:
        while self._pending and not self._closing:
            await asyncio.sleep(FLUSH_DELAY)  # `close` cancels the task only here
            self._writing = True
            try:
                await self._write_pending()
            finally:
                self._writing = False

    async def _write_pending(self) -> None:
        batch, self._pending = self._pending, []
        try:
            await self._store.log_append(self._key, batch, self._ttl)
        except Exception as exc:  # a resume may then miss events; the stream goes on
            log.warning("resume log write failed: %s", type(exc).__name__)

    async def close(self) -> None:
        """Write everything still pending (the final event included), after the
        write in flight, so the log keeps the events' order."""
        self._closing = True
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            if self._writing:
                await asyncio.wait({flusher})  # it ends after this write (`_closing`)
            else:
                flusher.cancel()
        while self._pending:
            await self._write_pending()


async def wait_for_reconnect(
    store: KeyValueStore, jti: str, grace: float, finished: asyncio.Event
) -> None:
    """After the client left: return when the producer should give up — no follower
    attached for `grace` seconds — and never while one is attached. Returns at once
    when the stream finished by itself."""
    key = attached_key(jti)
    alone_since = time.monotonic()
    while not finished.is_set():
        try:
            attached = await store.get(key) is not None
        except Exception as exc:
            # No follower can attach through a store that fails either: count the
            # grace on. Raising would leave the backend running for nobody, billed.
            log.warning("could not look for a reconnect: %s", type(exc).__name__)
            attached = False
        if attached:
            alone_since = time.monotonic()
        elif time.monotonic() - alone_since >= grace:
            return
        try:
            await asyncio.wait_for(finished.wait(), timeout=0.25)
        except TimeoutError:
            pass


async def follow(
    store: ResumeStore,
    jti: str,
    after_id: int,
    emit: Callable[[bytes], Awaitable[None]],
    is_done: Callable[[], Awaitable[bool]],
    give_up_after: float,
) -> None:
    """Resumer side: emit every frame after `after_id` until the stream's last one.

    Stops when the producer marked the stream done and the log is drained, or when no
    new frame arrived for `give_up_after` seconds (the producer died)."""
    key = events_key(jti)
    next_index = after_id
    last_progress = time.monotonic()
    last_heartbeat = 0.0
    while True:
        now = time.monotonic()
        if now - last_heartbeat >= HEARTBEAT_TTL / 3:
            await store.set(attached_key(jti), b"1", HEARTBEAT_TTL)
            last_heartbeat = now
        frames = await store.log_range(key, next_index)
        if frames:
            await emit(b"".join(frames))
            next_index += len(frames)
            last_progress = now
            continue
        if await is_done():
            # The producer writes the log before the done marker: read once more.
            frames = await store.log_range(key, next_index)
            if frames:
                await emit(b"".join(frames))
            return
        if now - last_progress > give_up_after:
            return
        await asyncio.sleep(POLL_INTERVAL)
