"""Resumable EventSource streams, across edge processes, through the store.

The edge that runs a stream (the producer) appends every event frame to a log in
the store, in small batches so the hot path never waits on the store. When its
client drops, it keeps the backend going for `LLMGW_RESUME_GRACE_SECONDS`. A
reconnect with the same token and `Last-Event-ID: n` — on this edge or any other —
follows the log from event n+1 (`follow`), and announces itself with a heartbeat key
so the producer keeps going until the end; with no reconnect within the grace, the
producer cancels the backend and bills what was generated.

Event ids are 1, 2, 3… so event `n` sits at index `n - 1` of the log.

The log is bounded by bytes (`LOG_BUDGET_BYTES`), not only by events: a backend
sending 1 MiB deltas once filled 20,000 events, ~21 GB of Redis for one stream. The
log keeps a prefix of the stream: the first frame past the budget (or a write the
store failed) ends it, and `gap:<jti>` records how many events were kept. The live
stream and its billing go on untouched; a resume that needs an event past the kept
ones gets a clear answer instead of a silent hole: a follower reaching the end of the
kept events ends with an `error` event `resume_gap`, and a reconnect asking for
events after it is refused 410 `resume_gap` (EventSource stops there).

Who may resume (DESIGN §9 "Disconnects and resume"): only a request that carries
`Last-Event-ID` (a bare GET on a used token is a second use, 401), only until the
resume grace after the stream ended (then 204), and only one connection at a time:
each reconnect writes its own id under `live_key`, and the process's watcher
(revocation_watch.py) ends any connection whose id is no longer there — the
producer's client included, which has no id and yields to the first reconnect. On
the reconnect's own edge the connection before it ends at once, so a flood of
reconnects runs one follower per stream per edge (live_connections.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from shared.store import CounterStore, KeyValueStore, LogStore
from stream_edge.formats import error_event

log = logging.getLogger("llmgw.edge.resume")

# What a legitimate long answer needs, with room: an EventSource `chunk` frame is
# ~65 bytes of framing plus its text (one token, ~4 bytes, per delta at most vendors),
# so a 128,000-token answer — the longest output any model offers today, 8x the
# packaged catalog's largest `max_output_tokens` — is ~10 MB with the per-entry cost
# below. 16 MiB keeps it whole; past it, the rest of the stream is not resumable.
LOG_BUDGET_BYTES = 16 * 1024 * 1024
# A company's logs together, counted as they are written, per window: a log lives for
# its token's life plus the grace and a minute after its last write (~190 s by
# default, at most ~370 s), so what a company holds at once stays within about twice
# this. A company's own backend ignoring `max_tokens` (a hold of one token) filled
# every log: inside its init rate and stream cap one company kept tens of GiB in
# the Redis every company shares (measured: 8 streams, 128 MiB for 187 s). What a
# company legitimately writes, 200 streams at ~100 tokens a second, is ~0.5 GB a
# window. Past it a log keeps nothing more (a resume gets `resume_gap`); the live
# stream is whole.
COMPANY_LOG_BYTES = 1024 * 1024 * 1024
COMPANY_LOG_WINDOW_SECONDS = 300.0
# The stream cap `COMPANY_LOG_BYTES` is sized for (`LLMGW_MAX_STREAMS_PER_COMPANY`'s
# default): an operator raising the cap raises every company's budget with it.
COMPANY_LOG_STREAMS = 200
# A log takes its company's budget this much at a time (one more store round trip
# per ~16 KiB of log, ~200 tokens, past its first, which is free); what it took and
# did not use is counted anyway.
ALLOWANCE_CHUNK = 16 * 1024
# Counted per frame on top of its bytes (Redis' own cost per list entry), so a
# stream of a million tiny frames is bounded too.
ENTRY_OVERHEAD = 16
FLUSH_DELAY = 0.05  # batch frames written within 50 ms into one store round trip
POLL_INTERVAL = 0.05
HEARTBEAT_TTL = 3.0
# What a follower reads per store round trip: at most this many frames, and no more
# than `READ_BYTES` of them (but always one, however large). By count alone a batch
# of 1 MiB deltas was 256 MiB (the whole 16 MiB log, in practice) per follower, twice
# over once joined for the client; ordinary ~70-byte frames fill the count long
# before the bytes.
READ_BATCH = 256
READ_BYTES = 256 * 1024
GAP_CODE = "resume_gap"


# Our event ids never get near this; a longer Last-Event-ID is not one of ours (and
# `int()` of thousands of digits is slow, then refused).
MAX_EVENT_ID_DIGITS = 9


class ResumeStore(KeyValueStore, LogStore, CounterStore, Protocol):
    """What a follower needs: the stream's log and its attachment marker (and a
    producer, its company's count of log bytes)."""


def company_log_key(company_id: str) -> str:
    return f"rlog:{company_id}"


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


