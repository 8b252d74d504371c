"""Write usage checkpoints while a stream runs (see `shared/checkpoints.py`).

Writes never block the relay: at most one is in flight per stream, as a background
task, and a failed write only means a staler checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

from shared.checkpoints import (
    CHECKPOINT_EVERY_SECONDS,
    CHECKPOINT_EVERY_TOKENS,
    UsageCheckpoint,
    checkpoint_key,
)
from shared.store import Store
from shared.tokens import StreamGrant
from shared.webhooks import iso_utc
from stream_edge.meter import Meter

log = logging.getLogger("llmgw.edge.checkpoints")


class Checkpointer:
    def __init__(self, store: Store, grant: StreamGrant, meter: Meter, ttl_seconds: float) -> None:
        self._store = store
        self._grant = grant
        self._meter = meter
        self._ttl = ttl_seconds
        self._written_tokens = 0
        self._written_at = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def tick(self) -> None:
        """Called after each relayed chunk; cheap unless a checkpoint is due."""
        output = self._meter.relayed_tokens
        if output == self._written_tokens:
            return
        due = output - self._written_tokens >= CHECKPOINT_EVERY_TOKENS
        if not due and time.monotonic() - self._written_at < CHECKPOINT_EVERY_SECONDS:
            return
        if self._task is not None and not self._task.done():
            return
        self._written_tokens = output
        self._written_at = time.monotonic()
        self._task = asyncio.create_task(self._write(output))

    async def _write(self, output_tokens: int) -> None:
        billing = self._meter.billing()
        checkpoint = UsageCheckpoint(
            jti=self._grant.jti,
            reservation_id=self._grant.reservation_id,
            input_tokens=billing.input_tokens,
            output_tokens=max(output_tokens, billing.output_tokens),
            updated_at=iso_utc(datetime.now(UTC)),
        )
        try:
            await self._store.set(
                checkpoint_key(self._grant.reservation_id), checkpoint.dumps(), self._ttl
            )
        except Exception as exc:  # a stale checkpoint is better than a broken stream
            log.warning("checkpoint write failed: %s", type(exc).__name__)
