"""One stream's lifetime after its token was claimed: open the backend, relay,
and report usage exactly once, whatever happens (done, client gone, backend failed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import anyio
import httpx

from shared.catalog import ModelSpec, Provider
from shared.store import SlotRelease
from shared.tokens import StreamGrant
from stream_edge.checkpoints import Checkpointer
from stream_edge.errors import EdgeError, UpstreamError
from stream_edge.http1 import Http1Response
from stream_edge.limits import slot_keys
from stream_edge.meter import Meter
from stream_edge.metrics import model_label, provider_label
from stream_edge.relay import Deadlines, RelayResult, relay
from stream_edge.state import EdgeState
from stream_edge.streaming import Emit
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


class StreamJob:
    def __init__(
        self,
        state: EdgeState,
        grant: StreamGrant,
        model: ModelSpec,
        provider: Provider,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        max_tokens: int,
        input_estimate: int,
        accepted_at: float,
        api_key: str | None = None,
    ) -> None:
        self.state = state
        self.grant = grant
        self.model = model
        self.provider = provider
        self.messages = messages
        self.params = params
        self.max_tokens = max_tokens
        self.accepted_at = accepted_at
        self._own_api_key = api_key
        self.meter = Meter(
            input_estimate=input_estimate,
            keep_transcript=state.settings.store_transcripts,
            delta_is_token=provider.api_type == "openai_chat",
        )
        self.result: RelayResult | None = None
        self._reported = False
        self._counted_active = False
        self._adapter: Adapter | None = adapter_for(provider)
        # Bounded metric labels: a company's own model and provider names are `custom`.
        catalog = state.settings.catalog
        self._model_label = model_label(catalog, model.id)
        self._provider_label = provider_label(catalog, provider.name)

    def _call(self, stream: bool) -> UpstreamCall:
        settings = self.state.settings
        platform_key = settings.provider_keys.get(self.provider.name)
        key = self._own_api_key or (platform_key.reveal() if platform_key else None)
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

    async def open(self, stream: bool) -> Http1Response:
        """Connect to the backend; on failure report the stream as failed and re-raise."""
        self.state.metrics.streams_active.inc()
        self._counted_active = True
        try:
            if self._adapter is None:
                raise UpstreamError(f"the edge cannot speak the {self.provider.api_type} format")
            return await open_stream(
                self.state.client,
                self._adapter.build_request(self._call(stream)),
                breaker=self.state.breakers.for_provider(self.provider.name),
                policy=self.state.retry,
                error_status=self._adapter.error_status,
            )
        except EdgeError as exc:
            self.state.metrics.upstream_errors.labels(self._provider_label, exc.code).inc()
            self.result = RelayResult("failed", exc.code, exc.message)
            await self.report("finished")
            raise
        except Exception as exc:
            # Not a failure we foresaw (e.g. a company key that cannot go into an HTTP
            # header): still a failed report, slots back, an OpenAI-shaped 502.
            raise await self.fail_unexpectedly(exc, "opening the backend stream") from None

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

    async def pump(self, response: Http1Response, write: Any, emit: Emit) -> RelayResult:
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

    async def _relay(self, response: Http1Response, write: Any, emit: Emit) -> RelayResult:
        assert self._adapter is not None
        settings = self.state.settings
        checkpointer = Checkpointer(
            self.state.store,
            self.grant,
            self.meter,
            ttl_seconds=max(0, self.grant.expires_at - time.time())
            + settings.hold_grace_seconds
            + 3600,
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

    async def read_completion(self, response: Http1Response) -> Completion:
        assert self._adapter is not None
        try:
            body = await response.aread()
            completion = self._adapter.parse_completion(body)
        except (httpx.HTTPError, ValueError) as exc:
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
        event = usage_event(self.grant, self.provider.name, self.meter, status)
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