def kept_events(gap_marker: bytes | None) -> int | None:
    """How many events the log kept, from its `gap:` marker; None: no gap (so far).
    A marker we cannot read keeps nothing: better no replay than a wrong one."""
    if gap_marker is None:
        return None
    return int(gap_marker) if gap_marker.isdigit() else 0


def gap_message(kept: int) -> str:
    return (
        f"events after {kept} were not kept for resuming (the answer outgrew the resume "
        "log); the rest of this answer cannot be recovered by reconnecting"
    )


def ends_stream(frame: bytes) -> bool:
    """Whether `frame` is a stream's last event (`complete` or `error`): frames are
    `id: n\nevent: name\n…` (`EventSourceWriter`)."""
    lines = frame.split(b"\n", 2)
    return len(lines) > 1 and lines[1] in (b"event: complete", b"event: error")


def events_key(jti: str) -> str:
    return f"events:{jti}"


def attached_key(jti: str) -> str:
    return f"attached:{jti}"


def done_key(jti: str) -> str:
    """Holds the stream's end time once its log is complete (see `within_grace`)."""
    return f"done:{jti}"


def gap_key(jti: str) -> str:
    """Holds how many events the log kept, once it stopped keeping them."""
    return f"gap:{jti}"


def live_key(jti: str) -> str:
    """Names the one connection that may serve the stream now (absent: the first)."""
    return f"live:{jti}"


def company_log_budget(max_streams_per_company: int) -> int:
    """A company's resume logs' bytes per window: `COMPANY_LOG_BYTES`, scaled up with
    the company stream cap past the default it was sized for. At a fixed 1 GiB, a cap
    raised to 1,000 left each stream ~1 MiB a window: resumability lost past ~47
    tokens a second (the live streams were whole). Never below the default's."""
    scale = max(1.0, max_streams_per_company / COMPANY_LOG_STREAMS)
    return int(COMPANY_LOG_BYTES * scale)


