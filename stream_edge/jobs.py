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
from stream_edge.relay import Deadlines, RelayResult, relay
from stream_edge.state import EdgeState
from stream_edge.streaming import Emit
from stream_edge.upstream import adapter_for
from stream_edge.upstream.base import Adapter, CallerContext, Completion, UpstreamCall
from stream_edge.upstream_client import open_stream
from stream_edge.usage_report import usage_event

log = logging.getLogger("llmgw.edge.jobs")


# The usage report must survive a store hiccup: about 3 s of retries in all.
ENQUEUE_ATTEMPTS = 5


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
            self.state.metrics.upstream_errors.labels(self.provider.name, exc.code).inc()
            self.result = RelayResult("failed", exc.code, exc.message)
            await self.report("finished")
            raise

    def first_token(self) -> None:
        self.state.metrics.ttft.labels(self.model.id, self.provider.name).observe(
            time.perf_counter() - self.accepted_at
        )

    async def pump(self, response: Http1Response, write: Any, emit: Emit) -> RelayResult:
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
        try:
            self.result = await relay(
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
        finally:
            # Shielded: when the client left, this task is being cancelled, and the
            # backend must still see its connection closed.
            with anyio.CancelScope(shield=True):
                await response.aclose()
        if self.result.status == "failed":
            self.state.metrics.upstream_errors.labels(
                self.provider.name, self.result.error_code or ""
            ).inc()
        return self.result

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
                log.warning("enqueueing usage failed (%s); retrying", type(exc).__name__)
                await asyncio.sleep(0.1 * 2**attempt)
        # Still down: the control plane's sweeper settles the hold from the last
        # checkpoint after its deadline, and the slots expire at the stream's maximum
        # life. Never lose the client's stream over it.
        log.error("could not enqueue usage for %s", self.grant.request_id)
