"""Write usage checkpoints while a stream runs (see `shared/checkpoints.py`).

The heartbeat starts when the edge begins opening the backend (`StreamJob.open`),
not when the answer starts: opening can take a minute (retries, a fallback chain
waiting for its first token) and a whole answer has no relay at all, and an edge
killed meanwhile must leave a checkpoint the sweeper sees fall silent, or the
stream's hold and slots wait for their deadlines. Until the stream is on the
backend that serves it (`follow`), the checkpoints carry the first attempt's
meter: no output yet. A whole answer's carry its reader's count as it reads
(`completion.read_completion`), as a relayed one's carry the relay's.

Writes never block the relay: the heartbeat is its own task, a 64-token write is a
background task (at most one in flight), and a failed write only means a staler
checkpoint. `close` stops the heartbeat and writes the ended checkpoint last, so
the sweeper never mistakes a finished stream whose report is in the outbox for a
dead edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from shared.checkpoints import (
    CHECKPOINT_EVERY_SECONDS,
    CHECKPOINT_EVERY_TOKENS,
    UsageCheckpoint,
    checkpoint_key,
)
from shared.store import KeyValueStore
from shared.tokens import StreamGrant
from shared.webhooks import iso_utc
from stream_edge.meter import Meter

log = logging.getLogger("llmgw.edge.checkpoints")

CLOSE_TIMEOUT_SECONDS = 2.0  # a hung store must not hold the stream's end hostage


class Checkpointer:
    def __init__(
        self,
        store: KeyValueStore,
        grant: StreamGrant,
        meter: Meter,
        ttl_seconds: float,
        every_seconds: float = CHECKPOINT_EVERY_SECONDS,
        model: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`model`: the fallback that serves, when not the grant's (issue 16.2).
        `clock`: what `updated_at` is read on, the store's (`EdgeState.store_clock`):
        the control plane times the settlement of a dead edge's stream from it, and
        this host's clock may be minutes off its own."""
        self._model = model
        self._clock = clock
        self._store = store
        self._grant = grant
        self._meter = meter
        self._ttl = ttl_seconds
        self._every = every_seconds
        self._written_tokens = 0
        self._beat = 0
        self._task: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._closed = False

    @property
    def started(self) -> bool:
        return self._heartbeat is not None

    def start(self) -> None:
        """Write a checkpoint now and every few seconds until `close`: the stream
        has started, and its edge is alive."""
        self._heartbeat = asyncio.create_task(self._beats())

    def follow(self, meter: Meter, model: str | None) -> None:
        """The stream is on the backend that serves it (a fallback has a meter of its
        own); `model`: that fallback, when not the grant's model."""
        self._meter, self._model = meter, model

    async def _beats(self) -> None:
        while not self._stop.is_set():
            await self._write()
            # `asyncio.timeout`, not `wait_for`: on Python 3.11 the latter wraps the
            # wait in a task of its own, one more per beat of every stream.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._every):
                    await self._stop.wait()

    def tick(self) -> None:
        """Called after each relayed chunk; cheap unless 64 more tokens went out."""
        output = self._meter.relayed_tokens
        if output - self._written_tokens < CHECKPOINT_EVERY_TOKENS:
            return
        if self._task is not None and not self._task.done():
            return
        self._written_tokens = output
        self._task = asyncio.create_task(self._write())

    async def close(self) -> None:
        """Stop the heartbeat, let in-flight writes land, then write the ended
        checkpoint (bounded: the caller shields this from cancellation). Once: a
        second call (the report after the relay's own) writes nothing."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                for task in (self._heartbeat, self._task):
                    if task is not None:
                        await task
                await self._write(ended=True)
        except TimeoutError:
            log.warning("final checkpoint not written in time")

    async def _write(self, *, ended: bool = False) -> None:
        # What the report would bill at this instant, parts included, so that the
        # sweeper bills a dead edge's stream as its report would have (the vendor's
        # output count, once it came, not the relayed estimate: that is an upper
        # bound, and `relayed_tokens` only grows, so the estimate is never stale).
        billing = self._meter.billing()
        self._beat += 1
        checkpoint = UsageCheckpoint(
            jti=self._grant.jti,
            reservation_id=self._grant.reservation_id,
            input_tokens=billing.input_tokens,
            output_tokens=billing.output_tokens,
            updated_at=iso_utc(datetime.fromtimestamp(self._clock(), UTC)),
            beat=self._beat,
            ended=ended,
            model=self._model,
            cached_input_tokens=billing.cached_input_tokens,
            cache_write_tokens=billing.cache_write_tokens,
            reasoning_tokens=billing.reasoning_tokens,
        )
        try:
            await self._store.set(
                checkpoint_key(self._grant.reservation_id), checkpoint.dumps(), self._ttl
            )
        except Exception as exc:  # a stale checkpoint is better than a broken stream
            log.warning("checkpoint write failed: %s", type(exc).__name__)
