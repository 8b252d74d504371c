"""Pump a streamed answer from its backend to the client (`relay.relay`), with the
stream's usage checkpoints, and close the backend response whatever happens."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import anyio

from shared.store import KeyWrite
from shared.tokens import StreamGrant
from stream_edge.attempts import Backend
from stream_edge.checkpoints import Checkpointer
from stream_edge.relay import Deadlines, RelayResult, relay
from stream_edge.state import EdgeState
from stream_edge.transport import Response
from stream_edge.upstream.base import UpstreamEvent

# The stream's log lines keep the job's logger name: operators filter on it.
log = logging.getLogger("llmgw.edge.jobs")

# As long as `EventStreamResponse` gives the report at the response's end.
REPORT_TIMEOUT_SECONDS = 10.0


class Pump:
    """One stream's `RelaySink`. `write` (the route's frame writer) and `emit` (the
    client's response) are kept as given and `chunk_sent` is the checkpointer's tick:
    the relay calls them per event and chunk, so no method of ours stands between."""

    def __init__(
        self,
        state: EdgeState,
        grant: StreamGrant,
        backend: Backend,
        accepted_at: float,
        write: Callable[[UpstreamEvent], bytes],
        emit: Callable[[bytes], Awaitable[None]],
        report_completed: Callable[[KeyWrite], Awaitable[None]] | None = None,
    ) -> None:
        """`report_completed(ended)`: make a completed stream's report now, writing
        `ended` (its last checkpoint) with it; None: `close` writes it on its own."""
        self._state = state
        self._report_completed = report_completed
        self._backend = backend
        self._accepted_at = accepted_at
        settings = state.settings
        model = backend.model.id
        self._checkpointer = Checkpointer(
            state.store,
            grant,
            backend.meter,
            ttl_seconds=max(0, grant.expires_at - time.time()) + settings.hold_grace_seconds + 3600,
            model=model if model != grant.model else None,
        )
        self.write = write
        self.emit = emit
        self.chunk_sent = self._checkpointer.tick

    def first_token(self) -> None:
        self._backend.observe_first_token(self._state.metrics, self._accepted_at)

    async def run(self, response: Response) -> RelayResult:
        try:
            result = await self._relay(response)
        finally:
            # Shielded: when the client left, this task is being cancelled, and the
            # backend must still see its connection closed.
            with anyio.CancelScope(shield=True):
                await response.aclose()
        if result.status == "failed":
            self._state.metrics.upstream_errors.labels(
                self._backend.provider_label, result.error_code or ""
            ).inc()
        return result

    async def _relay(self, response: Response) -> RelayResult:
        adapter = self._backend.adapter
        assert adapter is not None  # opening refused a provider without one
        settings = self._state.settings
        self._checkpointer.start()
        result: RelayResult | None = None
        try:
            result = await relay(
                response,
                adapter.stream_parser(),
                self._backend.meter,
                self,
                self._state.metrics,
                Deadlines(
                    first_token=settings.first_token_timeout,
                    idle=settings.idle_timeout,
                    max_life=settings.max_stream_seconds,
                ),
            )
            return result
        except OSError:
            raise  # the client's connection failed: streaming.py handles that
        except Exception as exc:
            # A bug or a backend we misread (not the client leaving: that is a
            # cancellation): the stream still ends with an error event and a report.
            log.error("unexpected %s while relaying", type(exc).__name__)
            return RelayResult("failed", "upstream_error", "the stream broke off")
        finally:
            # Shielded, as in `run`: the ended checkpoint tells the sweeper the
            # report is coming (bounded by its own timeout).
            with anyio.CancelScope(shield=True):
                if result is not None and result.status == "completed":
                    await self._end_completed()
                else:
                    await self._checkpointer.close()

    async def _end_completed(self) -> None:
        """A completed stream's report goes out here, before its last frame, with the
        ended checkpoint in the same round trip (one of the four a short stream took;
        the report's status no longer depends on how the client's response ends).
        Written here, not at the response's end, so no moment passes between the
        relay's end and the report without an ended checkpoint, as before."""
        if self._report_completed is None:
            await self._checkpointer.close()
            return
        if not await self._checkpointer.stop():
            return  # a hung store: as `close`, no ended checkpoint; the report follows
        with anyio.move_on_after(REPORT_TIMEOUT_SECONDS):
            await self._report_completed(self._checkpointer.ended())
