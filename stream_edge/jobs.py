"""One stream's lifetime after its token was claimed: open the backend, relay,
and report usage exactly once, whatever happens (done, client gone, backend failed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from shared.key_pool import PLATFORM, company_scope
from shared.store import SlotRelease
from shared.tokens import StreamGrant
from stream_edge.admission import Route
from stream_edge.checkpoints import Checkpointer
from stream_edge.errors import EdgeError, UpstreamError
from stream_edge.fallback import await_first_token, falls_back
from stream_edge.key_pool import KeyPool
from stream_edge.limits import slot_keys
from stream_edge.meter import Meter
from stream_edge.metrics import model_label, provider_label
from stream_edge.relay import Deadlines, RelayResult, relay
from stream_edge.state import EdgeState
from stream_edge.streaming import Emit
from stream_edge.transport import Response, TransportError
from stream_edge.upstream import adapter_for
from stream_edge.upstream.base import Adapter, CallerContext, Completion, UpstreamCall
from stream_edge.upstream_client import open_stream
from stream_edge.usage_report import usage_event

log = logging.getLogger("llmgw.edge.jobs")


# A store hiccup is retried briefly; past that the report goes to the local spool
# (see `Outbox.keep`), so a longer wait here would only hold the stream's end up.
ENQUEUE_ATTEMPTS = 3


def done_key(jti: str) -> str:
    return f"done:{jti}"


@dataclass(frozen=True, slots=True)
class Attempt:
    """One model of the stream's chain (issue 16.2), with the request as it goes to it."""

    route: Route
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    max_tokens: int
    input_estimate: int


