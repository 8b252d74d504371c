"""One stream's lifetime after its token was claimed: open the backend, relay,
and report usage exactly once, whatever happens (done, client gone, backend failed).

`StreamJob` only sequences the pieces that do the work: `opening.Opener` (the chain,
key pools, breaker, retries), `pump.Pump` (a streamed answer) or
`completion.read_completion` (a whole one), `usage_report.webhook_status` and
`reporter.Reporter` (the report, its metrics and its store retries).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import anyio
from starlette.types import Receive

from shared.checkpoints import KEPT_PAST_DEADLINE_SECONDS
from shared.tokens import StreamGrant
from stream_edge.attempts import Attempt, Backend
from stream_edge.checkpoints import Checkpointer
from stream_edge.completion import read_completion
from stream_edge.errors import EdgeError, UpstreamError
from stream_edge.meter import Meter
from stream_edge.opening import Opener
from stream_edge.pump import Pump, remaining_life
from stream_edge.relay import RelayResult
from stream_edge.reporter import Reporter
from stream_edge.state import EdgeState
from stream_edge.streaming import Emit
from stream_edge.transport import Response
from stream_edge.upstream.base import Completion, UpstreamEvent
from stream_edge.usage_report import webhook_status

# The stream's log lines keep the job's logger name: operators filter on it.
log = logging.getLogger("llmgw.edge.jobs")

T = TypeVar("T")


class StreamJob:
    """`attempts`: the grant's model, then its fallbacks, tried in order before the
    first byte (`open`); `backend` is the one that serves (its model, provider and
    meter)."""

    def __init__(
        self,
        state: EdgeState,
        grant: StreamGrant,
        attempts: Sequence[Attempt],
        accepted_at: float,
    ) -> None:
        self.state = state
        self.grant = grant
        self.accepted_at = accepted_at
        self.result: RelayResult | None = None
        self._opener = Opener(state, grant, attempts)
        self._reporter = Reporter(state, grant, accepted_at)
        self._checkpointer = Checkpointer(
            state.store,
            grant,
            self._opener.backend.meter,
            ttl_seconds=max(0, grant.expires_at - time.time())
            + state.settings.hold_grace_seconds
            + KEPT_PAST_DEADLINE_SECONDS,
            clock=state.store_clock,
        )
        # Why the answer was stopped before it was served (`_while_client_stays`):
        # `client_gone`, `revoked`; None: it was not (or the server cancelled it).
        self.stopped_by: str | None = None
        # The backend's answer, opened and not yet handed to what reads it (the pump,
        # the completion reader), which close it: `report` closes one left over.
        self._opened: Response | None = None

    @property
    def backend(self) -> Backend:
        return self._opener.backend

    async def open(self, stream: bool) -> Response:
        """Connect to the backend (or a fallback); on a final failure report the
        stream as failed and re-raise. Within what is left of the stream's maximum
        life, as the relay and a whole answer's read are: its slots expire then and
        its hold's deadline assumes no stream outlives it, and a backend may hold its
        headers back for `LLMGW_UPSTREAM_READ_TIMEOUT` per try (a vendor's JSON answer
        comes only once generated), a chain of fallbacks as many times over.

        The checkpoints' heartbeat starts here: an edge that dies while it opens
        leaves one to fall silent (checkpoints.py)."""
        self._reporter.started()
        self._checkpointer.start()
        life = asyncio.timeout(remaining_life(self.state.settings, self.accepted_at))
        try:
            async with life:
                opened = self._opened = await self._opener.open(stream)
        except TimeoutError as exc:
            if not life.expired():  # not ours: a failure nobody foresaw
                raise await self._fail_unexpectedly(exc, "opening the backend stream") from None
            error = UpstreamError(
                "the stream reached its maximum length before its backend answered",
                code="upstream_timeout",
                status=504,
            )
            # A backend that had not answered: as one past the read timeout counts
            # (`Opener.open`), and as the relay counts the life running out.
            self._count_failure(error)
            await self._failed(error)
            raise error from None
        except EdgeError as exc:
            await self._failed(exc)
            raise
        except asyncio.CancelledError:
            await self._cancelled()
            raise
        except Exception as exc:
            # Not a failure we foresaw (e.g. a company key that cannot go into an HTTP
            # header): still a failed report, slots back, an OpenAI-shaped 502.
            raise await self._fail_unexpectedly(exc, "opening the backend stream") from None
        self._follow(self.backend.meter)
        return opened

    def _follow(self, meter: Meter) -> None:
        """Checkpoint `meter`'s bill, naming the model that serves when a fallback does."""
        model = self.backend.model.id
        self._checkpointer.follow(meter, model if model != self.grant.model else None)

    async def pump(
        self, response: Response, write: Callable[[UpstreamEvent], bytes], emit: Emit
    ) -> RelayResult:
        pump = Pump(self.state, self.backend, self.accepted_at, self._checkpointer, write, emit)
        self._opened = None  # the pump closes it, whatever happens
        self.result = await pump.run(response)
        return self.result

    async def open_stream(self, receive: Receive) -> Response | None:
        """`open(stream=True)`, or None when the client left first (`receive` said
        `http.disconnect`): the opening is cancelled and the stream reported
        `cancelled` (`_cancelled`). Opening lasts until the backend's headers, or its
        first token when a fallback is left (`fallback.await_first_token`), retries
        and fallbacks included: up to a minute a model. Unwatched, a client gone
        meanwhile left the edge waiting on the backend, its slots and hold taken,
        then the backend generating for nobody (DESIGN §9: cancelled within 1 s)."""
        return await self._while_client_stays(receive, lambda: self.open(stream=True))

    async def whole_answer(self, receive: Receive) -> Completion | None:
        """Open the backend and read its whole answer (`"stream": false`), or None when
        the client left first: `receive` (the request's, its body read) said
        `http.disconnect`. Whichever of the two was under way is then cancelled, which
        closes the backend's request (the backend stops generating, DESIGN §9), and the
        stream is reported `cancelled` (`_cancelled`), billed for what was generated:
        what was read of an answer sent as a stream, the input alone for a JSON
        document (`completion.read_completion`). Both are watched: a vendor sends its
        JSON answer's headers only once the answer is generated. Left to run, the
        backend generated for nobody, the stream's slots stayed taken all along, and
        the stream was reported `completed`."""
        return await self._while_client_stays(receive, self._open_and_read)

    async def _open_and_read(self) -> Completion:
        # Asked of the backend as a stream, joined by `read_completion`: a vendor's JSON
        # answer comes only once generated, a long one past the read timeout, which
        # gave up with nothing read (billed nothing) and moved to the chain's next
        # model while the vendor billed the answer it went on generating. Streamed,
        # the headers and the first token come at once, every token read is billed,
        # and a chain commits to its backend at the first token, as a stream does.
        return await self._read_completion(await self.open(stream=True))

    async def _while_client_stays(
        self, receive: Receive, work: Callable[[], Awaitable[T]]
    ) -> T | None:
        """`work()`, or None when it was stopped first (`stopped_by`): the client
        left, or the stream was revoked. Meanwhile the request is in the edge's
        `answering` set, which the revocation watcher checks with the running
        streams: a whole answer is no running stream, and it ran to its end, served
        and billed `completed`, however long after its token, user or company was
        revoked."""
        with anyio.CancelScope() as answering:
            # One task per request, parked in `receive` until the client leaves or the
            # work is done: nothing per read, no latency for a client that stays.
            watcher = asyncio.create_task(self._until_client_leaves(receive, answering))
            watched = _Answering(self, answering)
            self.state.answering.add(watched)
            try:
                return await work()
            finally:
                self.state.answering.discard(watched)
                watcher.cancel()
        return None  # stopped: `answering` was cancelled, the stream reported

    def _stop(self, why: str, answering: anyio.CancelScope) -> None:
        """Cancel the answer's opening or reading; the first reason is the one reported."""
        if self.stopped_by is None:
            self.stopped_by = why
        answering.cancel()

    async def _until_client_leaves(self, receive: Receive, answering: anyio.CancelScope) -> None:
        # Nothing more than the disconnect comes once the request's body is read.
        while (await receive())["type"] != "http.disconnect":
            pass
        self._stop("client_gone", answering)

    async def _read_completion(self, response: Response) -> Completion:
        self._opened = None  # `read_completion` closes it, whatever happens
        # A whole answer has the streamed one's maximum life: an SSE backend sends it
        # token by token, each read within the idle timeout, so nothing else ends it,
        # and the hold's deadline and the stream slots assume no stream outlives it.
        try:
            async with asyncio.timeout(remaining_life(self.state.settings, self.accepted_at)):
                # The checkpoints carry what the reader counts as it reads (a meter of
                # its own until the answer is whole): an edge killed while it read
                # left a checkpoint of no output, swept free while the vendor billed
                # every token generated.
                completion = await read_completion(response, self.backend, self._follow)
        except TimeoutError:
            error = UpstreamError(
                "the answer reached its maximum length", code="upstream_timeout", status=504
            )
            self._count_failure(error)
            await self._failed(error)
            raise error from None
        except EdgeError as exc:
            # The backend failed once it had begun answering: counted as the relay
            # counts a streamed answer's failure (`Pump.run`); the opening counts its own.
            self._count_failure(exc)
            await self._failed(exc)
            raise
        except asyncio.CancelledError:
            await self._cancelled()
            raise
        except Exception as exc:
            raise await self._fail_unexpectedly(exc, "reading the backend's answer") from None
        finally:
            self._follow(self.backend.meter)  # whole, or what a failure bills
        if completion.text or completion.tool_calls:
            self.backend.observe_first_token(self.state.metrics, self.accepted_at)
        self.result = RelayResult("completed")
        return completion

    async def report(self, outcome: str) -> None:
        """Release the stream's slots and enqueue the usage webhook, once; close a
        backend answer opened and never read (the client gone before the stream's
        first frame, e.g. the response's start refused: the producer never ran),
        or the backend generated the whole answer for nobody. The ended checkpoint
        first (a streamed answer's relay wrote it already), so the sweeper leaves the
        stream to this report. The report is made even if a cancellation the shields
        do not stop (the server's, at the end of its graceful time) cuts these short."""
        try:
            if self._opened is not None:
                opened, self._opened = self._opened, None
                with anyio.CancelScope(shield=True):
                    await opened.aclose()
            if self._checkpointer.started:
                with anyio.CancelScope(shield=True):
                    await self._checkpointer.close()
        finally:
            completed = self.result is not None and self.result.status == "completed"
            await self._reporter.report(self.backend, webhook_status(completed, outcome))

    async def _failed(self, exc: EdgeError) -> None:
        self.result = RelayResult("failed", exc.code, exc.message)
        # Shielded: a client leaving now (`whole_answer`) must not cut the report short.
        with anyio.CancelScope(shield=True):
            await self.report("finished")

    async def _cancelled(self) -> None:
        """The request was cancelled before its answer was served: its client left
        (`_while_client_stays`), a `cancelled` report; its stream was revoked, a
        `revoked` one; or the server's graceful shutdown ran out while it opened the
        backend or read a whole answer, which no drain can end as it ends a running
        stream, still a `failed` report. Each bills what was read
        (`completion.bill_unread`): without it the stream's slots stayed taken until its
        maximum life, and its hold waited for the sweeper. Shielded: the cancellation
        is the reason to report, not a reason to stop."""
        if self.stopped_by == "client_gone":
            outcome = "client_gone"
        elif self.stopped_by == "revoked":
            self.result = RelayResult("failed", "revoked", "access to this stream was revoked")
            outcome = "revoked"
        else:
            self.result = RelayResult("failed", "shutting_down", "the edge stopped mid-request")
            outcome = "finished"
        with anyio.CancelScope(shield=True):
            await self.report(outcome)

    def _count_failure(self, exc: EdgeError) -> None:
        """One backend failure in ``llmgw_edge_upstream_errors_total``."""
        self.state.metrics.upstream_errors.labels(self.backend.provider_label, exc.code).inc()

    async def _fail_unexpectedly(self, exc: Exception, doing: str) -> UpstreamError:
        """Report the stream as failed after an exception nobody foresaw; returns the
        error for the client. Only the exception's type is logged: its message may
        carry what it failed on (a key, a header)."""
        log.error("unexpected %s while %s", type(exc).__name__, doing)
        self.state.metrics.upstream_errors.labels(
            self.backend.provider_label, "internal_error"
        ).inc()
        error = UpstreamError("the edge could not open the backend stream")
        await self._failed(error)
        return error


class _Answering:
    """A request opening its backend or reading a whole answer, as the revocation
    watcher sees it (`EdgeState.answering`, a `RunningStream`)."""

    live: tuple[str, bytes | None] | None = None  # not resumable: none to supersede

    def __init__(self, job: StreamJob, answering: anyio.CancelScope) -> None:
        self.grant: StreamGrant | None = job.grant
        self._job = job
        self._answering = answering

    def revoke(self) -> None:
        self._job._stop("revoked", self._answering)

    def shut_down(self) -> None:
        """Nothing: the server cancels the request once its graceful time is over,
        a `failed` report (`StreamJob._cancelled`)."""

    def supersede(self) -> None:
        """Nothing: only resumable streams have connections to supersede."""
