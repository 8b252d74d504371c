"""Pump a streamed answer from its backend to the client (`relay.relay`), with the
stream's usage checkpoints, and close the backend response whatever happens."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import anyio

from stream_edge.attempts import Backend
from stream_edge.checkpoints import Checkpointer
from stream_edge.relay import Deadlines, RelayResult, relay
from stream_edge.settings import EdgeSettings
from stream_edge.state import EdgeState
from stream_edge.transport import Response
from stream_edge.upstream.base import UpstreamEvent, parser_for

# The stream's log lines keep the job's logger name: operators filter on it.
log = logging.getLogger("llmgw.edge.jobs")


def remaining_life(settings: EdgeSettings, accepted_at: float) -> float:
    """What is left of a stream's maximum life, counted from its request's arrival
    (`accepted_at`, `time.perf_counter`): its slots expire `max_stream_seconds` after
    admission, and the hold's deadline assumes no stream outlives that, however long
    opening took (retries, fallbacks, a slow backend's head)."""
    return max(0.0, settings.max_stream_seconds - (time.perf_counter() - accepted_at))


class Pump:
    """One stream's `RelaySink`. `write` (the route's frame writer) and `emit` (the
    client's response) are kept as given and `chunk_sent` is the checkpointer's tick:
    the relay calls them per event and chunk, so no method of ours stands between."""

    def __init__(
        self,
        state: EdgeState,
        backend: Backend,
        accepted_at: float,
        checkpointer: Checkpointer,
        write: Callable[[UpstreamEvent], bytes],
        emit: Callable[[bytes], Awaitable[None]],
    ) -> None:
        """`checkpointer`: the stream's, beating since the opening began; the pump
        ticks it per chunk and closes it (the ended checkpoint) as the relay ends."""
        self._state = state
        self._backend = backend
        self._accepted_at = accepted_at
        self._checkpointer = checkpointer
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
        parser = parser_for(adapter, self._backend.credentials)
        try:
            return await relay(
                response,
                parser,
                self._backend.meter,
                self,
                self._state.metrics,
                Deadlines(
                    first_token=settings.first_token_timeout,
                    idle=settings.idle_timeout,
                    max_life=remaining_life(settings, self._accepted_at),
                ),
                self._backend.attempt.max_tokens,
            )
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
                await self._checkpointer.close()