class ResumeLog:
    """Producer side: frames go to memory at once and to the store in batches, at
    most one write per `FLUSH_DELAY`, until the log's byte budget is spent.

    Frames that arrive while a write is in flight wait for the next delay rather
    than going out straight after it: under load a store round trip lasts as long
    as the gap between chunks, and writing back to back turned into one write (four
    Redis commands: MULTI, RPUSH, PEXPIRE, EXEC) per one or two chunks — 73 writes
    for a 200-chunk answer paced 5 ms apart, where the delay allows ~20.

    The log is a prefix of the stream: once a frame does not fit the budget, or a
    write fails (its frames are lost, and later ones would sit at the wrong index),
    nothing more is kept and `gap:<jti>` says how many events were (`kept`)."""

    def __init__(
        self,
        store: ResumeStore,
        jti: str,
        ttl_seconds: float,
        budget_bytes: int = LOG_BUDGET_BYTES,
        company_id: str | None = None,
        company_budget_bytes: int | None = None,
    ) -> None:
        self._store = store
        # Whose share of the store the log's bytes count against (None: nobody's).
        self._company = company_id
        self._company_budget = (
            COMPANY_LOG_BYTES if company_budget_bytes is None else company_budget_bytes
        )
        # Of the company's budget. A log's first chunk is its own: most streams' logs
        # fit in it (a 64-token answer's is ~6 KiB) and so cost no round trip for the
        # budget; what escapes the count is one chunk per stream, which the company's
        # init rate bounds (~94 MiB a window at 1,200 a minute, against 1 GiB).
        self._taken = ALLOWANCE_CHUNK
        self._stored = 0  # bytes written
        self._key = events_key(jti)
        self._gap_key = gap_key(jti)
        self._ttl = ttl_seconds
        self._budget = budget_bytes
        self._pending: list[bytes] = []
        self._count = 0
        self._size = 0
        self._written = 0
        # Events 1..kept are in the log and nothing after; None: all of them so far.
        self.kept: int | None = None
        self._gap_stored = False
        self._sealed = False
        self._flusher: asyncio.Task[None] | None = None
        self._writing = False
        self._closing = False

    def seal(self) -> None:
        """Keep nothing after the frames appended so far (the stream's final event
        went in: frames the producer writes before its cancellation lands must not
        follow it)."""
        self._sealed = True

    def append(self, frame: bytes) -> None:
        if self.kept is not None or self._sealed:
            return
        cost = len(frame) + ENTRY_OVERHEAD
        if self._size + cost > self._budget:
            self._stop_keeping(self._count, "it outgrew its budget")
        else:
            self._size += cost
            self._count += 1
            self._pending.append(frame)
        if not self._closing and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.create_task(self._flush_every_delay())

    def _stop_keeping(self, kept: int, why: str) -> None:
        self.kept = kept if self.kept is None else min(self.kept, kept)
        log.warning("the resume log keeps no events after %d: %s", self.kept, why)

    def _gap_unrecorded(self) -> bool:
        return self.kept is not None and not self._gap_stored

    async def _flush_every_delay(self) -> None:
        while (self._pending or self._gap_unrecorded()) and not self._closing:
            await asyncio.sleep(FLUSH_DELAY)  # `close` cancels the task only here
            self._writing = True
            try:
                await self._write_pending()
            finally:
                self._writing = False
            if self._gap_unrecorded() and not self._pending:
                return  # the store failed to take the marker: `close` tries again

    async def _write_pending(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            try:
                if not await self._company_allows(batch):
                    self._stop_keeping(self._written, "its company's logs used their budget")
                    batch = []
                else:
                    await self._store.log_append(self._key, batch, self._ttl)
                    self._written += len(batch)
            except Exception as exc:  # the stream goes on; its log stops here
                self._pending = []
                self._stop_keeping(self._written, f"a write failed ({type(exc).__name__})")
        if self._gap_unrecorded() and not self._pending:
            # After every batch it counts, so a follower reads up to it and no further.
            try:
                await self._store.set(self._gap_key, str(self.kept).encode(), self._ttl)
                self._gap_stored = True
            except Exception as exc:
                log.warning("could not mark the resume log's gap: %s", type(exc).__name__)

    async def _company_allows(self, batch: list[bytes]) -> bool:
        """Whether the company's logs may hold `batch` too: its budget is taken a
        chunk at a time, so most batches cost no round trip."""
        size = sum(len(frame) + ENTRY_OVERHEAD for frame in batch)
        self._stored += size
        if self._company is None or self._stored <= self._taken:
            return True
        take = max(ALLOWANCE_CHUNK, self._stored - self._taken)
        key = company_log_key(self._company)
        total = await self._store.add(key, take, COMPANY_LOG_WINDOW_SECONDS)
        self._taken += take
        return total <= self._company_budget

    async def close(self) -> None:
        """Write everything still pending (the final event included), after the
        write in flight, so the log keeps the events' order; then the gap marker."""
        self._closing = True
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            if self._writing:
                await asyncio.wait({flusher})  # it ends after this write (`_closing`)
            else:
                flusher.cancel()
        while self._pending:
            await self._write_pending()
        if self._gap_unrecorded():
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


class Follower:
    """Resumer side: emit every frame after `after_id` until the stream's last one.

    `position` is the id of the last event handed to the client; `final_frame` makes
    the `error` event that ends this connection early (a revocation, the end of the
    kept events) with the next id, as the producer's own client gets it — or nothing,
    when the stream's last event already went out. Not for a shutdown of this edge:
    the stream goes on at its producer (`eventsource._resume`)."""

    def __init__(self, store: ResumeStore, jti: str, after_id: int, give_up_after: float) -> None:
        self._store = store
        self._jti = jti
        self._give_up_after = give_up_after
        self.position = after_id
        self.kept: int | None = None
        self.ended = False

    def final_frame(self, code: str, message: str) -> bytes:
        if self.ended:
            return b""
        self.ended = True
        return error_event(self.position + 1, code, message)

    async def _read(self) -> list[bytes]:
        count = READ_BATCH
        if self.kept is not None:
            count = min(count, self.kept - self.position)
        return await self._store.log_range(
            events_key(self._jti), self.position, count, max_bytes=READ_BYTES
        )

    async def _emit(self, emit: Callable[[bytes], Awaitable[None]], frames: list[bytes]) -> None:
        # Counted before the write: a frame cut off mid-write must not be numbered again.
        self.position += len(frames)
        self.ended = ends_stream(frames[-1])
        await emit(b"".join(frames))

    async def run(self, emit: Callable[[bytes], Awaitable[None]]) -> None:
        """Stops when the producer marked the stream done and the log is drained, at
        the end of the kept events (`resume_gap`), or when no new frame arrived for
        `give_up_after` seconds (the producer died)."""
        jti = self._jti
        last_progress = time.monotonic()
        last_heartbeat = 0.0
        drained_after_done = False
        while not self.ended:
            now = time.monotonic()
            if now - last_heartbeat >= HEARTBEAT_TTL / 3:
                await self._store.set(attached_key(jti), b"1", HEARTBEAT_TTL)
                last_heartbeat = now
            frames = await self._read()
            if frames:
                await self._emit(emit, frames)
                last_progress = now
                continue
            if drained_after_done:
                return
            done, gap = await self._store.get_many([done_key(jti), gap_key(jti)])
            if self.kept is None:
                self.kept = kept_events(gap)
            if self.kept is not None and self.position >= self.kept:
                await emit(self.final_frame(GAP_CODE, gap_message(self.kept)))
                return
            if done is not None:
                # The producer writes the log (and its gap marker) before the done
                # marker: read to the end once more.
                drained_after_done = True
                continue
            if now - last_progress > self._give_up_after:
                return
            await asyncio.sleep(POLL_INTERVAL)