class StreamJob:
    """`attempts`: the grant's model, then its fallbacks, tried in order before the
    first byte (`open`); `model` and `provider` name the one that serves."""

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
        self._attempts = list(attempts)
        self.result: RelayResult | None = None
        self._reported = False
        self._counted_active = False
        self._use(self._attempts[0])
        self._first_label = self._model_label

    def _use(self, attempt: Attempt) -> None:
        settings = self.state.settings
        self.attempt = attempt
        self.model = attempt.route.model
        self.provider = attempt.route.provider
        self.messages = attempt.messages
        self.params = attempt.params
        self.max_tokens = attempt.max_tokens
        self.meter = Meter(
            input_estimate=attempt.input_estimate,
            keep_transcript=settings.store_transcripts,
            delta_is_token=self.provider.api_type == "openai_chat",
        )
        self._adapter: Adapter | None = adapter_for(self.provider)
        # Bounded metric labels: a company's own model and provider names are `custom`.
        catalog = settings.catalog
        self._model_label = model_label(catalog, self.model.id)
        self._provider_label = provider_label(catalog, self.provider.name)

    def _call(self, stream: bool, key: str | None) -> UpstreamCall:
        settings = self.state.settings
        service_token = settings.service_tokens.get(self.provider.name)
        grant = self.grant
        return UpstreamCall(
            base_url=self.provider.base_url,
            api_key=key,
            upstream_model=self.model.upstream_model,
            messages=self.messages,
            max_tokens=self.max_tokens,
            stream=stream,
            params=self.params,
            request_id=grant.request_id,
            context=CallerContext(
                grant.user_id, grant.company_id, grant.role, grant.session_id, grant.request_id
            ),
            service_token=service_token.reveal() if service_token else None,
        )

    def _pool(self) -> KeyPool:
        """The company's keys for its own route, else the platform's for the provider."""
        route = self.attempt.route
        own = route.api_keys or ((route.api_key,) if route.api_key else ())
        if own:
            scope, keys = company_scope(self.grant.company_id), own
        else:
            pool = self.state.settings.provider_key_pools.get(self.provider.name, ())
            scope, keys = PLATFORM, tuple(k.reveal() for k in pool)
        return KeyPool(
            self.state.store,
            scope,
            self.provider.name,
            keys,
            self.state.metrics,
            self._provider_label,
        )

    async def open(self, stream: bool) -> Response:
        """Connect to the backend — the chain's next model after a failure that
        `falls_back` — and on a final failure report the stream as failed and re-raise."""
        self.state.metrics.streams_active.inc()
        self._counted_active = True
        try:
            for n, attempt in enumerate(self._attempts):
                if n:
                    self._use(attempt)
                    self.state.metrics.fallbacks.labels(self._first_label, self._model_label).inc()
                    log.info("stream falls back to %s", self._model_label)
                last = n + 1 == len(self._attempts)
                try:
                    return await self._open_one(stream, wait_first_token=stream and not last)
                except EdgeError as exc:
                    self.state.metrics.upstream_errors.labels(self._provider_label, exc.code).inc()
                    if last or not falls_back(exc):
                        raise
            raise AssertionError("unreachable: the last attempt returns or raises")
        except EdgeError as exc:
            self.result = RelayResult("failed", exc.code, exc.message)
            await self.report("finished")
            raise
        except Exception as exc:
            # Not a failure we foresaw (e.g. a company key that cannot go into an HTTP
            # header): still a failed report, slots back, an OpenAI-shaped 502.
            raise await self.fail_unexpectedly(exc, "opening the backend stream") from None

    async def _open_one(self, stream: bool, *, wait_first_token: bool) -> Response:
        adapter = self._adapter
        if adapter is None:
            raise UpstreamError(f"the edge cannot speak the {self.provider.api_type} format")
        breaker = self.state.breakers.for_provider(self.provider.name)

        async def open_with(key: str | None, retry_rate_limited: bool) -> Response:
            return await open_stream(
                self.state.client,
                adapter.build_request(self._call(stream, key)),
                breaker=breaker,
                policy=self.state.retry,
                error_status=adapter.error_status,
                retry_rate_limited=retry_rate_limited,
            )

        response = await self._pool().open(open_with)
        if wait_first_token:
            # A fallback is left: commit to this backend only once it has answered.
            return await await_first_token(
                response, adapter.stream_parser(), self.state.settings.first_token_timeout
            )
        return response

    async def fail_unexpectedly(self, exc: Exception, doing: str) -> UpstreamError:
        """Report the stream as failed after an exception nobody foresaw; returns the
        error for the client. Only the exception's type is logged: its message may
        carry what it failed on (a key, a header)."""
        log.error("unexpected %s while %s", type(exc).__name__, doing)
        self.state.metrics.upstream_errors.labels(self._provider_label, "internal_error").inc()
        error = UpstreamError("the edge could not open the backend stream")
        self.result = RelayResult("failed", error.code, error.message)
        await self.report("finished")
        return error

    def first_token(self) -> None:
        self.state.metrics.ttft.labels(self._model_label, self._provider_label).observe(
            time.perf_counter() - self.accepted_at
        )

    async def pump(self, response: Response, write: Any, emit: Emit) -> RelayResult:
        try:
            self.result = await self._relay(response, write, emit)
        finally:
            # Shielded: when the client left, this task is being cancelled, and the
            # backend must still see its connection closed.
            with anyio.CancelScope(shield=True):
                await response.aclose()
        if self.result.status == "failed":
            self.state.metrics.upstream_errors.labels(
                self._provider_label, self.result.error_code or ""
            ).inc()
        return self.result

    async def _relay(self, response: Response, write: Any, emit: Emit) -> RelayResult:
        assert self._adapter is not None
        settings = self.state.settings
        checkpointer = Checkpointer(
            self.state.store,
            self.grant,
            self.meter,
            ttl_seconds=max(0, self.grant.expires_at - time.time())
            + settings.hold_grace_seconds
            + 3600,
            model=self.model.id if self.model.id != self.grant.model else None,
        )
        checkpointer.start()
        try:
            return await relay(
                response,
                self._adapter.stream_parser(),
                self.meter,
                write,
                emit,
                self.state.metrics,
                Deadlines(
                    first_token=settings.first_token_timeout,
                    idle=settings.idle_timeout,
                    max_life=settings.max_stream_seconds,
                ),
                self.first_token,
                checkpointer.tick,
            )
        except OSError:
            raise  # the client's connection failed: streaming.py handles that
        except Exception as exc:
            # A bug or a backend we misread (not the client leaving: that is a
            # cancellation): the stream still ends with an error event and a report.
            log.error("unexpected %s while relaying", type(exc).__name__)
            return RelayResult("failed", "upstream_error", "the stream broke off")
        finally:
            # Shielded, as in `pump`: the ended checkpoint tells the sweeper the
            # report is coming (bounded by its own timeout).
            with anyio.CancelScope(shield=True):
                await checkpointer.close()

    async def read_completion(self, response: Response) -> Completion:
        assert self._adapter is not None
        try:
            body = await response.aread()
            completion = self._adapter.parse_completion(body)
        except (TransportError, ValueError) as exc:
            self.result = RelayResult(
                "failed", "upstream_error", "the backend's answer was malformed"
            )
            await self.report("finished")
            raise UpstreamError("the backend's answer was malformed") from exc
        except Exception as exc:
            raise await self.fail_unexpectedly(exc, "reading the backend's answer") from None
        finally:
            await response.aclose()
        self.meter.record_text(
            completion.text, completion.usage, completion.finish_reason, completion.tool_calls
        )
        if completion.text or completion.tool_calls:
            self.first_token()
        self.result = RelayResult("completed")
        return completion

    def status(self, outcome: str) -> str:
        """The webhook status: what the stream did, else why it stopped."""
        if self.result is not None and self.result.status == "completed":
            return "completed"
        if outcome in ("client_gone", "slow_client"):
            return "cancelled"
        if outcome == "revoked":
            return "revoked"
        return "failed"

    async def report(self, outcome: str) -> None:
        """Release the stream's slots and enqueue the usage webhook, once."""
        if self._reported:
            return
        self._reported = True
        status = self.status(outcome)
        event = usage_event(self.grant, self.provider.name, self.meter, status, self.model.id)
        metrics = self.state.metrics
        if self._counted_active:
            metrics.streams_active.dec()
        metrics.streams_total.labels(status).inc()
        duration = time.perf_counter() - self.accepted_at
        metrics.duration.observe(duration)
        metrics.tokens.labels("input").inc(event.input_tokens)
        metrics.tokens.labels("output").inc(event.output_tokens)
        log.info(
            "stream %s",
            status,
            extra={
                "company_id": self.grant.company_id,
                "model": self.model.id,
                "provider": self.provider.name,
                "status": status,
                "input_tokens": event.input_tokens,
                "output_tokens": event.output_tokens,
                "usage_source": event.usage_source,
                "duration_ms": round(duration * 1000, 1),
            },
        )
        # The slots go back in the same round trip as the report is stored.
        release = SlotRelease(slot_keys(self.grant), self.grant.jti)
        for attempt in range(ENQUEUE_ATTEMPTS):
            try:
                await self.state.outbox.enqueue(event, release)
                return
            except Exception as exc:  # the store is overloaded or briefly down
                log.warning("enqueueing usage failed (%s)", type(exc).__name__)
                if attempt + 1 < ENQUEUE_ATTEMPTS:
                    await asyncio.sleep(0.1 * 2**attempt)
        # Still refused: the report waits in the local spool (and is posted at once),
        # and the slots go back on their own — not held until the stream's maximum
        # life for want of the outbox write they normally share.
        await self.state.outbox.keep(event, release)
        try:
            await self.state.store.release_slots(release)
        except Exception as exc:  # the spooled report releases them once stored
            log.warning("could not release the stream's slots: %s", type(exc).__name__)
